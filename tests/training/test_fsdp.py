"""FSDP2 (`train --fsdp`): two gloo processes on the CPU, sharded checkpoints in a .dcp folder."""

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from helpers import (
    SMALLEST_MODEL,
    TORCHRUN_RUN,
    flags,
    learnable_stream,
    logged_losses,
    run_cli,
    torchrun,
    torchrun_training,
)
from lmtools.checkpoint import read_checkpoint
from lmtools.config.train_config import TrainConfig
from lmtools.errors import CheckpointError, ConfigError
from lmtools.generate import load_model
from lmtools.inspection import inspect_path
from lmtools.model import TransformerLM


def _weights(path):
    model, _ = load_model(path, torch.device("cpu"))  # as `sample`: one process reads the shards
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_fsdp_gloo_two_processes_train_and_resume(tmp_path):
    # 3 validation batches on 2 ranks: the sharded forwards must stay in lockstep.
    val = ("--val_data", tmp_path / "train.npy", "--eval_iters", "3")
    run, ckpt = torchrun_training(tmp_path, "--fsdp", *val, num_layers=2)
    out = run.stdout
    assert out.count("lmtools train") == 1 and "2 ranks" in out, out
    losses = logged_losses(out)
    assert len(losses) == 5 and losses[-1] < 0.5 * losses[0], out  # iter 0 (the initial loss), 20, ..., 80
    # One checkpoint stream: the plain-data file, its shard folder, the metrics.
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ckpt.pt", "ckpt.pt.dcp", "metrics.jsonl"]
    assert (ckpt.parent / "ckpt.pt.dcp" / ".metadata").is_file()
    payload = read_checkpoint(ckpt)
    assert payload["iteration"] == 80 and payload["dcp"] == "ckpt.pt.dcp" and "model_state_dict" not in payload
    assert payload["config"]["fsdp"] is True
    report = inspect_path(ckpt)
    assert report["sound"] and report["iteration"] == 80 and report["shards"]["files"] == 3
    assert report["parameters"]["total"] == TransformerLM.from_config(payload["model_config"]).num_parameters()
    at_80 = _weights(ckpt)
    saved_80 = tmp_path / "saved_80"
    shutil.copytree(ckpt.parent, saved_80)

    run = torchrun("resume", ckpt, "--max_iters", "100")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Resumed from" in run.stdout and "at iter 80" in run.stdout and "Iter    100" in run.stdout
    assert read_checkpoint(ckpt)["iteration"] == 100
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ckpt.pt", "ckpt.pt.dcp", "metrics.jsonl"]
    iters = [json.loads(line)["iter"] for line in (ckpt.parent / "metrics.jsonl").read_text().splitlines()]
    assert iters == [0, 20, 40, 60, 80, 100]  # iter 0: before the first update

    # A save cut between its folder renames: the file says 80, `.dcp` holds 100, `.dcp.old` 80.
    shutil.move(saved_80 / "ckpt.pt.dcp", ckpt.parent / "ckpt.pt.dcp.old")
    shutil.copy(saved_80 / "ckpt.pt", ckpt)
    restored = _weights(ckpt)
    assert all(torch.equal(restored[k], at_80[k]) for k in at_80)

    # A hostile shard index: DCP would unpickle it; lmtools refuses and the command never runs.
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ckpt.parent / "ckpt.pt.dcp" / ".metadata").write_bytes(pickle.dumps(Evil()))
    shutil.rmtree(ckpt.parent / "ckpt.pt.dcp.old")
    with pytest.raises(CheckpointError, match="refusing"):
        _weights(ckpt)
    assert not marker.exists()


def test_fsdp_needstorchrun(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    np.save(tmp_path / "t.npy", np.arange(2000, dtype=np.uint16) % 64)
    run_flags = flags(SMALLEST_MODEL, vocab_size=64, context_length=8, max_iters=2, checkpoint_path=tmp_path / "c.pt")
    result = run_cli("train", "--fsdp", "--train_data", tmp_path / "t.npy", *run_flags)
    assert result.exit_code == 2
    assert "--fsdp" in result.output and "torchrun" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize("flags", [{"keep_last": 2}, {"dtype": "float16"}])
def test_fsdp_refuses_what_it_cannot_do(flags):
    with pytest.raises(ConfigError, match="--fsdp"):
        TrainConfig(train_data=["t.npy"], fsdp=True, **flags).validate()


SHARDED_INIT = """
import sys
import torch
import torch.distributed as dist
from lmtools.config.train_config import TrainConfig
from lmtools.runtime.distributed import init_distributed
from lmtools.training.build import build_model, build_sharded_model

# 101 rows and 70 columns: uneven shards.
cfg = TrainConfig(train_data=["unused"], vocab_size=101, context_length=16, d_model=36, num_layers=3,
                  num_heads=6, d_ff=70, seed=7)
info, device = init_distributed(torch.device("cpu"))
torch.manual_seed(1000 + info.rank)  # the ranks' global RNGs differ; the weights must not
model = build_sharded_model(cfg, device, info)
local = {k: v.to_local().numel() for k, v in model.state_dict().items()}
full = {k: v.full_tensor() for k, v in model.state_dict().items()}
reference = build_model(cfg, torch.device("cpu")).state_dict()
assert full.keys() == reference.keys()
for k, v in reference.items():
    assert torch.equal(full[k], v), k
    assert local[k] < v.numel(), k  # no rank holds a whole weight
assert torch.equal(model.rope.cos, build_model(cfg, torch.device("cpu")).rope.cos)
# One write per line: the two ranks share an unbuffered stdout.
sys.stdout.write(f"rank {info.rank} ok {sum(local.values())} {sum(v.numel() for v in reference.values())}\\n")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_sharded_model_is_built_without_a_full_copy_and_equals_the_unsharded_one(tmp_path):
    """Meta-device build, then each rank draws every weight and keeps its slice."""
    script = tmp_path / "sharded_init.py"
    script.write_text(SHARDED_INIT)
    run = torchrun(script=script)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = sorted(line for line in run.stdout.splitlines() if line.startswith("rank"))
    assert [line.split()[:3] for line in lines] == [["rank", "0", "ok"], ["rank", "1", "ok"]], run.stdout
    # The two ranks' slices add up to the whole model.
    total = int(lines[0].split()[4])
    assert int(lines[0].split()[3]) + int(lines[1].split()[3]) == total


@pytest.mark.slow
def test_fsdp_with_compile_learns(tmp_path):
    np.save(tmp_path / "train.npy", learnable_stream(30000))
    run = torchrun(
        "train",
        "--fsdp",
        "--compile",
        "--train_data",
        tmp_path / "train.npy",
        *flags(TORCHRUN_RUN, num_layers=2, log_interval=10, max_iters=40),
        "--checkpoint_path",
        tmp_path / "run" / "ckpt.pt",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "compiled | 2 ranks" in run.stdout, run.stdout
    losses = logged_losses(run.stdout)
    assert len(losses) == 5 and losses[-1] < 0.5 * losses[0], run.stdout  # iter 0, 10, ..., 40
    assert read_checkpoint(tmp_path / "run" / "ckpt.pt")["iteration"] == 40
