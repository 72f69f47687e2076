"""`lmtools prepare`: a text corpus -> token files, tokenizer and meta.json in one folder."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.filesize import decimal

from lmtools.cli.app import app, user_errors
from lmtools.data.corpus import Corpus
from lmtools.data.prepare import DEFAULT_TOKENIZER_SAMPLE, MAX_SHARDS, Progress
from lmtools.errors import ConfigError
from lmtools.layout import EOT

NO_SEPARATOR = "none"  # --separator none: one document per text file

_ESCAPES = {"\\n": "\n", "\\r": "\r", "\\t": "\t", "\\\\": "\\"}


def unescape(text: str) -> str:
    r"""`\n`, `\r`, `\t` and `\\` typed on a command line, as the characters they name."""
    out, i = [], 0
    while i < len(text):
        two = text[i : i + 2]
        if two in _ESCAPES:
            out.append(_ESCAPES[two])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _human_count(n: float) -> str:
    for unit in ("", "k", "M", "G"):
        if abs(n) < 1000 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}G"


class PlainProgress(Progress):
    """Where stderr is a pipe or a file: a plain line every INTERVAL seconds (rich's bar would
    only draw its last state there)."""

    INTERVAL = 5.0

    def phase(self, name: str, total_bytes: int | None) -> None:
        self.name, self.total = name, total_bytes
        self.nbytes = self.tokens = 0
        self.start = self.last = time.monotonic()
        size = f": {decimal(total_bytes)} of input" if total_bytes is not None else ""
        sys.stderr.write(f"prepare: {name}{size}\n")

    def advance(self, nbytes: int = 0, tokens: int = 0) -> None:
        self.nbytes += nbytes
        self.tokens += tokens
        now = time.monotonic()
        if now - self.last >= self.INTERVAL:
            self.last = now
            self._line(now)

    def _line(self, now: float) -> None:
        if self.total is None:
            sys.stderr.write(f"prepare: {self.name}: {now - self.start:.0f} s\n")
            return
        total = max(1, self.total)
        elapsed = max(now - self.start, 1e-9)
        rate = self.nbytes / elapsed
        eta = (total - self.nbytes) / rate if rate > 0 else 0.0
        tok = f", {_human_count(self.tokens / elapsed)} tokens/s" if self.tokens else ""
        sys.stderr.write(
            f"prepare: {self.name}: {100 * min(self.nbytes, total) / total:5.1f}%"
            f" {decimal(int(rate))}/s{tok}, eta {eta:.0f} s\n"
        )

    def done(self) -> None:
        self._line(time.monotonic())

    def note(self, text: str) -> None:
        sys.stderr.write(f"prepare: {text}\n")


class BarProgress(Progress):
    """On a terminal: rich's progress bar, one task per phase, with the token rate."""

    def __init__(self, console) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import (
            Progress as RichProgress,
        )

        self.bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TransferSpeedColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=console or Console(stderr=True),
            transient=False,
        )
        self.task = None

    def phase(self, name: str, total_bytes: int | None) -> None:
        if self.task is None:
            self.bar.start()
        self.task = self.bar.add_task(name, total=total_bytes, rate="")
        self.tokens, self.start = 0, time.monotonic()

    def advance(self, nbytes: int = 0, tokens: int = 0) -> None:
        fields = {}
        if tokens:
            self.tokens += tokens
            rate = self.tokens / max(time.monotonic() - self.start, 1e-9)
            fields["rate"] = f"{_human_count(rate)} tok/s"
        self.bar.update(self.task, advance=nbytes, **fields)

    def done(self) -> None:
        task = self.bar.tasks[-1]
        if task.total is None:
            self.bar.update(self.task, total=1, completed=1)
        else:
            self.bar.update(self.task, completed=task.total)
        if task.description == "encode":
            self.bar.stop()

    def note(self, text: str) -> None:
        self.bar.console.print(f"prepare: {text}", markup=False, highlight=False)

    def stop(self) -> None:
        self.bar.stop()


