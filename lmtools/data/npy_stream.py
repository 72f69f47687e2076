"""Token files written as streams: a .npy whose length is known only at the end, filled from
arrays or by copying ranges of other .npy files (`NpyIds`) without reading them into memory."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

COPY_BYTES = 16 << 20  # bytes copied at a time where the kernel cannot copy them itself


class NpyWriter:
    """Appends to a 1-D .npy file whose length is only known at the end.

    The header is written for the largest possible length, so the final header (written by
    numpy's own helper, then padded with spaces as the format allows) always fits in place.
    The tokens written so far can be read back and rewritten (`read`, `write_at`, `truncate`):
    the split moves tokens within the file before it is finished.
    """

    def __init__(self, path: Path, dtype: np.dtype):
        import numpy as np

        self.path = path
        self.dtype = np.dtype(dtype)
        self.count = 0
        self._file = open(path, "w+b")
        self._header_len = len(self._header((1 << 63) - 1))
        self._file.write(self._header(0))

    def _header(self, n: int) -> bytes:
        from numpy.lib import format as npy

        buf = io.BytesIO()
        d = {"descr": npy.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (n,)}
        npy.write_array_header_1_0(buf, d)
        header = buf.getvalue()
        width = getattr(self, "_header_len", len(header))
        if len(header) < width:  # pad the dict with spaces before the final newline
            pad = width - len(header)
            body = header[10:-1] + b" " * pad + b"\n"
            header = header[:8] + len(body).to_bytes(2, "little") + body
        return header

    def append(self, tokens: np.ndarray) -> None:
        if len(tokens):
            self._file.write(tokens.astype(self.dtype, copy=False).data)
            self.count += len(tokens)

    def append_from(self, source: NpyIds, start: int, n: int) -> None:
        """Append ids start .. start+n-1 of a finished .npy of the same dtype, copied by the
        kernel where it can (no pass through Python: joining parts costs the main process next
        to nothing)."""
        if n <= 0:
            return
        if source.dtype_name != self.dtype.name:
            raise ValueError(f"{source.path}: {source.dtype_name} ids cannot be copied into a {self.dtype.name} file")
        self._file.flush()
        offset, left = source.offset + start * self.dtype.itemsize, n * self.dtype.itemsize
        dst = self._file.fileno()
        while left > 0:
            try:
                copied = os.copy_file_range(source.fd, dst, left, offset)
            except (AttributeError, OSError):  # another kernel or filesystem: copy it here
                copied = 0
            if copied <= 0:
                data = os.pread(source.fd, min(left, COPY_BYTES), offset)
                if not data:
                    raise OSError(f"{source.path}: shorter than its header says")
                self._file.write(data)
                self._file.flush()
                copied = len(data)
            offset += copied
            left -= copied
        self._file.seek(0, os.SEEK_END)
        self.count += n

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens start .. start+n-1 (then the file position is back at the end)."""
        import numpy as np

        self._file.seek(self._header_len + start * self.dtype.itemsize)
        out = np.frombuffer(self._file.read(n * self.dtype.itemsize), dtype=self.dtype)
        self._file.seek(0, os.SEEK_END)
        return out

    def write_at(self, start: int, tokens: np.ndarray) -> None:
        """Overwrite tokens from `start` on (within what is written already)."""
        self._file.seek(self._header_len + start * self.dtype.itemsize)
        self._file.write(tokens.astype(self.dtype, copy=False).data)
        self._file.seek(0, os.SEEK_END)

    def truncate(self, n: int) -> None:
        self.count = n
        self._file.truncate(self._header_len + n * self.dtype.itemsize)
        self._file.seek(0, os.SEEK_END)

    def finish(self) -> None:
        self._file.seek(0)
        self._file.write(self._header(self.count))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def close(self) -> None:
        """Close without caring about unwritten data (the file is being thrown away)."""
        try:
            self._file.close()
        except OSError:  # flushing failed (a full disk): the original error is what matters
            pass


class NpyIds:
    """A finished 1-D .npy file opened for copying ranges of it (`NpyWriter.append_from`)."""

    def __init__(self, path: Path):
        from lmtools import _sampler  # the one reader of .npy headers, as the sampler reads them

        self.dtype_name, self.count, self.offset = _sampler.read_npy_header(str(path))
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)

    def __enter__(self) -> NpyIds:
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)
