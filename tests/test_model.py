"""The model against its definition: causality, RoPE, RMSNorm, SwiGLU, shapes, KV cache."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmtools import TransformerLM, cross_entropy
from lmtools.errors import ConfigError
from lmtools.model import KVCache, RMSNorm, RotaryEmbedding, SwiGLU


def tiny(**kw) -> TransformerLM:
    torch.manual_seed(0)
    args = dict(vocab_size=50, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=64)
    args.update(kw)
    return TransformerLM(**args)


def test_logits_shape_and_no_biases():
    model = tiny()
    x = torch.randint(0, 50, (3, 16))
    assert model(x).shape == (3, 16, 50)
    assert not [n for n, _ in model.named_parameters() if n.endswith("bias")]


@settings(max_examples=15, deadline=None)
@given(t=st.integers(0, 14), new=st.integers(0, 49))
def test_causality(t, new):
    """Changing token t+1 never changes the logits at positions <= t."""
    model = tiny().eval()
    x = torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(t))
    y = x.clone()
    y[0, t + 1] = new
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[0, : t + 1], b[0, : t + 1], rtol=0, atol=1e-5)
    if new != x[0, t + 1]:
        assert not torch.allclose(a[0, t + 1 :], b[0, t + 1 :])


@settings(max_examples=20, deadline=None)
@given(i=st.integers(0, 60), j=st.integers(0, 60), shift=st.integers(1, 60))
def test_rope_scores_depend_only_on_offset(i, j, shift):
    rope = RotaryEmbedding(d_head=16, max_len=128)
    g = torch.Generator().manual_seed(i * 101 + j)
    q, k = torch.randn(16, generator=g), torch.randn(16, generator=g)

    def score(pi, pj):
        qi = rope(q.view(1, 16), torch.tensor([pi]))
        kj = rope(k.view(1, 16), torch.tensor([pj]))
        return float((qi * kj).sum())

    assert math.isclose(score(i, j), score(i + shift, j + shift), rel_tol=1e-4, abs_tol=1e-4)


def test_rope_rotates_adjacent_pairs():
    rope = RotaryEmbedding(d_head=4, max_len=8, theta=10000.0)
    x = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    out = rope(x, torch.tensor([3]))
    # pair 0 rotates by 3 rad, pair 1 by 3 * 10000^(-2/4) = 0.03 rad
    expected = torch.tensor([[math.cos(3), math.sin(3), math.cos(0.03), math.sin(0.03)]])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_rmsnorm_formula_and_float32():
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1, 9, dtype=torch.float32))
    x = torch.randn(2, 3, 8)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    xb = x.to(torch.bfloat16)
    assert norm(xb).dtype == torch.bfloat16
    torch.testing.assert_close(norm(xb).float(), norm(xb.float()).bfloat16().float())


def test_swiglu_formula():
    ffn = SwiGLU(8, 12)
    x = torch.randn(5, 8)
    w1, w2, w3 = ffn.w1.weight, ffn.w2.weight, ffn.w3.weight
    silu = lambda z: z * torch.sigmoid(z)  # noqa: E731
    expected = (silu(x @ w1.T) * (x @ w3.T)) @ w2.T
    torch.testing.assert_close(ffn(x), expected)


def test_kv_cache_matches_full_forward():
    model = tiny().eval()
    x = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.config.num_layers)
        prefix = model(x[:, :5], cache)
        chunk = model(x[:, 5:8], cache)
        steps = [model(x[:, t : t + 1], cache) for t in range(8, 12)]
    torch.testing.assert_close(torch.cat([prefix, chunk, *steps], dim=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kw, word",
    [
        (dict(d_model=30, num_heads=4), "divide"),
        (dict(num_layers=0), "num_layers"),
        (dict(vocab_size=-3), "vocab_size"),
        (dict(d_model=12, num_heads=4), "even"),
    ],
)
def test_bad_shapes_are_config_errors(kw, word):
    with pytest.raises(ConfigError, match=word):
        tiny(**kw)


def test_too_long_sequence_is_an_error():
    with pytest.raises(ValueError, match="context length"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


def test_flops_per_token_matches_torchs_flop_counter():
    """MFU's numerator: 6 x the matmul weights (lm_head included, embedding lookup not) plus
    attention at 3x its forward cost, checked against what torch counts for a real step."""
    from torch.utils.flop_counter import FlopCounterMode

    from lmtools.model import ModelConfig, non_embedding_params

    cfg = ModelConfig(vocab_size=256, context_length=64, d_model=64, num_layers=2, num_heads=4, d_ff=160)
    model = TransformerLM.from_config(cfg)
    x = torch.randint(0, cfg.vocab_size, (3, cfg.context_length))
    with FlopCounterMode(display=False) as counter:
        cross_entropy(model(x), x).backward()
    counts = {str(op): flops / x.numel() for op, flops in counter.get_flop_counts()["Global"].items()}
    matmul = sum(v for op, v in counts.items() if "scaled_dot_product" not in op)
    attention_forward = sum(v for op, v in counts.items() if "scaled_dot_product" in op and "backward" not in op)
    norm_weights = (2 * cfg.num_layers + 1) * cfg.d_model
    assert matmul == 6 * (non_embedding_params(cfg) - norm_weights)
    assert attention_forward == 4 * cfg.num_layers * cfg.d_model * cfg.context_length
    assert cfg.flops_per_token() == 6 * non_embedding_params(cfg) + 3 * attention_forward
    assert non_embedding_params(cfg) == model.num_parameters() - cfg.vocab_size * cfg.d_model


def test_reset_parameters_sets_every_weight_and_the_trainer_builds_from_the_seed_alone():
    """The trainer builds on the meta device and relies on reset_parameters for every value."""
    from lmtools.config.train_config import TrainConfig
    from lmtools.training.build import build_model

    cfg = TrainConfig(
        train_data=["unused"], vocab_size=97, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=48, seed=11
    )
    built = build_model(cfg, torch.device("cpu"))
    poisoned = TransformerLM.from_config(cfg.model_config())
    with torch.no_grad():
        for t in [*poisoned.parameters(), *poisoned.buffers()]:
            t.fill_(float("nan"))
    torch.manual_seed(11)
    poisoned.reset_parameters()
    for (name, a), b in zip(built.state_dict().items(), poisoned.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(built.rope.cos, poisoned.rope.cos) and torch.equal(built.rope.sin, poisoned.rope.sin)
    torch.manual_seed(12345)  # the global RNG does not matter, only the run's seed
    again = build_model(cfg, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), again.state_dict().values()))
