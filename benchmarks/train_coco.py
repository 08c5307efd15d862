"""Fine-tune the `lite` preset on COCO photos from boxes only, and from masks, and compare.

The same protocol as train_dsb.py on ../shared/data/coco128-dev (80 COCO train2017 photos,
80 classes): split by image (default 60 train / 19 held out, fixed seed), train `lite` with box
supervision and with mask supervision within a time budget each, and score on the held-out
images: the model alone (class-aware COCO mask AP), the model prompted with the ground-truth
boxes, model-free `segment_boxes` and filled boxes. Prints a markdown table, the box/mask AP
ratio, training it/s and inference ms/image.

    python benchmarks/train_coco.py                              # 25 min per supervision
    python benchmarks/train_coco.py --minutes 1 --max-images 6   # smoke test
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_dsb import build_parser, run  # noqa: E402

COCO128 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128-dev"


def main() -> None:
    # 79 of the 80 photos have annotations.
    args = build_parser(__doc__.splitlines()[0], COCO128, 60, 19).parse_args()
    # COCO's own post-processing: mask threshold 0.55 (DESIGN.md), at most 100 per image.
    run(args, "COCO photos: box-supervised vs mask-supervised `lite`", dict(mask_threshold=0.55))


if __name__ == "__main__":
    main()
