"""Type stubs for the Rust extension `lmtools._sampler` (source: rust_sampler/src/python.rs).

Every error the extension raises for bad data or arguments is `lmtools.errors.DataError`.
"""

from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

__version__: str
# The integer types a token file may hold (numpy names), and the first bytes of a .npy file.
TOKEN_DTYPES: tuple[str, ...]
NPY_MAGIC: bytes
# The target id `fill` writes where a loss mask is 0 (-100: torch's default ignore_index).
IGNORE_INDEX: int

class TokenFile:
    """One token file (memory-mapped by Rust) or an in-memory array lent through the buffer
    protocol (kept alive and pinned while any sampler uses it)."""

    @staticmethod
    def open(path: str | PathLike[str], dtype: str | None = None) -> TokenFile:
        """`.npy` (dtype from the checked header) or raw little-endian tokens (dtype required:
        uint16, uint32, int32 or int64)."""
    @staticmethod
    def open_mask(path: str | PathLike[str]) -> TokenFile:
        """A loss mask: a 1-D uint8 `.npy` ("|u1"), one value per token of its token file, 1
        where that token is a training target. Any other dtype, or a raw file, is a DataError."""
    @staticmethod
    def from_buffer(array: Any, name: str | None = None) -> TokenFile:
        """A 1-D, C-contiguous, native-endian integer array, without copying."""
    @property
    def name(self) -> str: ...
    @property
    def path(self) -> Path | None:
        """The file's path; None for an array."""
    @property
    def dtype(self) -> str:
        """numpy name: "uint16", "uint32", "int32", "int64" (arrays: any integer type)."""
    @property
    def mmapped(self) -> bool: ...
    def __len__(self) -> int: ...
    def token_range(self) -> tuple[int, int] | None:
        """(min, max) token id by a parallel scan, remembered; None when empty."""

class Sampler:
    """Deterministic window sampler over groups of token files.

    `groups` is a list of `(weight, files)`: a row picks a group by weight, then a window
    uniformly among all windows of the group's files. Window starts in a file of length n run
    over 0..=n - context_length - 1; with `doc_eot`, only over the document starts among them
    (0 and every position after a token equal to `doc_eot`), each equally likely. With
    `vocab_size`, `fill` refuses (DataError naming the file and the id) a batch holding an id
    outside 0..vocab_size.

    `masks` (chat data) is None or one entry per file of `files` (groups flattened, in order):
    a loss mask from `TokenFile.open_mask`, as long as its token file, or None (every target of
    that file trained). A masked file's targets are IGNORE_INDEX wherever its mask is 0, and
    with `doc_eot` its windows start only at conversation starts: positions p with
    tokens[p] == doc_eot and mask[p] == 0. A mask of another length, a list of another length
    or a masked file with no conversation start that fits is a DataError.
    """

    def __init__(
        self,
        groups: Sequence[tuple[float, Sequence[TokenFile]]],
        context_length: int,
        num_threads: int | None = None,
        doc_eot: int | None = None,
        vocab_size: int | None = None,
        masks: Sequence[TokenFile | None] | None = None,
    ) -> None: ...
    def fill(
        self,
        inputs: Any,
        targets: Any,
        seed: int,
        rank: int = 0,
        step: int = 0,
        micro: int = 0,
        *,
        mask: Any = None,
    ) -> None:
        """Gathers the batch of (seed, rank, step, micro) into `inputs` and `targets`:
        writable, C-contiguous int64 arrays of the same shape (batch_size, context_length).
        A masked file's targets are IGNORE_INDEX where its mask is 0 (inputs never are).
        `mask`, when given (a writable, C-contiguous uint8 array of that shape), receives each
        row's mask values mask[s + 1 : s + T + 1] (all ones for a file without a mask).
        Runs in parallel with the GIL released."""
    def windows(
        self, batch_size: int, seed: int, rank: int = 0, step: int = 0, micro: int = 0
    ) -> list[tuple[int, int]]:
        """(index into `files`, start) for each row of that batch."""
    @property
    def context_length(self) -> int: ...
    @property
    def num_tokens(self) -> int: ...
    @property
    def num_windows(self) -> int: ...
    @property
    def document_aligned(self) -> bool: ...
    @property
    def vocab_size(self) -> int | None:
        """The id bound batches are checked against (0..vocab_size), or None."""
    @property
    def masked(self) -> bool:
        """Whether any file has a loss mask."""
    @property
    def files(self) -> list[TokenFile]: ...

def read_npy_header(path: str | PathLike[str]) -> tuple[str, int, int]:
    """Checks a `.npy` token file: (dtype name, token count, byte offset of the data)."""
