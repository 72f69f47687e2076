"""Loss, clipping and the learning-rate schedule against their references."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmtools import AdamW, cross_entropy, run_get_lr_cosine_schedule, run_gradient_clipping


def _reference_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean -log softmax(logits)[target], by log-sum-exp in exact-enough float64 Python math."""
    rows = logits.double().reshape(-1, logits.shape[-1]).tolist()
    total = 0.0
    for row, t in zip(rows, targets.reshape(-1).tolist()):
        m = max(row)
        total += m + math.log(sum(math.exp(v - m) for v in row)) - row[t]
    return total / len(rows)


def test_cross_entropy_with_huge_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, 33, generator=g) * 1000
    targets = torch.randint(0, 33, (4, 7), generator=g)
    ours = cross_entropy(logits, targets)
    assert torch.isfinite(ours)
    assert math.isclose(float(ours), _reference_nll(logits, targets), rel_tol=1e-5)


def test_cross_entropy_of_bfloat16_logits_is_computed_in_float32():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(64, 500, generator=g) * 30).bfloat16()
    targets = torch.randint(0, 500, (64,), generator=g)
    ours = cross_entropy(logits, targets)
    assert ours.dtype == torch.float32
    assert math.isclose(float(ours), _reference_nll(logits, targets), rel_tol=1e-5)


@settings(max_examples=25, deadline=None)
@given(scale=st.floats(1e-3, 1e4), n=st.integers(1, 20), v=st.integers(2, 50), seed=st.integers(0, 10**6))
def test_cross_entropy_property(scale, n, v, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    targets = torch.randint(0, v, (n,), generator=g)
    expected = _reference_nll(logits.float(), targets)
    assert math.isclose(float(cross_entropy(logits, targets)), expected, rel_tol=1e-4, abs_tol=1e-4)


def _params_with_grads(seed):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(3, 4), (5,), (2, 2, 2)]]
    frozen = torch.nn.Parameter(torch.randn(6, generator=g), requires_grad=False)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * 3
    return ps + [frozen]


@pytest.mark.parametrize("max_norm", [1e-2, 1.0, 1e6])
def test_clipping_matches_torch(max_norm):
    ours, ref = _params_with_grads(1), _params_with_grads(1)
    norm = run_gradient_clipping(ours, max_norm)
    ref_norm = torch.nn.utils.clip_grad_norm_([p for p in ref if p.grad is not None], max_norm)
    torch.testing.assert_close(norm, ref_norm)
    for a, b in zip(ours, ref):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad)
    if max_norm < float(ref_norm):
        total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ours if p.grad is not None]))
        assert math.isclose(float(total), max_norm, rel_tol=1e-4)


def test_schedule_points():
    kw = dict(max_learning_rate=1.0, min_learning_rate=0.1, warmup_iters=10, cosine_cycle_iters=110)
    assert run_get_lr_cosine_schedule(0, **kw) == 0.0
    assert run_get_lr_cosine_schedule(5, **kw) == pytest.approx(0.5)
    assert run_get_lr_cosine_schedule(10, **kw) == pytest.approx(1.0)
    assert run_get_lr_cosine_schedule(60, **kw) == pytest.approx(0.55)
    assert run_get_lr_cosine_schedule(110, **kw) == pytest.approx(0.1)
    assert run_get_lr_cosine_schedule(111, **kw) == 0.1
    assert run_get_lr_cosine_schedule(10**9, **kw) == 0.1


@settings(max_examples=100, deadline=None)
@given(
    it=st.integers(0, 5000),
    warmup=st.integers(0, 1000),
    cycle_extra=st.integers(0, 4000),
    lo=st.floats(0, 1e-3),
    hi=st.floats(1e-3, 1.0),
)
def test_schedule_properties(it, warmup, cycle_extra, lo, hi):
    cycle = warmup + cycle_extra
    lr = run_get_lr_cosine_schedule(it, hi, lo, warmup, cycle)
    if it < warmup:
        assert lr == pytest.approx(it / warmup * hi)
    else:
        assert lo - 1e-12 <= lr <= hi + 1e-12
        nxt = run_get_lr_cosine_schedule(it + 1, hi, lo, warmup, cycle)
        assert nxt <= lr + 1e-12  # never rises after warmup


def test_adamw_is_torch_decoupled():
    assert AdamW is torch.optim.AdamW
    p = torch.nn.Parameter(torch.ones(3))
    opt = AdamW([p], lr=0.1, weight_decay=0.5)
    p.grad = torch.zeros(3)
    opt.step()
    # zero gradient: only decoupled decay acts, p <- p * (1 - lr * wd)
    torch.testing.assert_close(p.detach(), torch.full((3,), 0.95))
