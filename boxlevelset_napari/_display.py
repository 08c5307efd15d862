"""Run a napari script headless: re-execute it under Xvfb when there is no display."""

from __future__ import annotations

import os
import shutil
import sys


def ensure_display() -> None:
    """Return when a display exists; otherwise re-run this process under ``xvfb-run``.

    napari's canvas needs OpenGL, which the plain offscreen Qt platform lacks; Xvfb with
    Mesa provides it.
    """
    if os.environ.get("DISPLAY") or os.environ.get("BOXLEVELSET_XVFB"):
        return
    xvfb = shutil.which("xvfb-run")
    if xvfb is None:
        sys.exit("no display and no xvfb-run: install xvfb (see README) or run with a display")
    os.environ["BOXLEVELSET_XVFB"] = "1"
    os.environ["QT_QPA_PLATFORM"] = "xcb"
    os.execv(xvfb, [xvfb, "-a", "-s", "-screen 0 1600x1000x24", sys.executable, *sys.argv])
