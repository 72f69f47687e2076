"""Generation: the KV cache changes nothing but speed; seeds make it reproducible."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import cli_output, one_line_error, run_cli
from lmtools import TransformerLM
from lmtools.generate import filter_logits, generate_ids, stream_text
from prepared import train_on_mixed


def model(ctx=32):
    torch.manual_seed(3)
    return TransformerLM(vocab_size=60, context_length=ctx, d_model=32, num_layers=2, num_heads=4, d_ff=64).eval()


@pytest.mark.parametrize("ctx", [32, 12])  # 12: generation runs past the context and re-prefills
def test_greedy_with_cache_equals_argmax_of_full_forward(ctx):
    m = model(ctx)
    prompt = [5, 17, 3, 42]
    out = list(generate_ids(m, prompt, 25, temperature=0))
    assert len(out) == 25
    tokens = list(prompt)
    with torch.no_grad():
        for got in out:
            window = tokens[-ctx:] if len(tokens) <= ctx else None
            if window is None:
                break  # past the first re-prefill the cached context is a shorter window
            assert got == int(m(torch.tensor([window]))[0, -1].argmax())
            tokens.append(got)


def test_fixed_seed_same_tokens_and_eot_stops():
    m = model()
    a = list(generate_ids(m, [1, 2], 30, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(7)))
    b = list(generate_ids(m, [1, 2], 30, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(7)))
    c = list(generate_ids(m, [1, 2], 30, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(8)))
    assert a == b and a != c
    eot = a[3]
    d = list(
        generate_ids(m, [1, 2], 30, temperature=1.0, top_p=0.9, eot_id=eot, generator=torch.Generator().manual_seed(7))
    )
    assert d == a[: a.index(eot)]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), k=st.integers(1, 20), p=st.floats(0.05, 1.0))
def test_filter_keeps_top_k_and_nucleus(seed, k, p):
    logits = torch.randn(20, generator=torch.Generator().manual_seed(seed))
    kept = torch.isfinite(filter_logits(logits, k, None))
    assert int(kept.sum()) == k and bool(kept[logits.argmax()])
    kept_p = torch.isfinite(filter_logits(logits, None, p))
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True)
    n = int(kept_p.sum())
    assert set(order[:n].tolist()) == set(torch.nonzero(kept_p).flatten().tolist())
    assert float(probs[order[:n]].sum()) >= p - 1e-6  # reaches p ...
    assert n == 1 or float(probs[order[: n - 1]].sum()) < p + 1e-6  # ... with the fewest tokens


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_on_mixed(tmp_path_factory.mktemp("sample"), max_iters=2, checkpoint_interval=2)[1]


@pytest.mark.parametrize(
    "option, value",
    [("--temperature", v) for v in ("nan", "inf", "-inf", "-1", "1e309")]
    + [("--seed", v) for v in ("-1", str(-(2**63) - 1), str(2**64), str(2**80))]
    + [("--top_k", v) for v in ("0", "-1")]
    + [("--top_p", v) for v in ("nan", "0", "1.5", "inf")],
)
def test_sample_refuses_a_sampling_option_out_of_range_in_one_line_before_printing(trained, option, value):
    result = run_cli("sample", trained, "--prompt", "the", "--max_new_tokens", "4", f"{option}={value}")
    line = one_line_error(result, option)
    assert value.lstrip("-") in line or "inf" in line, line
    assert result.stdout == ""  # refused before the prompt was printed


def test_sample_top_k_beyond_the_vocabulary_keeps_every_token_and_the_seed_takes_its_whole_range(trained):
    args = ("sample", trained, "--prompt", "the", "--max_new_tokens", "12", "--top_p", "1")
    assert cli_output(*args, "--top_k", "100000") == cli_output(*args)  # clamped to the vocabulary
    assert cli_output(*args, "--seed", str(2**64 - 1)) == cli_output(*args, "--seed", str(2**64 - 1))


@pytest.mark.parametrize("temperature", ["1e-300", "1e-320", "1e-40"])
def test_sample_a_tiny_positive_temperature_is_greedy_not_a_traceback(trained, temperature):
    # The logits over such a temperature overflow to inf (and NaN probabilities) unless shifted.
    args = ("sample", trained, "--prompt", "the", "--max_new_tokens", "12")
    assert cli_output(*args, "--temperature", temperature) == cli_output(*args, "--temperature", "0")


def test_a_huge_max_new_tokens_sets_nothing_aside():
    # An upper bound, not a size: the ids come one at a time, past the context length.
    ids = list(itertools.islice(generate_ids(model(ctx=12), [1, 2], 10**18, temperature=0), 100))
    assert len(ids) == 100


class CountingTokenizer:
    """The checkpoint's tokenizer, recording how many ids each decode call was given."""

    def __init__(self, tok):
        self.tok, self.lengths = tok, []

    def decode(self, ids, **kwargs):
        self.lengths.append(len(ids))
        return self.tok.decode(ids, **kwargs)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(0, 3000))
def test_stream_text_is_the_whole_decode_with_a_window_that_stays_small(trained_tokenizer, seed, n):
    """Streamed pieces join to the decode of all ids (incomplete UTF-8 held back, invalid bytes
    included), and no decode call sees more than the last few ids: a sample of any length (a huge
    --max_new_tokens) takes constant time and memory per token, not time growing with the text."""
    tok = trained_tokenizer
    rng = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, tok.get_vocab_size(), (n,), generator=rng).tolist()
    counting = CountingTokenizer(tok)
    pieces = list(stream_text(counting, iter(ids)))
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=False)
    assert all(pieces)
    assert max(counting.lengths, default=0) <= 64, max(counting.lengths)


@pytest.fixture(scope="module")
def trained_tokenizer(trained):
    from lmtools.checkpoint import read_checkpoint, tokenizer_from_checkpoint

    return tokenizer_from_checkpoint(read_checkpoint(trained), None, trained)
