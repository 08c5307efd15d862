from boxlevelset.cli import main

raise SystemExit(main())
