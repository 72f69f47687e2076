"""How long a run takes on its device, and a stop signal inside a step.

Before the first step the header gives an estimate: the step's FLOPs (`flops_per_token`: 6 per
parameter and token, plus attention) over the rate a short matmul reaches on the device, times
the share of that rate training reaches. Once a few steps have run, the measured time per step
and the whole run's time replace it. A run that would take more than a day is told so in one
line, with the flags that shorten it.

`StepClock` also holds the rule for a stop signal that arrives inside a step (one process only):
the step is dropped when no step has finished in this process yet, or when it has run less than
half a step's measured time; otherwise it is finished, as between steps.
"""

from __future__ import annotations

import time

import torch

DAY_S = 24 * 3600.0
# The measured line comes once this many steps, or this many seconds of steps, have run.
MEASURE_AFTER_STEPS = 3
MEASURE_AFTER_S = 30.0
# The share of a large matmul's rate that training is taken to reach (attention, norms, the
# optimizer's update and smaller matmuls run below it): an estimate's assumption, which the
# measured line after the first steps replaces.
TRAINING_SHARE_OF_MATMUL = 0.5
PROBE_BUDGET_S = 0.05


def matmul_rate(device: torch.device, dtype: torch.dtype, budget_s: float = PROBE_BUDGET_S) -> float:
    """FLOP/s of square matmuls on `device` in `dtype`, measured for about `budget_s` seconds."""
    n = 512 if device.type == "cpu" else 4096
    dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = _synchronizer(device)
    a @ b  # the first call sets up the kernels
    sync()
    reps, start = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= budget_s and reps >= 2:
            return 2 * n**3 * reps / elapsed


def _synchronizer(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def estimated_step_seconds(flops_per_step: float, rate: float) -> float:
    return flops_per_step / (rate * TRAINING_SHARE_OF_MATMUL)


def span(seconds: float) -> str:
    """A duration as a person reads it: 45 s, 12 min, 3 h 05 min, 2 d 19 h."""
    seconds = max(float(seconds), 0.0)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 60:
        return f"{minutes:.0f} min"
    hours = minutes / 60
    if hours < 24:
        return f"{int(hours)} h {int(minutes % 60):02d} min"
    return f"{int(hours // 24)} d {int(hours % 24)} h"


def per_step(seconds: float) -> str:
    return f"{seconds:.3g} s/step" if seconds >= 0.01 else f"{seconds * 1000:.3g} ms/step"


def too_long_warning(run_seconds: float, device: torch.device) -> str | None:
    """The one line that says a run would take days here, naming the flags that change it."""
    if run_seconds <= DAY_S:
        return None
    gpu = device.type == "cpu" and torch.cuda.is_available()
    return (
        f"warning: this run would take about {span(run_seconds)} on {device}; for a first run pass "
        f"--model_size tiny, or fewer --max_iters, a smaller --batch_size or --context_length"
        + (", or --device cuda" if gpu else "")
    )


class StepClock:
    """The steps this process ran and their time (evaluation, logs and checkpoints left out)."""

    def __init__(self):
        self.steps = 0
        self.seconds = 0.0
        self.started: float | None = None  # when the step in progress began
        self.reported = False

    def begin(self) -> None:
        self.started = time.perf_counter()

    def end(self) -> None:
        self.seconds += time.perf_counter() - self.started
        self.steps += 1
        self.started = None

    def add_wait(self, seconds: float) -> None:
        """Time the device still owed the steps (read at a synchronisation)."""
        self.seconds += seconds

    @property
    def step_seconds(self) -> float | None:
        return self.seconds / self.steps if self.steps else None

    def in_step(self) -> float:
        """Seconds the step in progress has run."""
        return 0.0 if self.started is None else time.perf_counter() - self.started

    def barely_begun(self) -> bool:
        """Whether a stop signal drops the step in progress: no step has finished in this process
        yet, or it has run less than half a step's time."""
        return self.steps == 0 or self.in_step() < 0.5 * self.step_seconds

    def due_report(self) -> bool:
        """Whether the measured line is due (once)."""
        return (
            not self.reported
            and self.steps > 0
            and (self.steps >= MEASURE_AFTER_STEPS or self.seconds >= MEASURE_AFTER_S)
        )
