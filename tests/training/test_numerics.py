"""The numerics guard and the torch hook it relies on to skip an update on the device."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

from lmtools.runtime.distributed import DistInfo
from lmtools.training.numerics import NumericsGuard, TrainingDiverged, step_unless_found_inf
from lmtools.training.optim import make_optimizer


def model_with_grads(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    model(torch.randn(5, 8)).square().mean().backward()
    return model


def snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in model.parameters()]
    for state in optimizer.state.values():
        tensors += [v.detach().clone() for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_fused_adamw_takes_grad_scale_and_found_inf():
    """The hook is not public API: if a torch upgrade renames or drops it, this fails first."""
    names = [arg.name for arg in torch.ops.aten._fused_adamw_.default._schema.arguments]
    assert "grad_scale" in names and "found_inf" in names
    import torch.optim.adam as adam  # AdamW's fused path

    params = inspect.signature(adam._fused_adam).parameters
    assert "grad_scale" in params and "found_inf" in params
    assert 'getattr(self, "found_inf", None)' in inspect.getsource(adam.Adam.step)


def test_found_inf_one_skips_the_fused_update_and_zero_applies_it():
    model = model_with_grads()
    optimizer = make_optimizer(model, 1e-2, 0.1, torch.device("cpu"))
    assert optimizer.defaults["fused"]
    optimizer.step()  # a first step, so that there is optimizer state to keep
    twin = copy.deepcopy(model)
    for mine, theirs in zip(model.parameters(), twin.parameters()):
        theirs.grad = mine.grad.clone()
    twin_optimizer = make_optimizer(twin, 1e-2, 0.1, torch.device("cpu"))
    twin_optimizer.load_state_dict(optimizer.state_dict())

    before = snapshot(model, optimizer)
    step_unless_found_inf(optimizer, torch.ones(()))
    assert same(snapshot(model, optimizer), before)  # weights, moments and step count untouched
    assert not hasattr(optimizer, "found_inf")

    step_unless_found_inf(optimizer, torch.zeros(()))
    twin_optimizer.step()
    after = snapshot(model, optimizer)
    assert not same(after, before)
    # The plain step's update (to rounding: the kernel's found_inf path orders its arithmetic otherwise).
    torch.testing.assert_close(after, snapshot(twin, twin_optimizer), rtol=0, atol=1e-7)


def make_guard(model, **flags) -> tuple[NumericsGuard, torch.optim.Optimizer, list[str]]:
    optimizer = make_optimizer(model, 1e-2, 0.1, torch.device("cpu"))
    lines: list[str] = []
    options = dict(skip_nonfinite=False, skip_spikes=False, spike_zscore=6.0) | flags
    guard = NumericsGuard(
        optimizer,
        torch.amp.GradScaler("cpu", enabled=False),
        torch.float32,
        DistInfo(),
        log=lines.append,
        checkpoint_path="run.pt",
        **options,
    )
    return guard, optimizer, lines


def test_a_nonfinite_step_is_skipped_on_the_device_and_counted_when_read():
    model = model_with_grads()
    guard, optimizer, lines = make_guard(model, skip_nonfinite=True)
    assert guard.skips_on_device and not guard.reads_each_step
    optimizer.step()  # optimizer state exists, so that a skipped step has some to keep
    before = snapshot(model, optimizer)
    guard.step(1, torch.tensor(float("nan")), torch.tensor(1.0))
    assert same(snapshot(model, optimizer), before) and guard.pending  # skipped, not yet read
    guard.step(2, torch.tensor(2.5), torch.tensor(0.5))
    assert not same(snapshot(model, optimizer), before)
    assert guard.read() is False  # the newest step was applied
    assert guard.skipped == 1 and guard.losses[1] == 2.5 and guard.last_grad_norm == 0.5
    assert lines == ["Skipped update at iter 1: non-finite loss (nan) (1 skipped so far)"]
    assert guard.take_window()[1:] == [2.5] and guard.take_window() == []


def test_a_nonfinite_step_stops_the_run_when_read_without_skip_nonfinite():
    guard, _optimizer, _lines = make_guard(model_with_grads())
    guard.step(7, torch.tensor(1.0), torch.tensor(float("inf")))
    with pytest.raises(TrainingDiverged, match=r"non-finite gradient norm \(inf\) at iter 7.*run\.pt"):
        guard.read()


def test_skip_spikes_reads_every_step_before_its_update():
    model = model_with_grads()
    guard, optimizer, lines = make_guard(model, skip_spikes=True, spike_zscore=3.0)
    assert guard.reads_each_step
    for it in range(1, 40):
        guard.step(it, torch.tensor(2.0 + 0.01 * (it % 3)), torch.tensor(1.0))
        assert not guard.pending  # read before the update
    before = snapshot(model, optimizer)
    guard.step(40, torch.tensor(50.0), torch.tensor(1.0))
    assert same(snapshot(model, optimizer), before)
    assert guard.skipped == 1 and lines[-1].startswith("Skipped update at iter 40: loss spike")
