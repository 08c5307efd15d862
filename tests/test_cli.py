"""The `boxlevelset` command line, run as a user would (in-process and as a module)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from skimage import io

from boxlevelset.cli import main


def test_segment_sample_writes_coco_labels_overlay(tmp_path):
    assert main(["segment", "--sample", "--out", str(tmp_path)]) == 0
    coco = json.loads((tmp_path / "masks.json").read_text())
    assert len(coco["images"]) == 1 and len(coco["annotations"]) == 28
    ann = coco["annotations"][0]
    mask = mask_utils.decode(ann["segmentation"])
    assert mask.sum() == ann["area"] > 0
    labels = io.imread(tmp_path / "labels" / "nuclei.png")
    assert labels.max() == 28 and labels.shape == (256, 256)
    assert io.imread(tmp_path / "overlays" / "nuclei.png").shape == (256, 256, 3)


def test_segment_keeps_masks_over_their_boxes(tmp_path, monkeypatch):
    # 961 nuclei on a 2048x2048 image took 32 s and 6 GB as whole-image masks (stacked,
    # copied for RLE); RLE, labels and overlay now come from the box crops: 4 s, 0.9 GB.
    from boxlevelset.export import BoxMasks

    def whole(*args):
        raise AssertionError("a whole-image mask was built")

    monkeypatch.setattr(BoxMasks, "full", whole)
    assert main(["segment", "--sample", "--out", str(tmp_path)]) == 0
    coco = json.loads((tmp_path / "masks.json").read_text())
    labels = io.imread(tmp_path / "labels" / "nuclei.png")
    for i, ann in enumerate(coco["annotations"], start=1):
        mask = mask_utils.decode(ann["segmentation"]).astype(bool)
        assert (labels[mask] == i).mean() > 0.5  # earlier masks win overlaps


def test_segment_box_labeled_folder_keeps_categories(tiny_box_folder, tmp_path):
    args = ["segment", str(tiny_box_folder), "--out", str(tmp_path), "--iterations", "20"]
    assert main(args) == 0
    src = json.loads((tiny_box_folder / "annotations.json").read_text())
    out = json.loads((tmp_path / "masks.json").read_text())
    assert [a["category_id"] for a in out["annotations"]] == [
        a["category_id"] for a in src["annotations"]]
    assert out["categories"] == src["categories"]


@pytest.fixture
def segment_options(monkeypatch) -> list[dict]:
    """The options of every segment_boxes call the CLI makes (the calls still run)."""
    import boxlevelset.levelset as levelset

    seen = []
    real = levelset.segment_boxes

    def spy(image, boxes, model=None, **options):
        seen.append(options)
        return real(image, boxes, model=model, **options)

    monkeypatch.setattr(levelset, "segment_boxes", spy)
    return seen


def test_segment_passes_energy_options(tiny_box_folder, tmp_path, segment_options):
    args = ["segment", str(tiny_box_folder), "--out", str(tmp_path), "--histogram", "0",
            "--iterations", "5"]
    assert main(args) == 0
    assert segment_options and all(
        o == {"histogram": 0.0, "iterations": 5, "window": None, "cropped": True}
        for o in segment_options)


def test_segment_loose_boxes_option(tiny_box_folder, tmp_path, segment_options):
    from boxlevelset.levelset import LOOSE_BOXES

    assert main(["segment", str(tiny_box_folder), "--out", str(tmp_path), "--loose-boxes",
                 "--iterations", "5"]) == 0
    assert segment_options and all(
        o == {"iterations": 5, "window": None, "cropped": True, **LOOSE_BOXES}
        for o in segment_options)


def test_segment_ct_folder_uses_the_ct_solver(tmp_path, segment_options):
    import SimpleITK as sitk

    (tmp_path / "images").mkdir()
    hu = np.random.default_rng(0).normal(-100, 15, (2, 40, 48)).astype(np.int16)
    hu[:, 10:30, 12:36] += 160  # soft tissue in fat
    sitk.WriteImage(sitk.GetImageFromArray(hu), str(tmp_path / "images" / "ct.nii.gz"))
    coco = {"images": [{"id": i + 1, "file_name": "ct.nii.gz", "width": 48, "height": 40,
                        "slice_index": i} for i in range(2)],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [12, 10, 24, 20]}],
            "categories": [{"id": 1, "name": "liver"}]}
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    assert main(["segment", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    # Slices reach segment_boxes in Hounsfield units with the folder's window (abdomen),
    # so its CT default (the cut) applies.
    assert [o["window"] for o in segment_options] == [(40.0, 400.0)] * 2
    assert all("solver" not in o for o in segment_options)
    result = json.loads((tmp_path / "out" / "masks.json").read_text())
    assert len(result["annotations"]) == 1 and result["annotations"][0]["area"] > 400
    from boxlevelset import segment_boxes  # the same mask as the engine gives the HU slice

    direct = segment_boxes(hu[0].astype(np.float32), [[12, 10, 36, 30]], window="abdomen")
    assert result["annotations"][0]["area"] == int(direct[0].sum())
    segment_options.clear()
    assert main(["segment", str(tmp_path), "--out", str(tmp_path / "o2"), "--solver",
                 "evolve"]) == 0
    assert [o["solver"] for o in segment_options] == ["evolve", "evolve"]


def test_segment_images_with_boxes_json(tmp_path):
    img = np.zeros((40, 50), np.uint8)
    img[10:30, 10:25] = 220
    io.imsave(tmp_path / "a.png", img)
    (tmp_path / "boxes.json").write_text(json.dumps({"a.png": [[10, 10, 25, 30]]}))
    out = tmp_path / "out"
    # -o, as train and predict take it.
    assert main(["segment", str(tmp_path / "a.png"), "--boxes", str(tmp_path / "boxes.json"),
                 "-o", str(out)]) == 0
    labels = io.imread(out / "labels" / "a.png")
    truth = img > 0
    assert ((labels > 0) & truth).sum() / ((labels > 0) | truth).sum() > 0.9
    # The same boxes typed on the command line give the same masks.
    inline = tmp_path / "inline"
    assert main(["segment", str(tmp_path / "a.png"), "--boxes", "[[10, 10, 25, 30]]",
                 "-o", str(inline)]) == 0
    assert np.array_equal(io.imread(inline / "labels" / "a.png"), labels)


def test_inline_boxes_errors_quote_the_text(tmp_path, capsys):
    io.imsave(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    for text, problem in (("[[0, 0, 5", "boxes given as JSON text"), ("[[0, 0, 5]]", "Nx4")):
        assert main(["segment", str(tmp_path / "a.png"), "--boxes", text,
                     "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert problem in err and text in err


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    (tmp_path / "boxes.json").write_text("[[0, 0, 5, 5]]")
    assert main(["segment", str(bad), "--boxes", str(tmp_path / "boxes.json"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "broken.png" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["segment", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "empty" in capsys.readouterr().err
    (tmp_path / "wrong.json").write_text("[[0, 0, 5]]")
    io.imsave(tmp_path / "ok.png", np.zeros((8, 8), np.uint8))
    assert main(["segment", str(tmp_path / "ok.png"), "--boxes", str(tmp_path / "wrong.json"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "wrong.json" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "boxlevelset", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for command in ("segment", "train", "evaluate", "predict"):
        assert command in result.stdout


def test_segment_skips_an_image_that_fails_to_decode(tiny_box_folder, tmp_path, monkeypatch):
    from boxlevelset.data import BoxFolder, ImageReadError

    real = BoxFolder.load_image

    def load_image(self, record):  # damaged after the folder was checked
        if record.file_name == "tiny_1.png":
            raise ImageReadError(f"{record.path}: cannot decode image")
        return real(self, record)

    monkeypatch.setattr(BoxFolder, "load_image", load_image)
    with pytest.warns(UserWarning, match="tiny_1.png"):
        assert main(["segment", str(tiny_box_folder), "--out", str(tmp_path / "o"),
                     "--iterations", "3"]) == 0
    result = json.loads((tmp_path / "o" / "masks.json").read_text())
    assert [im["file_name"] for im in result["images"]] == ["tiny_0.png", "tiny_2.png"]


def test_unknown_device_is_a_clear_error(tiny_box_folder, tmp_path, capsys):
    assert main(["train", str(tiny_box_folder), "--out", str(tmp_path / "run"),
                 "--device", "gpu0"]) == 2
    err = capsys.readouterr().err
    assert "unknown device 'gpu0'" in err and "Traceback" not in err


def test_divergence_is_reported_without_a_traceback(tiny_box_folder, tmp_path, capsys,
                                                    monkeypatch):
    import boxlevelset.train as T

    def diverge(config, **_):
        raise T.TrainingDiverged("training diverged: non-finite loss at iteration 4; "
                                 "last good checkpoint: run/last.pth")

    monkeypatch.setattr(T, "train", diverge)
    assert main(["train", str(tiny_box_folder), "--out", str(tmp_path / "run")]) == 2
    assert "error: training diverged" in capsys.readouterr().err


def test_outputs_of_images_with_the_same_stem_do_not_overwrite(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    image = np.zeros((30, 40), np.uint8)
    image[8:20, 10:30] = 200
    io.imsave(folder / "x.png", image)
    io.imsave(folder / "x.bmp", image[:, ::-1].copy())
    (tmp_path / "boxes.json").write_text(json.dumps({"x.png": [[8, 6, 32, 22]],
                                                     "x.bmp": [[8, 6, 32, 22]]}))
    assert main(["segment", str(folder / "x.png"), str(folder / "x.bmp"), "--boxes",
                 str(tmp_path / "boxes.json"), "-o", str(tmp_path / "o")]) == 0
    assert sorted(p.name for p in (tmp_path / "o" / "labels").iterdir()) == [
        "x.png", "x_bmp.png"]
    assert sorted(p.name for p in (tmp_path / "o" / "overlays").iterdir()) == [
        "x.png", "x_bmp.png"]


def _disc_image(path) -> None:
    yy, xx = np.mgrid[:40, :48]
    io.imsave(path, np.where((yy - 20) ** 2 + (xx - 24) ** 2 < 100, 200, 20).astype(np.uint8),
              check_contrast=False)


def test_an_unreadable_file_in_a_list_is_skipped_and_the_rest_segmented(tmp_path, capsys):
    _disc_image(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.warns(UserWarning, match="skipping unreadable image: .*broken.png"):
        assert main(["segment", str(tmp_path / "good.png"), str(tmp_path / "broken.png"),
                     "--boxes", "[[12, 8, 36, 32]]", "-o", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "masks.json").read_text())
    assert [im["file_name"] for im in result["images"]] == ["good.png"]
    assert "1 images, 1 masks" in capsys.readouterr().out


def test_boxes_json_categories_and_boxes_outside_the_image(tmp_path):
    _disc_image(tmp_path / "a.png")
    boxes = {"boxes_xyxy": [[12, 8, 36, 32], [60, 60, 80, 80], [0, 0, 10, 10]],
             "categories": ["cell", "debris", "debris"]}
    with pytest.warns(UserWarning, match="a.png: dropped 1 box.*outside the 48x40 image"):
        assert main(["segment", str(tmp_path / "a.png"), "--boxes", json.dumps(boxes),
                     "-o", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "masks.json").read_text())
    assert result["categories"] == [{"id": 1, "name": "cell"}, {"id": 2, "name": "debris"}]
    assert [a["category_id"] for a in result["annotations"]] == [1, 2]


@pytest.mark.parametrize("argv, message", [
    (["{tmp}/a.png", "--boxes", '{"b.png": [[1, 1, 9, 9]]}'], "b.png, which no input image"),
    (["{tmp}", "--boxes", "[[1, 1, 9, 9]]"], "--boxes is for image files"),
    (["{tmp}/plain"], "no boxes to segment"),
    (["--sample", "{tmp}/a.png"], "either --sample or images"),
    (["--sample", "--refine", "5"], "give --model too"),
    (["--sample", "--tile", "256"], "give --model too"),
    (["--sample", "--model", "{tmp}/none.pt", "--tile", "8"], "tile must be"),
    (["{tmp}/a.png", "--boxes", "[[1, 1, 9, 9]]", "-o", "{tmp}/a.png"], "a.png"),
    (["{tmp}/a.png", "--boxes", '{"boxes_xyxy": [[1, 1, 9, 9]], "categories": []}'],
     "a name for each of the 1 boxes"),
    (["{tmp}/a.png", "--boxes", '{"a.png": [[1, 1, 9, 9]], "categories": ["x"]}'],
     "'categories' go with 'boxes_xyxy'"),
    (["{tmp}/a.png", "--boxes", '{"boxes_xyxy": {"a.png": [[1, 1, 9, 9]]}, '
      '"categories": ["x"]}'], "'categories' name the boxes of a 'boxes_xyxy' list"),
    (["{tmp}/a.png", "--boxes", "[[1, 1, 9, 9]]", "--window", "bogus"], "'bogus'"),
    (["{tmp}/a.png", "--boxes", "[[1, 1, 9, 9]]", "--window", "nan,400"], "finite"),
])
def test_segment_input_mistakes_are_clear_errors(tmp_path, capsys, argv, message):
    _disc_image(tmp_path / "a.png")
    (tmp_path / "plain").mkdir()
    _disc_image(tmp_path / "plain" / "c.png")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["segment", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_window_as_level_width_and_negative_counts(tmp_path, capsys):
    from boxlevelset.image import resolve_window

    assert resolve_window("40,400") == (40.0, 400.0)
    assert resolve_window("-600,1500") == (-600.0, 1500.0)
    with pytest.raises(SystemExit):
        main(["segment", "--sample", "--iterations", "-5"])
    assert "must be >= 0" in capsys.readouterr().err


def test_window_applies_to_image_files_in_hounsfield_units(tmp_path):
    import tifffile

    hu = np.full((40, 48), -100.0, np.float32)  # fat
    hu[10:30, 12:36] = 60.0  # liver
    hu[18:22, 20:28] = 1000.0  # bone inside the box: saturated by the abdomen window
    tifffile.imwrite(tmp_path / "slice.tif", hu)
    args = ["segment", str(tmp_path / "slice.tif"), "--boxes", "[[10, 8, 38, 32]]"]
    assert main([*args, "-o", str(tmp_path / "w"), "--window", "40,400"]) == 0
    windowed = json.loads((tmp_path / "w" / "masks.json").read_text())["annotations"][0]
    assert abs(windowed["area"] - 20 * 24) < 30  # the liver block, bone included
