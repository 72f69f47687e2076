"""What `lmtools sample` writes: CJK characters split across tokens come out whole (no U+FFFD),
and the control characters a model learnt from its data (terminal escape codes, carriage
returns) are escaped on a terminal and written as they are with --raw or into a pipe."""

import json
import os
import pty
import subprocess
import sys
import tty

import numpy as np
import pytest
import torch

from helpers import PROCESS_ENV, SMALLEST_MODEL, cli_output, flags, read_terminal, run_cli
from lmtools.checkpoint import model_from_payload, read_checkpoint, save_checkpoint, tokenizer_from_checkpoint
from lmtools.data.tokenizer import bytes_to_unicode
from lmtools.layout import EOT
from prepared import prepare

# Kanji cut into their bytes, the ESC of a colour code, a carriage return, DEL and the C1 CSI
# (U+009B): every byte distinct, so a model can map each one to the next.
TEXT = "東\x1b[31m赤ß\r\n京\x7f\u009b"
SHOWN = "東\\x1b[31m赤ß\\r\n京\\x7f\\x9b"  # as a terminal shows it

# Scraped text as the corpus: Japanese, Chinese and German lines, some coloured for a terminal.
LINES = [
    "東京の天気は晴れです。日本語の文章を書きます。",
    "北京欢迎你，我们一起学习中文。",
    "Straße über naïve Grüße, schöne Bücher.",
    "\x1b[31m赤い\x1b[0m 終わり\r",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint written by `lmtools train` on a prepared CJK corpus, whose weights are then
    set so that greedy decoding writes TEXT one byte token at a time and then <|endoftext|>."""
    root = tmp_path_factory.mktemp("sample_output")
    rng = np.random.default_rng(0)
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as f:
        for _ in range(200):
            f.write(json.dumps({"text": "\n".join(rng.choice(LINES, 4))}, ensure_ascii=False) + "\n")
    prepare(root / "corpus.jsonl", root / "data", "--vocab_size", 300, "--val_fraction", 0.1)
    ckpt = root / "ckpt.pt"
    run = flags(SMALLEST_MODEL, d_model=32, context_length=32, batch_size=2, max_iters=1, warmup_iters=1)
    cli_output("train", "--train_data", root / "data", *run, "--checkpoint_path", ckpt)

    payload = read_checkpoint(ckpt)
    tok = tokenizer_from_checkpoint(payload, None, ckpt)
    chain = [tok.token_to_id(EOT)] + [tok.token_to_id(bytes_to_unicode()[b]) for b in TEXT.encode()]
    chain.append(chain[0])
    model = model_from_payload(payload, ckpt)
    d = model.config.d_model
    assert len(set(chain[:-1])) == len(chain) - 1 <= d
    with torch.no_grad():
        # Each block adds nothing, so the last position holds its token's embedding: one basis
        # vector per token of the chain, and the head scores the token after it by that vector.
        for name, p in model.named_parameters():
            if name.endswith(("output_proj.weight", "w2.weight")):
                p.zero_()
        model.lm_head.weight.zero_()
        for i, (token, following) in enumerate(zip(chain, chain[1:])):
            model.token_embeddings.weight[token] = torch.eye(d)[i]
            model.lm_head.weight[following] = torch.eye(d)[i]
    rest = {k: v for k, v in payload.items() if k not in ("model_state_dict", "optimizer_state_dict", "iteration")}
    save_checkpoint(model, None, payload["iteration"], ckpt, **rest)
    return ckpt


SAMPLE = ("--temperature", "0", "--max_new_tokens", "40")


def sample_on_a_terminal(ckpt, *args) -> bytes:
    """What `lmtools sample CKPT ARGS` writes to its stdout when that is a terminal (raw mode:
    the terminal itself changes no byte)."""
    primary, secondary = pty.openpty()
    tty.setraw(secondary)
    cmd = [sys.executable, "-m", "lmtools.cli", "sample", str(ckpt), *SAMPLE, *args]
    proc = subprocess.Popen(cmd, stdout=secondary, stderr=subprocess.PIPE, env=PROCESS_ENV)
    os.close(secondary)
    out = read_terminal(primary)
    os.close(primary)
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, stderr
    return out


def test_a_terminal_gets_whole_characters_and_escaped_control_codes(checkpoint):
    out = sample_on_a_terminal(checkpoint).decode("utf-8")
    assert out == SHOWN + "\n"
    assert "\ufffd" not in out and "\x1b" not in out and "\r" not in out


def test_raw_on_a_terminal_writes_the_control_codes_as_they_are(checkpoint):
    assert sample_on_a_terminal(checkpoint, "--raw") == (TEXT + "\n").encode()


def test_a_pipe_gets_the_text_as_it_is_and_escapes_when_asked(checkpoint):
    piped = run_cli("sample", checkpoint, *SAMPLE)
    assert piped.exit_code == 0, piped.output
    assert piped.stdout_bytes == (TEXT + "\n").encode()
    escaped = run_cli("sample", checkpoint, *SAMPLE, "--escape")
    assert escaped.stdout == SHOWN + "\n"
    # A prompt is shown the same way as the text that continues it.
    prompted = run_cli("sample", checkpoint, *SAMPLE, "--escape", "--prompt", "\x1b[2J", "--max_new_tokens", "1")
    assert prompted.stdout.startswith("\\x1b[2J")
