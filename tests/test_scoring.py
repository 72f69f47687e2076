"""`lmtools eval`: sliding windows, loss, perplexity and bits per byte, and agreement with training."""

import json
import math
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import PROCESS_ENV, cli_output, run_cli
from lmtools import scoring
from lmtools.checkpoint import read_checkpoint, save_checkpoint
from lmtools.data import corpus
from lmtools.data.corpus import PIECE_CHARS, ReadOptions
from lmtools.data.tokenizer import EOT, bytes_tokenizer, train_bpe
from lmtools.errors import ConfigError, DataError
from lmtools.model import TransformerLM
from lmtools.scoring import read_file, score_file, score_sequence, window_plan
from prepared import train_on_mixed
from texts import eot_joined, prose


def tiny_model(ctx=8, vocab=257) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(vocab, ctx, 16, 1, 2, 32).eval()


def tiny_checkpoint(path, ctx=8) -> TransformerLM:
    """The tiny model saved with a bytes tokenizer and no training config."""
    model = tiny_model(ctx=ctx)
    save_checkpoint(
        model, None, 1, path, model_config=model.config.to_dict(), tokenizer_json=bytes_tokenizer().to_str()
    )
    return model


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 300), ctx=st.integers(1, 40), data=st.data())
def test_every_token_is_scored_once_with_the_context_the_stride_allows(n, ctx, data):
    stride = data.draw(st.integers(1, ctx))
    scored = []
    for start, end, k in window_plan(n, ctx, stride):
        assert 0 <= start < end <= n - 1 and end - start <= ctx and 1 <= k <= end - start
        for target in range(end - k + 1, end + 1):
            scored.append(target)
            assert target - start >= min(target, ctx - stride + 1)  # tokens of left context
    assert scored == list(range(1, n))


def test_bad_strides_are_refused():
    for stride in (0, 9):
        with pytest.raises(ConfigError, match="--stride"):
            window_plan(100, 8, stride)


def _nll(model, context, target) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([context]))[0, -1]
    return float(F.cross_entropy(logits.float()[None], torch.tensor([target])))


def test_stride_one_scores_each_token_on_its_full_context():
    model = tiny_model()
    ids = np.random.default_rng(0).integers(0, 257, 30)
    nll, scored = score_sequence(model, ids, stride=1, batch_size=4)
    expected = sum(_nll(model, ids[max(0, j - 8) : j].tolist(), int(ids[j])) for j in range(1, 30))
    assert scored == 29 and nll == pytest.approx(expected, rel=1e-5)


def test_stride_equal_to_context_scores_disjoint_windows():
    model = tiny_model()
    ids = np.random.default_rng(1).integers(0, 257, 3 * 8 + 1)
    nll, scored = score_sequence(model, ids, stride=8, batch_size=2)
    x = torch.from_numpy(ids[:-1]).view(3, 8)
    y = torch.from_numpy(ids[1:]).view(3, 8)
    with torch.no_grad():
        expected = float(F.cross_entropy(model(x).transpose(1, 2), y, reduction="sum"))
    assert scored == 24 and nll == pytest.approx(expected, rel=1e-5)


def test_text_is_scored_as_its_token_file_and_counted_in_bytes(tmp_path):
    # A text is one document (no separator in it) followed by the end-of-text id, as prepare
    # writes it. With the byte tokenizer every UTF-8 byte is one token: bits per byte is the
    # loss in bits (prepare's bytes per token leaves end-of-text ids out).
    model, tok = tiny_model(ctx=16), bytes_tokenizer()
    text = "naïve café 東京\n" * 5 + "def f(x):\n    return x\n"
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    r = score_file(model, path, lambda: tok, stride=16, batch_size=3)
    n_bytes = len(text.encode("utf-8"))
    assert r.kind == "text" and r.tokens == n_bytes + 1 and r.scored == n_bytes and r.documents == 1
    ids = [*tok.encode(text, add_special_tokens=False).ids, tok.token_to_id(EOT)]
    nll, _ = score_sequence(model, np.array(ids), 16, 3)
    assert r.nll == pytest.approx(nll) and r.perplexity == pytest.approx(math.exp(r.loss))
    assert r.bytes_per_token == 1.0 and r.bits_per_byte == pytest.approx(r.loss / math.log(2))


