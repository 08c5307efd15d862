"""Training from boxes on large mosaics: whole images against random crops (`crop`).

    python benchmarks/train_mosaic.py SPLIT [--minutes 6] [--crop 384] [--tiles 256 384]
                                      [--out DIR]

SPLIT is train_dsb.py's split folder (`--out DIR` there keeps it as DIR/split, with train/
and test/). The training images are laid side by side in their own pixels into mosaics of
`--per-mosaic` images each (a stitched microscope scan), saved as a box folder, and the
`lite` preset is trained on them from boxes only twice, for the same time: on whole
images (each mosaic resized to the input size, as training did before `crop`) and on
random crops of `--crop` pixels around a box. Both models are then scored on the test
images' mosaic in tiles of each `--tiles` size (`TiledPredictor`): mask AP of the model
alone, and mean IoU / AP with the ground-truth boxes as prompts.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from boxlevelset.data import save_box_folder
from boxlevelset.model import load_model
from tiled_predict import image_parts, lay_out, mosaic, score
from train_dsb import train_within


def mosaic_folder(train: Path, dest: Path, per_mosaic: int) -> tuple[Path, int]:
    """The folder's images as mosaics of ``per_mosaic`` images, written as a box folder with
    their boxes and masks. Returns (folder, mosaics)."""
    parts = image_parts(train)
    entries = []
    for k in range(0, len(parts), per_mosaic):
        canvas, masks = lay_out(parts[k : k + per_mosaic])
        pixels = np.rint(canvas * 255).astype(np.uint8)
        entries.append((f"mosaic_{k // per_mosaic}.png", pixels, masks.bounds.astype(float),
                        np.ones(len(masks), np.int64), masks))
    save_box_folder(dest, entries, [{"id": 1, "name": "nucleus"}])
    return dest, len(entries)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("split", type=Path, help="folder with train/ and test/ box folders")
    parser.add_argument("--minutes", type=float, default=6.0, help="training budget per run")
    parser.add_argument("--crop", type=int, default=384)
    parser.add_argument("--tiles", type=int, nargs="+", default=[256, 384])
    parser.add_argument("--per-mosaic", type=int, default=20)
    parser.add_argument("--out", type=Path, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = args.out or Path(tempfile.mkdtemp(prefix="train_mosaic_"))
    data, n = mosaic_folder(args.split / "train", out / "mosaics", args.per_mosaic)
    canvas, truth, parts = mosaic(args.split / "test")
    print(f"{n} training mosaics of up to {args.per_mosaic} images; test mosaic "
          f"{canvas.shape[1]}x{canvas.shape[0]}, {len(truth)} nuclei; {args.minutes} min per "
          f"run; working folder {out}\n")
    rows = []
    for name, crop in (("whole mosaics", 0), (f"crops of {args.crop} px", args.crop)):
        config = dict(data=str(data), preset="lite", batch_size=4, min_size=(256, 384),
                      max_size=512, crop=crop, seed=0)
        path, its, done = train_within(config, args.minutes, out / f"crop{crop}")
        model = load_model(path, device="cpu")
        for tile in args.tiles:
            n_found, ap, seconds, miou, box_ap = score(model, canvas, truth, tile)
            rows.append((name, done, tile, ap, miou, box_ap))
    print("\n| trained on | iterations | tiles | mask AP | GT box prompts: mIoU / AP |\n"
          "|---|---|---|---|---|")
    for name, done, tile, ap, miou, box_ap in rows:
        print(f"| {name} | {done} | {tile} px | {ap:.3f} | {miou:.3f} / {box_ap:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
