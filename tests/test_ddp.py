"""DistributedDataParallel through torchrun: two CPU processes (gloo) end with identical weights
and log the losses of both."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from boxlevelset.train import weights_digest

# `python -m boxlevelset.train` that also writes the losses its own rank computed in each
# iteration (the model's training forward), to compare with what rank 0 logs.
RECORDING_TRAIN = """
import json, os, sys
from pathlib import Path
from boxlevelset.model import SOLOv2
import boxlevelset.train as T

seen, forward = [], SOLOv2.forward

def recording(self, *args, **kwargs):
    out = forward(self, *args, **kwargs)
    if self.training:
        seen.append({k: float(v) for k, v in out.items() if k.startswith("loss")})
    return out

SOLOv2.forward = recording
code = T.main(sys.argv[1:])
out = Path(sys.argv[sys.argv.index("-o") + 1])
(out / f"losses-rank{os.environ['RANK']}.json").write_text(json.dumps(seen))
raise SystemExit(code)
"""


def test_torchrun_two_processes_keep_replicas_identical(tiny_box_folder, tmp_path):
    out = tmp_path / "ddp"
    script = tmp_path / "recording_train.py"
    script.write_text(RECORDING_TRAIN)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(script), str(tiny_box_folder), "--preset", "lite", "-o", str(out),
        "--iterations", "3", "--batch-size", "2", "--min-size", "64", "--max-size", "64",
        "--warmup", "1", "--no-pretrained", "--device", "cpu", "--no-progress",
        "--rank-digest", "--seed", "3",
        "--model", "fpn_channels=16", "--model", "head_channels=16",
        "--model", "stacked_convs=1", "--model", "mask_feature_channels=16",
        "--model", "mask_feature_mid_channels=16", "--model", "num_grids=[12,10,8,6,4]",
        "--model", "feature_guide_channels=3", "--model", "tree_filter_max_side=32",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rank0 = (out / "weights-rank0.sha256").read_text().strip()
    rank1 = (out / "weights-rank1.sha256").read_text().strip()
    # Each rank saw different images and augmentations: only DDP's gradient all-reduce (and
    # its initial broadcast) keeps the replicas bit-identical.
    assert rank0 == rank1
    ckpt = torch.load(out / "model.pth", map_location="cpu", weights_only=False)
    assert weights_digest(ckpt["model"]) == rank0  # rank 0 saved what both ranks hold
    assert ckpt["iteration"] == 3
    # Only rank 0 writes the log: one row per iteration, not two.
    rows = (out / "log.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3
    assert str(out / "model.pth") in proc.stdout

    # The logged losses are the mean over the ranks, not rank 0's alone: each rank trained
    # on other images, so its losses differ.
    per_rank = [json.loads((out / f"losses-rank{r}.json").read_text()) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 3
    logged = list(csv.DictReader(rows))
    for it, (row, mine, theirs) in enumerate(zip(logged, *per_rank)):
        assert mine != theirs, it
        for key in mine:
            assert float(row[key]) == pytest.approx((mine[key] + theirs[key]) / 2, rel=1e-4,
                                                    abs=1e-7), (it, key)
        total = (sum(mine.values()) + sum(theirs.values())) / 2
        assert float(row["loss"]) == pytest.approx(total, rel=1e-4), it

    # Resumed under DDP: rank 0 decides what "auto" means and both ranks continue from it.
    again = list(cmd)
    again[again.index("--iterations") + 1] = "5"
    again += ["--resume", "auto"]
    proc = subprocess.run(again, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0 = (out / "weights-rank0.sha256").read_text().strip()
    assert rank0 == (out / "weights-rank1.sha256").read_text().strip()
    ckpt = torch.load(out / "model.pth", map_location="cpu", weights_only=True)
    assert ckpt["iteration"] == 5 and weights_digest(ckpt["model"]) == rank0
    assert len((out / "log.csv").read_text().strip().splitlines()) == 1 + 5


REFUSED_TRAIN = """
import os, sys
from pathlib import Path
from boxlevelset.train import TrainConfig, train

out = Path(sys.argv[2])
try:
    train(TrainConfig(data=sys.argv[1], preset="lite", output_dir=out, max_iterations=1,
                      pretrained=False, device="cpu"))
except ValueError as err:
    (out.parent / f"refused-rank{os.environ['RANK']}.txt").write_text(str(err))
"""


def test_torchrun_ranks_all_refuse_an_earlier_run_with_its_reason(tiny_box_folder, tmp_path):
    """boxlevelset.train() from Python under torchrun: rank 0 refused the earlier run and
    rank 1 died on a closed connection, without the reason."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.pth").write_bytes(b"an earlier model")
    script = tmp_path / "refused_train.py"
    script.write_text(REFUSED_TRAIN)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), str(tiny_box_folder), str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        reason = (tmp_path / f"refused-rank{rank}.txt").read_text()
        assert "already holds a training run" in reason
    assert (out / "model.pth").read_bytes() == b"an earlier model"