def test_token_files_use_bytes_per_token_from_meta_json(tmp_path):
    model = tiny_model()
    np.save(tmp_path / "val.npy", np.random.default_rng(2).integers(0, 257, 100).astype(np.uint16))
    r = score_file(model, tmp_path / "val.npy", None, stride=8, batch_size=8)
    assert r.kind == "tokens" and r.tokens == 100 and r.scored == 99
    assert r.bits_per_byte is None and "no bits per byte" in r.note
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 257, "bytes_per_token": 2.5}))
    r2 = score_file(model, tmp_path / "val.npy", None, stride=8, batch_size=8)
    assert r2.loss == r.loss and r2.bits_per_byte == pytest.approx(r.loss / math.log(2) / 2.5)


def test_bad_files_are_refused(tmp_path):
    model = tiny_model(vocab=100)
    np.save(tmp_path / "big.npy", np.array([1, 2, 300], dtype=np.uint16))
    with pytest.raises(DataError, match="token id 300"):
        score_file(model, tmp_path / "big.npy", None, stride=8, batch_size=1)
    (tmp_path / "bin.txt").write_bytes(b"ok\xff\xfe")
    with pytest.raises(DataError, match="not UTF-8"):
        score_file(model, tmp_path / "bin.txt", bytes_tokenizer, stride=8, batch_size=1)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="nothing to score"):
        score_file(model, tmp_path / "empty.txt", bytes_tokenizer, stride=8, batch_size=1)


def test_cli_errors_are_one_line(tmp_path):
    tiny_checkpoint(tmp_path / "c.pt")
    (tmp_path / "a.txt").write_text("hello there")
    for args, says in (
        ((tmp_path / "missing.txt",), "no such file"),
        ((tmp_path / "a.txt", "--stride", "0"), "--stride"),
    ):
        out = cli_output("eval", tmp_path / "c.pt", *args, code=2)
        assert says in out and "Traceback" not in out and len(out.strip().splitlines()) == 1
    report = json.loads(cli_output("eval", tmp_path / "c.pt", tmp_path / "a.txt", "--json"))
    assert report["files"][0]["scored"] == len("hello there") and report["stride"] == 8


@pytest.mark.slow
def test_eval_agrees_with_training_validation(tmp_path, monkeypatch):
    data, ckpt = train_on_mixed(tmp_path, max_iters=20, eval_interval=20, log_interval=10, eval_iters=3)
    metrics = read_checkpoint(ckpt)["metrics"]
    report = json.loads(cli_output("eval", ckpt, data / "val.npy", "--val_windows", "--json"))["files"][0]
    assert report["loss"] == pytest.approx(metrics["val_loss"], abs=1e-5)
    assert report["bits_per_byte"] == pytest.approx(metrics["val_bpb"], abs=1e-5)
    assert report["scored"] == 3 * 8 * 64

    # Whole files: a table with each file's figures; a text file gets bits per byte from its bytes.
    text = tmp_path / "story.txt"
    text.write_text("the cat sat on a mat and the dog ran to the café\n" * 40, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    table = cli_output("eval", ckpt, "data/val.npy", "story.txt", "--stride", "32")
    assert "data/val.npy" in table and "story.txt" in table and "bits/byte" in table and "stride 32" in table
    whole = json.loads(cli_output("eval", ckpt, data / "val.npy", text, "--json"))["files"]
    assert whole[0]["scored"] == whole[0]["tokens"] - 1 and whole[1]["bits_per_byte"] > 0
    # Trained on such text, the model beats uniform guessing over the vocabulary.
    assert whole[1]["loss"] < math.log(read_checkpoint(ckpt)["model_config"]["vocab_size"])


# ---------------------------------------------------------------------------------------------
# Text files of any shape: read in bounded pieces, with the ids of the whole text
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe():
    return train_bpe([[prose(300_000, 3)]], 1000)


def _document_ids(tok, parts: list[str]) -> np.ndarray:
    """Each document's ids on its own, then the end-of-text id: prepare's layout."""
    eot = tok.token_to_id(EOT)
    return np.array([i for part in parts for i in [*tok.encode(part, add_special_tokens=False).ids, eot]])


def test_a_megabytes_long_file_is_read_in_pieces_with_the_ids_of_its_whole_documents(bpe, tmp_path):
    # Documents of 200,000 characters cut into pieces of 4096: the cuts do not change the ids.
    path = tmp_path / "corpus.txt"
    docs = [prose(200_000, seed) for seed in range(20)]
    path.write_text(eot_joined(docs).replace("\n", "\r\n", 999), "utf-8")
    assert path.stat().st_size > 4_000_000
    parts = path.read_bytes().decode("utf-8").split(EOT)[:-1]  # the last: the newline after the last marker
    ids, kind, bpt, _ = read_file(path, lambda: bpe, bpe.get_vocab_size(), ReadOptions(piece_chars=4096))
    assert np.array_equal(ids, _document_ids(bpe, parts))
    assert bpt == pytest.approx(sum(len(p.encode("utf-8")) for p in parts) / (len(ids) - len(parts)))


def test_pieces_are_cut_finer_only_where_prepare_could_cut_them():
    words = prose(5000, 2)
    solid = "x" * 300  # no whitespace: stays whole, as prepare encodes it
    for piece in (corpus.Piece(words, False), corpus.Piece(words + solid + words, True), corpus.Piece("short", True)):
        out = list(scoring.finer_pieces([piece], 16))
        assert "".join(p.text for p in out) == piece.text
        assert [p.doc_end for p in out] == [False] * (len(out) - 1) + [piece.doc_end]
        assert all(len(p.text) <= 64 or solid in p.text for p in out) and (len(out) > 100) == (piece.text != "short")
        for cut in np.cumsum([len(p.text) for p in out])[:-1]:  # where safe_cut may cut
            assert piece.text[cut] in " \n" and not piece.text[cut - 1].isspace()


def _within(seconds: int):
    """Fails the test where the code under it does not answer in `seconds` (a hang)."""

    def expired(*_):
        raise AssertionError(f"no answer within {seconds} s")

    signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)


