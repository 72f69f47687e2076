"""Names shared by everything that writes or reads a prepared folder.

`prepare` writes these files; `train`, `inspect`, `sample` and the tokenizer code read them;
`train` writes the metrics file that `plot` reads.
One definition here keeps the writer and the readers from drifting apart.
"""

from pathlib import Path
from typing import Any

from lmtools._sampler import NPY_MAGIC, TOKEN_DTYPES
from lmtools.errors import DataError

# The end-of-text token: the document separator of text corpora, and the id after every document.
EOT = "<|endoftext|>"

TRAIN_FILE = "train.npy"
VAL_FILE = "val.npy"
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
# The run's metrics, one JSON object a line, beside its checkpoint (written by train, read by plot).
METRICS_FILE = "metrics.jsonl"

# The integer types a token file may hold (defined once, by the extension that reads them), and
# the words that list them in messages. NPY_MAGIC: the first bytes of a .npy file.
__all__ = ["NPY_MAGIC", "TOKEN_DTYPES"]
ZIP_MAGIC = b"PK\x03\x04"  # a checkpoint torch saved (a zip archive)
PICKLE_PROTO = 0x80  # the first byte of a pickle (a checkpoint in torch's legacy format)
TOKEN_DTYPES_TEXT = ", ".join(TOKEN_DTYPES[:-1]) + " or " + TOKEN_DTYPES[-1]

# Held (flock) by the one `prepare` writing the folder; the kernel releases it if that process dies.
LOCK_FILE = ".prepare.lock"


def token_dtype_name(dtype: Any, where: object) -> str:
    """numpy's name of `dtype` when token files may hold it, else a DataError naming `where`."""
    import numpy as np

    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError, SyntaxError):  # numpy parses strings such as "01" or "0:" as code
        raise DataError(f"{where}: dtype {dtype!r} is not a numpy dtype; use {TOKEN_DTYPES_TEXT}") from None
    if dt.name not in TOKEN_DTYPES or dt.byteorder == ">":
        raise DataError(f"{where}: dtype {dtype!r} is not a token dtype; use {TOKEN_DTYPES_TEXT}")
    return dt.name


def file_head(p: Path, n: int = 512) -> bytes:
    """The first `n` bytes of a file, or a DataError naming it."""
    try:
        with open(p, "rb") as f:
            return f.read(n)
    except OSError as exc:
        raise DataError(f"cannot read {p}: {exc.strerror}") from None


def looks_like(p: Path, head: bytes) -> str:
    """A few words on what a file really is, judged by its first bytes."""
    if not head:
        return "an empty file"
    if head.startswith(NPY_MAGIC):
        return "a .npy array"
    if head.startswith(ZIP_MAGIC):
        return "a zip archive"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip file"
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if b"\x00" not in head:
        try:
            head.decode("utf-8")
            return f"a text file ({p.stat().st_size:,} bytes)"
        except UnicodeDecodeError as exc:
            if exc.start >= len(head) - 4:  # a character cut by the 512-byte window
                return f"a text file ({p.stat().st_size:,} bytes)"
    return "binary data of an unknown format"
