"""A new user's first hour on a CPU: the time a run will take (estimated, then measured, and a
warning when it is days), a Ctrl-C that ends a long first step soon, named model sizes, and a
run folder instead of checkpoint.pt in the current folder. Real training, real signals."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from helpers import FAULT_RUN, TINY_MODEL, error_line, flags, run_cli, spawn, train_config, wait_for_line
from lmtools.checkpoint import read_checkpoint
from lmtools.config.recipes import MODEL_SIZES
from lmtools.config.train_config import TrainConfig
from lmtools.model import TransformerLM
from lmtools.training.timing import StepClock
from lmtools.training.trainer import train_model

# Four random-token steps of the tiny model, a log line every step, no evaluation.
QUICK = dict(FAULT_RUN, eval_interval=10**6, checkpoint_interval=10**6)


def _config(tokens, ckpt, **kw) -> TrainConfig:
    return train_config(tokens, ckpt, **(QUICK | dict(max_iters=4) | kw))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["model_state_dict"]


# ---- time: estimated before step 1, measured after the first steps -------------------------------


def _time_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("time   :")]


def test_the_header_estimates_the_run_and_the_first_steps_measure_it(tokens, tmp_path):
    lines = []
    train_model(_config(tokens, tmp_path / "ckpt.pt", max_iters=6), log=lines.append)
    estimate, measured = _time_lines(lines)
    # The estimate comes before the first loss, the measurement after three steps.
    assert lines.index(estimate) < next(i for i, line in enumerate(lines) if line.startswith("Iter      0"))
    assert "s/step estimated (" in estimate and "TFLOP a step" in estimate and "| 6 steps about " in estimate
    assert " s/step measured over 3 steps | 6 steps about " in measured.replace("ms/step", " s/step")
    assert not [line for line in lines if line.startswith("warning: this run would take")]  # seconds, not days


def test_a_run_of_days_is_told_so_in_one_line_naming_the_flags(tokens, tmp_path):
    """10^12 steps of the tiny model: years by the estimate on any CPU (10^9 were 17 hours on an
    idle one, so only the measurement warned). The run is stopped by a real signal once the
    measured line is out."""
    lines = []

    def log(line: str) -> None:
        lines.append(line)
        if line.startswith("time   :") and "measured" in line:
            os.kill(os.getpid(), signal.SIGTERM)

    result = train_model(_config(tokens, tmp_path / "ckpt.pt", max_iters=10**12), log=log)
    assert result.stopped_by_signal and result.iteration == 3
    warnings = [line for line in lines if "this run would take" in line]
    assert len(warnings) == 1, lines  # the estimate's; the measurement does not repeat it
    warning = warnings[0]
    assert warning.startswith("warning: this run would take about ") and " d " in warning
    for flag in ("--model_size tiny", "--max_iters", "--batch_size", "--context_length"):
        assert flag in warning
    estimate, measured = _time_lines(lines)
    assert lines.index(warning) == lines.index(estimate) + 1
    assert "1,000,000,000,000 steps about " in measured and " d " in measured


def test_a_stop_signal_drops_a_step_only_while_it_has_barely_begun():
    clock = StepClock()
    clock.begin()
    assert clock.barely_begun()  # no step has finished in this process: nothing to compare with
    clock.steps, clock.seconds = 2, 2.0  # two steps of one second each
    clock.started = time.perf_counter() - 0.1
    assert clock.barely_begun()
    clock.started = time.perf_counter() - 0.9
    assert not clock.barely_begun()  # most of it done: finished, as between steps


# ---- a stop signal inside a step --------------------------------------------------------------


class _SignalInside:
    """Sends a real SIGINT to this process from inside the model's forward or backward pass of
    the `at`-th training step (counted by the model's forward calls with gradients on), after
    `delay` seconds there. Module hooks of the test's own, removed at exit."""

    def __init__(self, where: str, at: int = 1, delay: float = 0.0):
        self.where, self.at, self.delay, self.calls = where, at, delay, 0

    def __enter__(self):
        self.handle = torch.nn.modules.module.register_module_forward_hook(self._after_forward)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def _after_forward(self, module, _inputs, output):
        if not isinstance(module, TransformerLM) or not torch.is_grad_enabled():
            return
        self.calls += 1
        if self.calls != self.at:
            return
        if self.where == "forward":
            self._send()  # the forward is over but for the loss; the next module is the loss's
        else:
            output.register_hook(lambda _grad: self._send())  # the backward's first gradient

    def _send(self):
        time.sleep(self.delay)
        os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_signal_inside_the_first_step_drops_it_and_the_run_resumes_bit_exact(tokens, tmp_path, where):
    straight = train_model(_config(tokens, tmp_path / "straight.pt"), log=lambda _l: None)
    ckpt = tmp_path / "ckpt.pt"
    lines = []
    with _SignalInside(where, at=1):
        stopped = train_model(_config(tokens, ckpt), log=lines.append)
    assert stopped.stopped_by_signal and stopped.iteration == 0
    dropped = [line for line in lines if "the step in progress was dropped" in line]
    assert len(dropped) == 1 and "inside its forward or backward pass" in dropped[0] and "step 1" in dropped[0]
    assert "the checkpoint holds iter 0" in dropped[0]
    payload = read_checkpoint(ckpt)
    assert payload["iteration"] == 0 and payload["sampler"]["step"] == 0 and payload["sampler"]["micro"] == 0
    assert all(not s for s in payload["optimizer_state_dict"]["state"].values())  # no update was taken

    resumed = train_model(_config(tokens, ckpt), resume_from=str(ckpt), log=lambda _l: None)
    assert resumed.iteration == 4 and resumed.losses == straight.losses
    ours, theirs = _weights(ckpt), _weights(tmp_path / "straight.pt")
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


def test_a_signal_late_in_a_step_lets_it_finish(tokens, tmp_path):
    """In step 3's backward, after a second's wait: far past half of a step of the tiny model."""
    ckpt = tmp_path / "ckpt.pt"
    lines = []
    with _SignalInside("backward", at=3, delay=1.0):
        stopped = train_model(_config(tokens, ckpt, max_iters=6), log=lines.append)
    assert stopped.stopped_by_signal and stopped.iteration == 3
    assert not [line for line in lines if "dropped" in line]
    assert read_checkpoint(ckpt)["iteration"] == 3


# Steps of seconds: the spec's first step on a CPU, in small.
LONG_STEPS = flags(
    QUICK, vocab_size=64, d_model=256, num_heads=4, d_ff=1024, num_layers=4, context_length=256, batch_size=32
)


@pytest.mark.slow
def test_ctrl_c_in_a_long_first_step_ends_it_at_once_with_a_checkpoint(tokens, tmp_path):
    ckpt = tmp_path / "run" / "ckpt.pt"
    proc = spawn("train", "--train_data", tokens, *LONG_STEPS, "--max_iters", 10**6, "--checkpoint_path", ckpt)
    header = wait_for_line(proc, "Iter      0")
    time.sleep(0.5)  # inside step 1, which takes seconds
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    out = "".join(header) + out
    assert proc.returncode == 0, err
    assert "the step in progress was dropped" in out and "Iter      1" not in out, out
    assert "Stopped by signal at iter 0; resume with: lmtools resume" in out
    payload = read_checkpoint(ckpt)
    assert payload["iteration"] == 0 and payload["sampler"] == dict(payload["sampler"], step=0, micro=0)
    # Before step 1, the header said that this run takes days here, and what to change.
    warning = next(line for line in header if line.startswith("warning: this run would take"))
    assert "--model_size tiny" in warning and "--max_iters" in warning


# ---- named model sizes ----------------------------------------------------------------------------


def test_without_a_model_size_the_documented_defaults_stay():
    cfg = TrainConfig()
    shape = {name: getattr(cfg, name) for name in MODEL_SIZES["base"]}
    assert shape == dict(num_layers=12, d_model=768, num_heads=12, d_ff=3072, context_length=512)
    assert MODEL_SIZES["base"] == shape and cfg.model_size is None


def test_a_model_size_names_the_shape_and_shape_flags_override_it(tokens, tmp_path):
    ckpt = tmp_path / "run" / "ckpt.pt"
    result = run_cli(
        "train",
        "--train_data",
        tokens,
        *flags(QUICK, max_iters=2, batch_size=2),
        "--model_size",
        "tiny",
        "--d_model",
        "64",
        "--num_heads",
        "2",
        "--checkpoint_path",
        ckpt,
    )
    assert result.exit_code == 0, result.output
    assert "model  : tiny | 4 layers | d_model 64 | 2 heads | d_ff 512 |" in result.output
    payload = read_checkpoint(ckpt)
    shape = {key: payload["model_config"][key] for key in MODEL_SIZES["tiny"]}
    assert shape == dict(num_layers=4, d_model=64, num_heads=2, d_ff=512, context_length=64)
    assert payload["config"]["model_size"] == "tiny" and payload["user_config"]["model_size"] == "tiny"

    # The same command with --resume continues it; another size is refused.
    again = ["--model_size", "tiny", "--d_model", "64", "--num_heads", "2", "--checkpoint_path", ckpt, "--resume"]
    resumed = run_cli("train", "--train_data", tokens, *flags(QUICK, batch_size=2), *again, "--max_iters", "3")
    assert resumed.exit_code == 0, resumed.output
    assert read_checkpoint(ckpt)["iteration"] == 3
    other = run_cli("train", "--train_data", tokens, "--model_size", "small", "--checkpoint_path", ckpt, "--resume")
    assert "--model_size small contradicts the checkpoint" in error_line(other)


def test_a_model_size_in_a_run_config_and_with_init_from(tokens, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(f'train_data = "{tokens}"\nmodel_size = "tiny"\nnum_layers = 1\nbatch_size = 2\n')
    source = tmp_path / "source" / "ckpt.pt"
    # --train_data comes from the file alone: the help marks it required, the run accepts it.
    result = run_cli("train", "--config", config, *flags(QUICK, max_iters=2), "--checkpoint_path", source)
    assert result.exit_code == 0, result.output
    model = read_checkpoint(source)["model_config"]
    assert (model["num_layers"], model["d_model"], model["context_length"]) == (1, 128, 64)

    base = ["train", "--train_data", tokens, *flags(QUICK, max_iters=2, batch_size=2), "--init_from", source]
    new = tmp_path / "new" / "ckpt.pt"
    assert "--model_size small contradicts --init_from" in error_line(
        run_cli(*base, "--model_size", "small", "--checkpoint_path", new)
    )
    fine = run_cli(*base, "--model_size", "tiny", "--num_layers", "1", "--checkpoint_path", new)
    assert fine.exit_code == 0, fine.output
    assert read_checkpoint(new)["model_config"]["d_model"] == 128
    assert "--model_size must be one of tiny, small, base, medium, large" in error_line(
        run_cli(*base[:3], "--model_size", "huge", "--checkpoint_path", tmp_path / "x.pt")
    )


# ---- the run folder -------------------------------------------------------------------------------


def test_a_run_goes_to_a_run_folder_named_after_its_data(tokens, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    os.link(tokens, data / "shakespeare.npy")
    monkeypatch.chdir(tmp_path)
    command = ["train", "--train_data", "data/shakespeare.npy", *flags(TINY_MODEL, QUICK, max_iters=2)]
    first = run_cli(*command)
    assert first.exit_code == 0, first.output
    run = tmp_path / "runs" / "shakespeare"
    assert f"run    : runs{os.sep}shakespeare{os.sep} | checkpoint checkpoint.pt" in first.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "runs"]  # nothing in the current folder
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]
    written = (run / "checkpoint.pt").read_bytes()

    # The same command again is refused and changes nothing; with --resume it finds the run.
    assert "runs/shakespeare/checkpoint.pt already holds a checkpoint" in error_line(run_cli(*command))
    assert (run / "checkpoint.pt").read_bytes() == written
    resumed = run_cli(*command[:-2], "--max_iters", "3", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert read_checkpoint(run / "checkpoint.pt")["iteration"] == 3
    assert [json.loads(line)["iter"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]


def test_out_dir_run_dir_and_an_explicit_checkpoint_path(tokens, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["train", "--train_data", tokens, *flags(TINY_MODEL, QUICK, max_iters=1)]
    assert run_cli(*base, "--out_dir", "exp/a").exit_code == 0
    assert read_checkpoint(tmp_path / "exp" / "a" / "checkpoint.pt")["iteration"] == 1
    assert (tmp_path / "exp" / "a" / "metrics.jsonl").is_file()
    assert run_cli(*base, "--run-dir", "exp/b", "--checkpoint_path", "last.pt").exit_code == 0
    assert read_checkpoint(tmp_path / "exp" / "b" / "last.pt")["iteration"] == 1
    line = error_line(run_cli(*base, "--out_dir", "exp/c", "--checkpoint_path", tmp_path / "c.pt"))
    assert "both say where the run goes" in line and not (tmp_path / "exp" / "c").exists()
    # Named explicitly, checkpoint.pt is in the current folder, as the specification has it.
    assert run_cli(*base, "--checkpoint_path", "checkpoint.pt").exit_code == 0
    assert read_checkpoint(tmp_path / "checkpoint.pt")["iteration"] == 1
    assert not (tmp_path / "runs").exists()
