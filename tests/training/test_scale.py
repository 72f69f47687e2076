"""Scaling up: gradient accumulation equals a bigger batch; DDP with gloo on two CPU processes."""

import json

import numpy as np
import pytest
import torch

from helpers import REPO, logged_losses, run_cli, torchrun, torchrun_training, train_config
from lmtools import TransformerLM, cross_entropy
from lmtools.checkpoint import read_checkpoint


def test_accumulated_gradients_equal_one_big_batch():
    torch.manual_seed(0)
    model = TransformerLM(vocab_size=50, context_length=12, d_model=32, num_layers=2, num_heads=4, d_ff=64).double()
    x = torch.randint(0, 50, (8, 12))
    y = torch.randint(0, 50, (8, 12))
    cross_entropy(model(x), y).backward()
    big = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for i in range(4):  # the training loop's scaling: each micro loss / accum steps
        (cross_entropy(model(x[2 * i : 2 * i + 2]), y[2 * i : 2 * i + 2]) / 4).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, big[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.slow
def test_ddp_gloo_two_processes(tmp_path):
    run, ckpt = torchrun_training(tmp_path)
    out = run.stdout
    assert out.count("lmtools train") == 1, out  # only rank 0 logs
    assert "2 ranks" in out and "8 x context 16 = 256 tokens/step" in out
    losses = logged_losses(out)
    assert len(losses) == 5 and losses[-1] < 0.5 * losses[0], out  # iter 0 (the initial loss), 20, ..., 80
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ckpt.pt", "metrics.jsonl"]
    iters = [json.loads(line)["iter"] for line in (ckpt.parent / "metrics.jsonl").read_text().splitlines()]
    assert iters == [0, 20, 40, 60, 80]

    run = torchrun("resume", ckpt, "--max_iters", "100")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Resumed from" in run.stdout and "Iter    100" in run.stdout
    assert read_checkpoint(ckpt)["iteration"] == 100

    # A different world size: one process continues the two-rank run from its global step.

    result = run_cli("resume", ckpt, "--max_iters", "120")
    assert result.exit_code == 0, result.output
    assert "Resumed from" in result.output and "at iter 100" in result.output and "ranks" not in result.output
    assert read_checkpoint(ckpt)["iteration"] == 120


def _tiny_cfg(tmp_path, tokens_path, **kw):
    run = dict(vocab_size=64, batch_size=8, learning_rate=1e-2, min_learning_rate=1e-3, warmup_iters=2, max_iters=30)
    return train_config(tokens_path, tmp_path / "c.pt", **(run | dict(log_interval=10, eval_interval=1000) | kw))


@pytest.fixture
def pattern_tokens(tmp_path):
    path = tmp_path / "t.npy"
    np.save(path, np.tile(np.arange(32, dtype=np.uint16), 500))
    return path


def test_bfloat16_autocast_on_cpu_learns(tmp_path, pattern_tokens):
    from lmtools.training.trainer import train_model

    lines = []
    result = train_model(_tiny_cfg(tmp_path, pattern_tokens, dtype="bfloat16"), log=lines.append)
    assert any("bfloat16" in line for line in lines if line.startswith("device"))
    assert result.losses[-1] < 0.5 * result.losses[0]


@pytest.mark.slow
def test_compiled_run_resumes_uncompiled(tmp_path, pattern_tokens):
    from lmtools.config.train_config import TrainConfig
    from lmtools.training.trainer import train_model

    cfg = _tiny_cfg(tmp_path, pattern_tokens, compile=True, max_iters=10, cosine_cycle_iters=20)
    train_model(cfg, log=lambda _l: None)
    keys = read_checkpoint(cfg.checkpoint_path)["model_state_dict"].keys()
    assert keys and not [k for k in keys if "_orig_mod" in k]
    result = train_model(
        TrainConfig(max_iters=20, compile=False, checkpoint_path=cfg.checkpoint_path),
        resume_from=cfg.checkpoint_path,
        explicit=frozenset({"max_iters", "compile", "checkpoint_path"}),
        log=lambda _l: None,
    )
    assert result.iteration == 20 and result.losses[-1] < 3.0


@pytest.mark.slow
def test_gpu_throughput_script_runs_on_the_cpu(tmp_path):
    """The GPU benchmark script, checked end to end with a small model where there is no GPU."""
    import subprocess
    import sys

    script = REPO / "benchmarks" / "gpu_throughput.py"
    cmd = [
        sys.executable,
        str(script),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--no_compile",
        "--d_model",
        "32",
        "--num_layers",
        "1",
        "--num_heads",
        "4",
        "--d_ff",
        "64",
        "--vocab_size",
        "64",
        "--context_length",
        "16",
        "--tokens",
        "20000",
        "--iters",
        "12",
        "--windows",
        "3",
        "--batch_size",
        "2",
        "8",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [
        line.split("|")[1:-1] for line in run.stdout.splitlines() if line.startswith("| ") and "tokens/s" not in line
    ]
    assert [r[0].strip() for r in rows] == ["2", "8"], run.stdout
    for _batch, tok_s, mfu, wait, mem in rows:
        assert float(tok_s.replace(",", "")) > 0 and mfu.strip() == "n/a" and mem.strip() == "n/a"
        assert 0.0 <= float(wait.strip().rstrip("%")) < 100.0
    assert "d32 L1 H4" in run.stdout and "12 steps" in run.stdout


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA A10G", 70),
        ("NVIDIA A10", 125),
        ("NVIDIA L40S", 362),
        ("NVIDIA L4", 121),
        ("NVIDIA GeForce RTX 4090", 165),
        ("NVIDIA GeForce GTX 1080", None),
    ],
)
def test_peak_flops_for_mfu_by_device_name(name, tflops, monkeypatch):
    from lmtools.runtime.device import peak_flops_for_name

    monkeypatch.delenv("LMTOOLS_PEAK_TFLOPS", raising=False)
    assert peak_flops_for_name(name) == (None if tflops is None else tflops * 1e12)


def test_peak_flops_override_for_gpus_not_in_the_table(monkeypatch):
    from lmtools.errors import ConfigError
    from lmtools.runtime.device import peak_flops_for_name

    monkeypatch.setenv("LMTOOLS_PEAK_TFLOPS", "91.5")
    assert peak_flops_for_name("NVIDIA GeForce GTX 1080") == 91.5e12
    monkeypatch.setenv("LMTOOLS_PEAK_TFLOPS", "fast")
    with pytest.raises(ConfigError, match="LMTOOLS_PEAK_TFLOPS"):
        peak_flops_for_name("NVIDIA H100 80GB HBM3")
