"""Surviving a lost worker: two torchrun "nodes" of one process each on the loopback address;
one worker is killed with SIGKILL mid-run, torchrun restarts both, and `--auto_resume`
continues from the last checkpoint. The job ends as an uninterrupted one does."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import TORCHRUN_RUN, flags, learnable_stream, torchrun, wait_for
from lmtools.checkpoint import read_checkpoint

pytestmark = pytest.mark.slow

INTERVAL = 10
MAX_ITERS = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(rank: int, port: int, args: list, log: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--node_rank",
        str(rank),
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        f"127.0.0.1:{port}",
        "--rdzv_id",
        "faults",
        "--rdzv_conf",
        f"is_host={int(rank == 0)}",
        "--max_restarts",
        "3",
        "--monitor_interval",
        "0.2",
        "-m",
        "lmtools.cli",
        *map(str, args),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # Output to a file and a session of its own: whatever happens, the test can read the log
    # and end the agent and its workers together.
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


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


def _faulted_job(tmp_path: Path, common: list, ckpt: Path):
    """Two nodes with --auto_resume; node 1's worker is killed with SIGKILL after iter 25."""
    port = _free_port()
    logs = [tmp_path / f"{ckpt.parent.name}-node{rank}.log" for rank in (0, 1)]
    args = ["train", *common, "--checkpoint_path", ckpt, "--auto_resume"]
    nodes = [_node(rank, port, args, log) for rank, log in zip((0, 1), logs)]
    seen = None
    try:
        wait_for(lambda: len(_iters(ckpt.parent / "metrics.jsonl")) >= 25, timeout=120, what="iter 25")
        seen = max(_iters(ckpt.parent / "metrics.jsonl"))
        workers = _children(nodes[1].pid)
        assert len(workers) == 1, workers
        os.kill(workers[0], signal.SIGKILL)  # the worker, not its agent
        deadline = time.time() + 90
        for node in nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):  # the logs say why
                node.wait(timeout=max(deadline - time.time(), 1))
    finally:
        for node in nodes:  # workers first: they are not in their agent's process group
            for pid in [*_children(node.pid), node.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            node.wait()
    return nodes, [log.read_text() for log in logs], seen


def test_a_killed_worker_is_restarted_and_the_job_ends_as_an_uninterrupted_one(tmp_path):
    np.save(tmp_path / "train.npy", learnable_stream(20000))
    common = [
        "--train_data",
        tmp_path / "train.npy",
        *flags(TORCHRUN_RUN, log_interval=1, eval_interval=1000, checkpoint_interval=INTERVAL, max_iters=MAX_ITERS),
    ]

    # The job runs once: a restarted worker that reads a dead peer's address (connection refused,
    # or a wait for good) fails this test. lmtools.runtime.distributed gives each attempt keys of its own,
    # named by rank 0 and handed to every rank, on every node.
    ckpt = tmp_path / "faulted" / "ckpt.pt"
    nodes, outs, seen = _faulted_job(tmp_path, common, ckpt)
    for node, out in zip(nodes, outs):
        assert node.returncode == 0, out[-5000:]
    out = "".join(outs)
    resumed_at = int(out.split("Resumed from")[1].split("at iter ")[1].split()[0])
    # At most one checkpoint interval is trained twice.
    assert seen - INTERVAL < resumed_at <= seen + INTERVAL and resumed_at % INTERVAL == 0
    assert "Training finished at iter 60" in out
    assert _iters(ckpt.parent / "metrics.jsonl") == list(
        range(0, MAX_ITERS + 1)
    )  # each step logged once (0: the first-step record)

    clean = tmp_path / "clean" / "ckpt.pt"
    run = torchrun("train", *common, "--checkpoint_path", clean)
    assert run.returncode == 0, run.stderr[-3000:]
    faulted, baseline = read_checkpoint(ckpt), read_checkpoint(clean)
    assert faulted["iteration"] == baseline["iteration"] == MAX_ITERS
    for name, value in baseline["model_state_dict"].items():
        assert torch.equal(faulted["model_state_dict"][name], value), name