class QuietProgress(Progress):
    """--quiet: no progress, but what the user must know (a resume, a fresh start) still."""

    def note(self, text: str) -> None:
        sys.stderr.write(f"prepare: {text}\n")


def _progress(quiet: bool, console=None) -> Progress:
    """A rich bar on a terminal, a plain line every few seconds when stderr is piped."""
    if quiet:
        return QuietProgress()
    return BarProgress(console) if sys.stderr.isatty() else PlainProgress()


@app.command(
    epilog=(
        "Documents: one per jsonl line or parquet row; in text files, the parts between "
        "separators (the literal <|endoftext|> unless --separator says otherwise; "
        "--separator none: one per text file). An <|endoftext|> id follows every "
        "document. In jsonl and parquet text, and in text files split at another separator, "
        "text that spells <|endoftext|> is encoded as ordinary text. Empty documents are "
        "skipped and counted; a document whose text repeats an earlier one exactly is "
        "removed and counted (--keep_duplicates keeps it). In folders and globs, files are "
        "recognised by name (.jsonl, .parquet, .gz) or by content (UTF-8 text); binary, "
        "non-UTF-8 and hidden files and second paths to a file are skipped and counted "
        "(meta.json lists the first of each). Validation: whole documents when they can make "
        "up about --val_fraction of the tokens, else the tail of the token stream, cut at a "
        "document boundary or a line end."
    )
)
@user_errors
def prepare(
    corpus: list[str] = typer.Argument(
        ...,
        metavar="CORPUS",
        help="Text (any name), .jsonl and .parquet files (.gz too), folders (searched "
        "recursively; text recognised by content) and glob patterns.",
        show_default=False,
    ),
    out: Path = typer.Option(Path("data"), "--out", "-o", help="Output folder."),
    tokenizer: Optional[str] = typer.Option(
        None,
        "--tokenizer",
        help="Use this tokenizer instead of training one: a tokenizer.json, a vocab.json "
        "(merges.txt beside it), a folder holding either, or `bytes` (256 bytes + "
        "<|endoftext|>).",
        show_default=False,
    ),
    vocab_size: int = typer.Option(
        10000, "--vocab_size", "--vocab-size", help="Size of the BPE to train (training only)."
    ),
    tokenizer_sample: int = typer.Option(
        DEFAULT_TOKENIZER_SAMPLE,
        "--tokenizer_sample",
        "--tokenizer-sample",
        help="Train the BPE on about this many bytes of whole documents sampled across the "
        "corpus (0: all of it). Training reads 2-3 MB/s; encoding is several times faster.",
    ),
    val_fraction: float = typer.Option(
        0.01,
        "--val_fraction",
        "--val-fraction",
        help="Share of the tokens held out in val.npy: whole documents when they can make "
        "it up, else the tail of the corpus.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the validation split."),
    text_field: str = typer.Option(
        "text", "--text_field", "--text-field", help="Field holding the text in .jsonl files."
    ),
    text_column: str = typer.Option(
        "text",
        "--text_column",
        "--text-column",
        help="Column holding the text in .parquet files.",
    ),
    separator: str = typer.Option(
        EOT,
        "--separator",
        help="Split text files into documents at this string (\\n, \\t, \\r, \\\\ are "
        "understood, so '\\n\\n' splits at blank lines); `none`: one document per file.",
    ),
    separator_line: Optional[str] = typer.Option(
        None,
        "--separator_line",
        "--separator-line",
        help="Split text files at every line that holds exactly this text, at a file's start "
        "and end too (e.g. '%' for fortune files, '---'); replaces --separator.",
        show_default=False,
    ),
    include: Optional[list[str]] = typer.Option(
        None,
        "--include",
        metavar="PATTERN",
        help="Read only the files whose name or path below the folder matches one of these "
        "shell patterns (repeatable; e.g. --include '*.md' --include '*.txt').",
        show_default=False,
    ),
    exclude: Optional[list[str]] = typer.Option(
        None,
        "--exclude",
        metavar="PATTERN",
        help="Leave out the files whose name or path below the folder matches (repeatable; "
        "e.g. --exclude '*.html' --exclude 'drafts/*').",
        show_default=False,
    ),
    keep_duplicates: bool = typer.Option(
        False,
        "--keep_duplicates",
        "--keep-duplicates",
        help="Keep documents whose text repeats an earlier one exactly (by default they are "
        "removed and counted, so no text is in both train and val).",
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite a dataset already prepared in --out."),
    threads: int = typer.Option(0, "--threads", help="Encoding processes (0: one per core).", show_default=True),
    shard: Optional[str] = typer.Option(
        None,
        "--shard",
        metavar="I/N",
        help="Encode only shard I of N (0 <= I < N) into --out, for `--merge` to join; needs "
        "--tokenizer. One per job of a job array, or per machine.",
        show_default=False,
    ),
    merge: bool = typer.Option(
        False,
        "--merge",
        help="CORPUS are the shard folders of one prepare: join them into the dataset in --out "
        "(the same token files one process writes; the settings come from the shards).",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Tokenize a text corpus into DIR/train.npy, val.npy, tokenizer.json and meta.json.\f

    Over 60 lines only for its option declarations; the body times `_prepare_with_progress`
    and prints the result.
    """
    started = time.monotonic()
    if merge:
        if shard is not None:
            raise ConfigError("--merge joins shard folders; it takes no --shard")
        meta = _prepare_with_progress(corpus, out, quiet, merge=True, force=force)
        _print_result(meta, time.monotonic() - started)
        return
    meta = _prepare_with_progress(
        corpus,
        out,
        quiet,
        shard=parse_shard(shard),
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        tokenizer_sample=tokenizer_sample,
        val_fraction=val_fraction,
        seed=seed,
        text_field=text_field,
        text_column=text_column,
        **_separators(separator, separator_line),
        include=include or (),
        exclude=exclude or (),
        keep_duplicates=keep_duplicates,
        force=force,
        threads=threads or None,
    )
    if shard is not None:
        typer.echo(shard_summary(meta, time.monotonic() - started))
        return
    _print_result(meta, time.monotonic() - started)


def _separators(separator: str, separator_line: str | None) -> dict:
    """prepare_corpus's separator and separator_line (the default separator, when neither is given)."""
    given = separator_options(None if separator == EOT else separator, separator_line)
    return {"separator": given.get("separator", EOT), "separator_line": separator_line}


def separator_options(separator: str | None, separator_line: str | None) -> dict:
    """The ReadOptions fields `--separator` and `--separator_line` set (None: not given), spelled
    and checked alike for `prepare` and `eval`."""
    from lmtools.data.prepare import check_separator_line

    if separator is not None and separator_line is not None:
        raise ConfigError("give --separator or --separator_line, not both")
    if separator == "":
        raise ConfigError("--separator must not be empty (`none` turns splitting off)")
    check_separator_line(separator_line)
    given: dict = {}
    if separator is not None:
        given["separator"] = None if separator == NO_SEPARATOR else unescape(separator)
    if separator_line is not None:
        given["separator_line"] = separator_line
    return given


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """`--shard I/N` as (I, N)."""
    if text is None:
        return None
    index, slash, count = text.partition("/")
    try:
        shard = int(index), int(count)
    except ValueError:
        shard = None
    if not slash or shard is None or not 0 <= shard[0] < shard[1] or shard[1] > MAX_SHARDS:
        raise ConfigError(f"--shard {text!r}: give I/N with 0 <= I < N <= {MAX_SHARDS:,}, e.g. --shard 0/4")
    return shard


def _prepare_with_progress(corpus: list[str], out: Path, quiet: bool, merge: bool = False, **options) -> dict:
    """`prepare_corpus` (or `merge_shards`) with progress on stderr; the bar is stopped however
    it ends."""
    from lmtools.data.prepare import merge_shards, prepare_corpus
    from lmtools.runtime.signals import TerminateAsInterrupt

    progress = _progress(quiet)
    try:
        with TerminateAsInterrupt():  # a scheduler's stop cleans up as Ctrl-C does
            if merge:
                return merge_shards(corpus, out, progress=progress, **options)
            return prepare_corpus(corpus, out, progress=progress, **options)
    finally:
        if hasattr(progress, "stop"):
            progress.stop()


def _print_result(meta: dict, seconds: float) -> None:
    """The summary line on stdout, notes on stderr."""
    typer.echo(summary(meta, seconds))
    for line in notes(meta):
        typer.echo(line, err=True)


def shard_summary(record: dict, seconds: float) -> str:
    index, count = record["shard"]
    return (
        f"{record['dir']}: shard {index}/{count}, {len(record['mine'])} of {len(record['units'])} units, "
        f"{record['tokens']:,} tokens ({_docs(record['documents'])}), {seconds:.1f} s; "
        f"join the {count} shard folders with `lmtools prepare --merge SHARD_DIR... --out DIR`"
    )


def _docs(n: int) -> str:
    return f"{n:,} document" + ("" if n == 1 else "s")


def summary(meta: dict, seconds: float) -> str:
    """The one line that says what was written."""
    bpt = meta["bytes_per_token"]
    split = meta.get("split") or {}
    given = 100 * split.get("val_fraction_given", 0.0)
    how = {"documents": "whole documents", "spans": "the tail"}.get(split.get("method"))
    share = f"; val {given:.2f}% of tokens by {how}" if how else ""
    empty = meta.get("empty_documents") or 0
    skipped = ""
    if empty:
        places = meta.get("empty_document_places") or []
        more = ", ..." if empty > len(places) else ""
        skipped = f"; {_docs(empty)} empty, skipped ({', '.join(places)}{more})"
    if duplicates := meta.get("duplicate_documents"):
        skipped += f"; {_docs(duplicates)} repeating an earlier one removed ({meta['duplicate_tokens']:,} tokens)"
    if files := Corpus(sources=[], skipped=meta.get("skipped_files") or {}).skipped_text():
        skipped += f"; {files} (meta.json: skipped_files)"
    train_docs = _docs(meta["train_documents"])
    if split.get("cuts_a_document"):  # the tail starts inside a document
        train_docs = f"{train_docs} and the start of another" if meta["train_documents"] else "the start of 1 document"
    return (
        f"{meta['dir']}: {meta['train_tokens']:,} train tokens "
        f"({train_docs}), {meta['val_tokens']:,} val tokens "
        f"({_docs(meta['val_documents'])}){share}; vocab {meta['vocab_size']:,} "
        f"({meta['tokenizer_kind']}), {bpt if bpt is not None else '-'} bytes/token"
        f"{skipped}, {seconds:.1f} s"
    )


def notes(meta: dict) -> list[str]:
    """One line for each thing that is not what was asked for."""
    out = []
    split = meta.get("split") or {}
    if split.get("method") == "none" and meta["val_fraction"] > 0:
        out.append(
            f"note: val.npy is empty: {split.get('reason')}; train will run without validation (use a larger corpus)"
        )
    if split.get("method") == "spans":
        n = meta["documents"]
        docs = "its one document cannot" if n == 1 else f"its {n:,} documents cannot"
        out.append(
            "note: val.npy is the tail of the corpus, not a seeded choice of documents ("
            f"{docs} make up {100 * meta['val_fraction']:g}% of the "
            "tokens closely enough): it is the end of the last file in path order, which may "
            "differ in kind from the rest; more or smaller documents, or --val_data of your own, "
            "give a validation set like the training text"
        )
    requested = meta.get("vocab_size_requested")
    if requested and meta["vocab_size"] < requested:
        out.append(
            f"note: the corpus ran out of merges: the tokenizer has {meta['vocab_size']:,} ids "
            f"of the {requested:,} asked for (--vocab_size); every pair of tokens that occurs "
            "is merged already"
        )
    return out
