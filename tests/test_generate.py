"""Generation: the KV cache changes nothing but speed; seeds make it reproducible."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import cli_output, one_line_error, run_cli
from lmtools import TransformerLM
from lmtools.data.tokenizer import bytes_to_unicode, train_bpe, unicode_to_bytes
from lmtools.generate import filter_logits, generate_ids, stream_text, visible
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
    """The checkpoint's tokenizer seen only through its decode (as a tokenizer whose decoder is
    not byte-level is streamed), recording how many ids each decode call was given."""

    def __init__(self, tok):
        self.tok, self.lengths = tok, []

    def decode(self, ids, **kwargs):
        self.lengths.append(len(ids))
        return self.tok.decode(ids, **kwargs)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(0, 3000))
def test_stream_text_by_decode_is_the_whole_decode_with_a_window_that_stays_small(trained_tokenizer, seed, n):
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


# Japanese, Chinese and German with the escape codes of coloured terminal output, as scraped text holds them.
CJK_TEXT = (
    "東京の天気は晴れです。日本語の文章を書きます。北京欢迎你，我们一起学习中文。"
    "Straße über naïve Grüße, schöne Bücher. \x1b[31m赤い\x1b[0m 終わり\n"
)


@pytest.fixture(scope="module")
def cjk_tokenizer():
    """A byte-level BPE of 44 merges, trained on lines of CJK_TEXT's characters drawn at random:
    it merges frequent byte pairs, many of them parts of a character (a CJK lead and its first
    continuation byte), as a tokenizer of a large corpus does."""
    rng = np.random.default_rng(0)
    lines = ["".join(rng.choice(list(CJK_TEXT), 80)) for _ in range(200)]
    return train_bpe([lines], 300)


def byte_ids(tok, data: bytes) -> list[int]:
    """One byte token per byte: every multi-byte character split across tokens."""
    return [tok.token_to_id(bytes_to_unicode()[b]) for b in data]


def test_stream_text_holds_back_a_character_split_across_byte_tokens(cjk_tokenizer):
    pieces = list(stream_text(cjk_tokenizer, iter(byte_ids(cjk_tokenizer, "東京ß\x1b!".encode()))))
    assert pieces == ["東", "京", "ß", "\x1b", "!"]  # nothing before a character's last byte


def test_stream_text_of_bpe_tokens_ending_inside_characters_has_no_replacement(cjk_tokenizer):
    tok = cjk_tokenizer
    ids = tok.encode(CJK_TEXT).ids
    token_bytes = [bytes(unicode_to_bytes()[c] for c in tok.id_to_token(i)) for i in ids]
    ends = [sum(len(b) for b in token_bytes[: k + 1]) for k in range(len(ids))]
    data = CJK_TEXT.encode()
    # The tokenization cuts characters: some token ends on a UTF-8 continuation or lead byte.
    cut = [k for k, end in enumerate(ends[:-1]) if data[end] & 0xC0 == 0x80]
    assert len(cut) >= 5, cut
    pieces = list(stream_text(tok, iter(ids)))
    assert "".join(pieces) == CJK_TEXT and "\ufffd" not in "".join(pieces)
    # After each token, exactly the characters completed by then: a token ending inside one
    # gives the text up to the character before it (and nothing when that is all it adds).
    expected, shown = [], 0
    for end in ends:
        complete = len(data[:end].decode("utf-8", "ignore"))
        if complete > shown:
            expected.append(CJK_TEXT[shown:complete])
            shown = complete
    assert pieces == expected
    assert len(pieces) < len(ids)  # the held-back tokens gave no piece of their own


@pytest.mark.parametrize(
    "data, pieces",
    [
        (b"\xe6\x9d", ["\ufffd"]),  # the ids ran out inside a character: one replacement, at the end
        (b"\xe6\x9dA", ["\ufffdA"]),  # a character that cannot complete: replaced when that shows
        (b"\xb1\xe6\x9d\xb1", ["\ufffd", "東"]),  # a stray continuation byte alone is invalid at once
        (b"", []),
    ],
)
def test_stream_text_replaces_only_bytes_that_are_invalid_or_incomplete_at_the_end(cjk_tokenizer, data, pieces):
    ids = byte_ids(cjk_tokenizer, data)
    assert list(stream_text(cjk_tokenizer, iter(ids))) == pieces
    assert "".join(pieces) == cjk_tokenizer.decode(ids, skip_special_tokens=False)


@settings(max_examples=30, deadline=None)
@given(ids=st.lists(st.integers(0, 420), max_size=60))
def test_stream_text_by_bytes_joins_to_the_tokenizers_decode(cjk_tokenizer, ids):
    """Random ids (stray bytes, <|endoftext|>, ids past the vocabulary): the same text, and the
    same replacement characters, as the tokenizer's own decode of them all."""
    pieces = list(stream_text(cjk_tokenizer, iter(ids)))
    assert "".join(pieces) == cjk_tokenizer.decode(ids, skip_special_tokens=False)
    assert all(pieces)


def test_visible_escapes_the_control_characters_a_terminal_acts_on():
    text = "東\x1b[31m赤\x1b[0m\tß\r\n\x00\x07\x08\x7f\x9b\x85 ok\u00a0"
    assert visible(text) == "東\\x1b[31m赤\\x1b[0m\tß\\r\n\\x00\\x07\\x08\\x7f\\x9b\\x85 ok\u00a0"
    assert visible(CJK_TEXT.replace("\x1b", "")) == CJK_TEXT.replace("\x1b", "")


@pytest.fixture(scope="module")
def trained_tokenizer(trained):
    from lmtools.checkpoint import read_checkpoint, tokenizer_from_checkpoint

    return tokenizer_from_checkpoint(read_checkpoint(trained), None, trained)