class _LongestInput:
    """The tokenizer, noting the longest text it is handed in one call."""

    def __init__(self, tok):
        self.tok, self.longest = tok, 0

    @property
    def encode_special_tokens(self):
        return self.tok.encode_special_tokens

    @encode_special_tokens.setter
    def encode_special_tokens(self, value):
        self.tok.encode_special_tokens = value

    def token_to_id(self, token):
        return self.tok.token_to_id(token)

    def encode(self, text, **kwargs):
        self.longest = max(self.longest, len(text))
        return self.tok.encode(text, **kwargs)

    def encode_batch_fast(self, texts, **kwargs):
        self.longest = max([self.longest, *map(len, texts)])
        return self.tok.encode_batch_fast(texts, **kwargs)


def test_a_text_of_one_20_megabyte_line_is_tokenized_in_bounded_pieces(bpe, tmp_path):
    # One tokenizer call on a whole line without spaces grows faster than the line (a 20 MB one
    # took over a minute and gigabytes): no call may see more than one of prepare's pieces. The
    # alarm only tells a hang from an answer (it takes seconds).
    line = "".join(w.capitalize() for w in prose(600_000, 5).replace(".", " ").split())[:400_000] * 50
    path = tmp_path / "line.txt"
    path.write_text(line, encoding="utf-8")
    tok = _LongestInput(bpe)
    _within(120)
    try:
        ids, kind, bpt, _ = read_file(path, lambda: tok, bpe.get_vocab_size())
    finally:
        signal.alarm(0)
    assert len(line) == 20_000_000 and 0 < tok.longest <= PIECE_CHARS
    assert kind == "text" and ids[-1] == bpe.token_to_id(EOT)
    assert bpt == pytest.approx(len(line.encode()) / (len(ids) - 1))
    assert bpe.decode(ids[:-1].tolist(), skip_special_tokens=False) == line  # the bytes, exactly


