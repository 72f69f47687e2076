"""Surviving a lost worker: two torchrun "nodes" of one process each on the loopback address;
one worker is killed with SIGKILL mid-run, torchrun restarts both, and `--auto_resume`
continues from the last checkpoint. The job ends as an uninterrupted one does."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmtools.checkpoint import read_checkpoint

from fault_tools import wait_for
from helpers import TORCHRUN_MODEL, learnable_stream, torchrun

pytestmark = pytest.mark.slow

INTERVAL = 10
MAX_ITERS = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(rank: int, port: int, args: list) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
        "--node_rank", str(rank), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
        "--rdzv_id", "faults", "--rdzv_conf", f"is_host={int(rank == 0)}", "--max_restarts", "1",
        "--monitor_interval", "0.2", "-m", "lmtools.cli", *map(str, args),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _iters(metrics: Path) -> list[int]:
    if not metrics.exists():
        return []
    return [json.loads(line)["iter"] for line in metrics.read_text().splitlines() if line.strip()]


def test_a_killed_worker_is_restarted_and_the_job_ends_as_an_uninterrupted_one(tmp_path):
    np.save(tmp_path / "train.npy", learnable_stream(20000))
    common = ["--train_data", tmp_path / "train.npy", *TORCHRUN_MODEL, "--num_layers", "1", "--log_interval", "1",
              "--eval_interval", "1000", "--checkpoint_interval", INTERVAL, "--max_iters", MAX_ITERS]

    ckpt = tmp_path / "faulted" / "ckpt.pt"
    port = _free_port()
    nodes = [_node(rank, port, ["train", *common, "--checkpoint_path", ckpt, "--auto_resume"]) for rank in (0, 1)]
    try:
        wait_for(lambda: len(_iters(ckpt.parent / "metrics.jsonl")) >= 25, timeout=120, what="iter 25")
        seen = max(_iters(ckpt.parent / "metrics.jsonl"))
        workers = _children(nodes[1].pid)
        assert len(workers) == 1, workers
        os.kill(workers[0], signal.SIGKILL)  # the worker, not its agent
        outs = [node.communicate(timeout=180) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, (out, err) in zip(nodes, outs):
        assert node.returncode == 0, err[-3000:]
    out = "".join(o for o, _ in outs)
    resumed_at = int(out.split("Resumed from")[1].split("at iter ")[1].split()[0])
    # At most one checkpoint interval is trained twice.
    assert seen - INTERVAL < resumed_at <= seen + INTERVAL and resumed_at % INTERVAL == 0
    assert "Training finished at iter 60" in out
    assert _iters(ckpt.parent / "metrics.jsonl") == list(range(1, MAX_ITERS + 1))  # each step logged once

    clean = tmp_path / "clean" / "ckpt.pt"
    run = torchrun("train", *common, "--checkpoint_path", clean)
    assert run.returncode == 0, run.stderr[-3000:]
    faulted, baseline = read_checkpoint(ckpt), read_checkpoint(clean)
    assert faulted["iteration"] == baseline["iteration"] == MAX_ITERS
    for name, value in baseline["model_state_dict"].items():
        assert torch.equal(faulted["model_state_dict"][name], value), name
