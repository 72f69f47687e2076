"""Names shared by everything that writes or reads a prepared folder.

`prepare` writes these files; `train`, `inspect`, `sample` and the tokenizer code read them;
`train` writes the metrics file that `plot` reads.
One definition here keeps the writer and the readers from drifting apart.
"""

from typing import Any

from lmtools.errors import DataError

# The end-of-text token: the document separator of text corpora, and the id after every document.
EOT = "<|endoftext|>"

TRAIN_FILE = "train.npy"
VAL_FILE = "val.npy"
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
# The run's metrics, one JSON object a line, beside its checkpoint (written by train, read by plot).
METRICS_FILE = "metrics.jsonl"

# The integer types a token file may hold, and the words that list them in messages.
TOKEN_DTYPES = ("uint16", "uint32", "int32", "int64")
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