def test_folders_and_negative_ids_are_named_as_such(tmp_path):
    model = tiny_model(vocab=100)
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "val.npy", np.array([1, 2, 3], dtype=np.uint16))
    with pytest.raises(DataError, match=rf"is a folder, not a file; to score its tokens, give {data / 'val.npy'}"):
        score_file(model, data, None, stride=8, batch_size=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is a folder, not a file; give a text file or a .npy token file"):
        score_file(model, tmp_path / "empty", None, stride=8, batch_size=1)
    np.save(tmp_path / "neg.npy", np.array([5, 7, -3, 200], dtype=np.int32))
    with pytest.raises(DataError, match=r"token 2 is -3, a negative id \(ids run from 0 to 99\)"):
        score_file(model, tmp_path / "neg.npy", None, stride=8, batch_size=1)


def test_every_eval_error_is_one_line_on_stderr_of_a_real_process(tmp_path):
    # Rich ended its progress bar with an empty line on a pipe, before the error.
    tiny_checkpoint(tmp_path / "c.pt")
    (tmp_path / "a.txt").write_text("hello there")
    (tmp_path / "folder").mkdir()
    np.save(tmp_path / "neg.npy", np.array([1, -1], dtype=np.int32))
    for args, says in (
        (["a.txt", "missing.txt"], "missing.txt: no such file"),
        (["folder"], "is a folder, not a file"),
        (["a.txt", "neg.npy"], "a negative id"),
        (["a.txt", "--stride", "9"], "--stride must be between 1 and the context length 8, got 9"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "lmtools.cli", "eval", "c.pt", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=PROCESS_ENV,
            timeout=120,
        )
        assert result.returncode == 2 and result.stdout == "", (args, result)
        assert result.stderr.splitlines() == [result.stderr.strip()] and says in result.stderr, (args, result.stderr)
        assert result.stderr.startswith("error:")


# ---------------------------------------------------------------------------------------------
# Streaming: any file in bounded memory, the same scores, progress, a stop signal
# ---------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 300), ctx=st.integers(1, 40), data=st.data())
def test_windows_streamed_in_any_chunks_are_the_plan_s_windows(n, ctx, data):
    stride = data.draw(st.integers(1, ctx))
    ids = np.arange(n, dtype=np.int64) * 7
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=12)))
    chunks = [ids[a:b] for a, b in zip([0, *cuts], [*cuts, n])]
    streamed = list(scoring.stream_windows(iter(chunks), ctx, stride))
    assert [(s, e, k) for s, e, k, _ in streamed] == window_plan(n, ctx, stride)
    for s, e, _, row in streamed:
        assert np.array_equal(row, ids[s : e + 1])


def test_a_file_scores_the_same_whatever_the_size_of_the_blocks_read(tmp_path, monkeypatch):
    model, tok = tiny_model(ctx=16), bytes_tokenizer()
    np.save(tmp_path / "val.npy", np.random.default_rng(3).integers(0, 257, 5000).astype(np.uint16))
    docs = [prose(n, seed) for seed, n in enumerate((1500, 50, 3000, 2500))]
    (tmp_path / "t.txt").write_text(eot_joined(docs), encoding="utf-8")
    whole = {p: score_file(model, tmp_path / p, lambda: tok, stride=5, batch_size=3) for p in ("val.npy", "t.txt")}
    assert whole["t.txt"].documents == 4
    for chunk, block, batch in ((1, 13, 1), (7, 999, 64), (4096, 1 << 20, 1 << 20)):
        monkeypatch.setattr(scoring, "TOKEN_CHUNK", chunk)
        monkeypatch.setattr(corpus, "READ_BLOCK", block)
        monkeypatch.setattr(scoring, "TEXT_BATCH", batch)
        for p, expected in whole.items():
            r = score_file(model, tmp_path / p, lambda: tok, stride=5, batch_size=3)
            assert (r.nll, r.scored, r.tokens, r.bytes_per_token) == (
                expected.nll,
                expected.scored,
                expected.tokens,
                expected.bytes_per_token,
            )


# The peak resident memory of the process, read as it exits: VmHWM starts again at exec, while
# getrusage's ru_maxrss of a child would start from its parent's size at fork.
_REPORT_PEAK = (
    "import atexit, runpy, sys\n"
    "def report():\n"
    "    peak = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
    "    sys.stderr.write('peak ' + peak.split()[1] + '\\n')\n"
    "atexit.register(report)\n"
    "sys.argv = ['lmtools', *sys.argv[1:]]\n"
    "runpy.run_module('lmtools.cli', run_name='__main__')\n"
)


def _peak_rss_mb(*args) -> float:
    """The peak resident memory of `lmtools ARGS` run as a process of its own (MB)."""
    result = subprocess.run(
        [sys.executable, "-c", _REPORT_PEAK, *map(str, args)],
        env=PROCESS_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return int(result.stderr.splitlines()[-1].removeprefix("peak ")) / 1024


@pytest.mark.slow
def test_eval_memory_does_not_grow_with_the_file(tmp_path):
    # Before streaming, eval held the file's ids twice over (int64, then concatenated) and
    # scanned a memory-mapped token file whole: +107 MB and +57 MB for 8 MB, growing with the
    # file (about +310 MB and +170 MB for the 24 MB here). The allocator's own jitter in the
    # peak of one process is up to about 55 MB whatever the file's size (measured at 8 and 24 MB,
    # beside CPU-bound load), so the files are large enough for a growth to stand out of it.
    tiny_checkpoint(tmp_path / "c.pt", ctx=256)
    rng = np.random.default_rng(0)
    words = np.array("the quick brown fox jumps over a lazy dog while wizards hex fjords\n".split(" "))
    for name, mb in (("small", 1), ("large", 24)):
        text = " ".join(rng.choice(words, size=int(mb * 200_000)))
        (tmp_path / f"{name}.txt").write_text(text[: int(mb * 1e6)], encoding="utf-8")
        np.save(tmp_path / f"{name}.npy", rng.integers(0, 257, int(mb * 1e6)).astype(np.int64))
    rss = {
        name: _peak_rss_mb("eval", tmp_path / "c.pt", tmp_path / name, "--batch_size", "64", "--json")
        for name in ("small.txt", "large.txt", "small.npy", "large.npy")
    }
    assert rss["large.txt"] - rss["small.txt"] < 96, rss  # 24M ids: 192 MB as int64
    assert rss["large.npy"] - rss["small.npy"] < 64, rss  # a 192 MB token file


def test_eval_says_how_far_it_is_on_a_pipe_and_its_throughput(tmp_path, monkeypatch):
    from lmtools.cli.eval import PlainProgress

    tiny_checkpoint(tmp_path / "c.pt")
    np.save(tmp_path / "val.npy", np.random.default_rng(2).integers(0, 257, 3000).astype(np.uint16))
    monkeypatch.setattr(PlainProgress, "INTERVAL", 0.0)
    result = run_cli("eval", tmp_path / "c.pt", tmp_path / "val.npy", "--batch_size", "4")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    batches = math.ceil(len(window_plan(3000, 8, 8)) / 4)
    assert len(lines) == batches + 1, lines  # a line per batch of 4 windows, then the throughput
    assert re.fullmatch(
        rf"eval: {re.escape(str(tmp_path / 'val.npy'))}: +\d+\.\d% of [\d.]+ kB, "
        r"\d+ tokens scored, [\d,]+ tokens/s, eta \d+ s",
        lines[0],
    ), lines[0]
    assert lines[-1].startswith(f"eval: {tmp_path / 'val.npy'}: 2,999 tokens scored in ")
    assert lines[-1].endswith(" tokens/s)")
    report = json.loads(cli_output("eval", tmp_path / "c.pt", tmp_path / "val.npy", "--json"))["files"][0]
    assert report["seconds"] > 0 and report["tokens_per_second"] == pytest.approx(2999 / report["seconds"])


@pytest.mark.slow
def test_a_stop_signal_ends_eval_of_a_long_file_at_once(tmp_path):
    tiny_checkpoint(tmp_path / "c.pt", ctx=256)
    np.save(tmp_path / "long.npy", np.random.default_rng(0).integers(0, 257, 16_000_000).astype(np.uint16))
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmtools.cli", "eval", "c.pt", "long.npy", "--batch_size", "1"],
        cwd=tmp_path,
        env=PROCESS_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = proc.stderr.readline()  # after PlainProgress.INTERVAL of scoring: minutes are left
    assert first.startswith("eval: long.npy: ") and " tokens scored" in first, first
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=10)  # a batch is one window: the signal is seen within milliseconds
    assert proc.returncode == 130 and proc.stderr.read() == "interrupted\n" and proc.stdout.read() == ""
