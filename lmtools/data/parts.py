"""Units encoded into parts: the bulk of `prepare`'s work, done in worker processes and
committed one unit at a time into a work folder, so that an interrupted prepare continues
where it stopped.

A part is three files in the work folder (`OUT/.prepare-parts`): `part-N.npy`, the unit's ids
in corpus order (each document followed by the end-of-text id); `part-N.docs.npy`, the length
in ids of each of its documents; `part-N.hashes.npy`, each document's 128-bit content hash and
its UTF-8 bytes (three uint64 per document: exact duplicates are found from these when the
parts are joined); and `part-N.json`, what the unit held (counts, id range, its
empty documents, the digest of the bytes it read). The .json is renamed into place last: a part
exists when its .json does. Each file is written under a temporary name of the writing process,
flushed and fsynced first.

The work folder's state.json holds the key of its parts: the input files with their sizes and
modification times, how they are read, the tokenizer and the unit size. A prepare whose key
differs starts again, and says why.

Workers are processes, not threads: reading and splitting text holds the GIL, so threads
would leave the encoders waiting on one core. Each worker reads its unit while its encoder
thread encodes the previous batch. The main process only hands out units and counts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmtools.data.corpus import Piece, ReadOptions, Source, SourceReader, piece_batches, place_text
from lmtools.data.npy_stream import NpyWriter
from lmtools.data.units import Unit
from lmtools.errors import DataError
from lmtools.runtime.fsutil import fsync_dir, fsync_file, write_text_atomically

WORK_DIR = ".prepare-parts"
STATE_FILE = "state.json"
WORK_FORMAT = "lmtools.prepare-parts/2"
EARLIER_FORMATS = ("lmtools.prepare-parts/1",)  # ours too, but parts without content hashes
TOKENIZER = "tokenizer.json"
REPORT_BYTES = 1 << 20  # a worker reports its progress after this many bytes read
POLL_S = 0.2  # how often the main process looks at its workers when none reports


class WorkerDied(DataError):
    """A worker process ended without answering (killed, out of memory)."""


PART_SUFFIXES = (".npy", ".docs.npy", ".hashes.npy", ".json")  # the record last


def part_path(work: Path, index: int, suffix: str) -> Path:
    return work / f"part-{index:06d}{suffix}"


@dataclass(frozen=True)
class Job:
    """One unit to encode, with everything a worker process needs to do it."""

    unit: Unit
    source: Source
    options: ReadOptions
    work: Path
    dtype: str
    batch_chars: int


# ---------------------------------------------------------------------------------------------
# Encoding one unit
# ---------------------------------------------------------------------------------------------


def encode_unit(job: Job, encoder, on_bytes: Callable[[int], None], on_tokens: Callable[[int], None]) -> dict:
    """Encode a unit into its part in the work folder; returns the part's record."""
    import numpy as np

    index = job.unit.index
    final = {suffix: part_path(job.work, index, suffix) for suffix in PART_SUFFIXES}
    tmp = {suffix: p.with_name(f".{p.name}.{os.getpid()}.tmp") for suffix, p in final.items()}
    reader = SourceReader(job.source, job.options, on_bytes, hash_file=True, span=job.unit.span)
    writer = NpyWriter(tmp[".npy"], np.dtype(job.dtype))
    stats = _PartStats(writer, encoder.eot_id)
    hashes = _DocumentHashes()
    try:
        pending = None
        for batch in piece_batches(reader, job.batch_chars):
            stats.text_bytes += hashes.add(batch)
            waiter = encoder.submit_documents(batch)
            if pending is not None:
                on_tokens(stats.add(pending()))
            pending = waiter
        if pending is not None:
            on_tokens(stats.add(pending()))
        writer.finish()
        lengths = stats.lengths()
        if len(lengths) != len(hashes):  # each document ends in one end-of-text id
            raise RuntimeError(f"part {index}: {len(lengths)} documents encoded, {len(hashes)} read")
        for suffix, array in ((".docs.npy", lengths), (".hashes.npy", hashes.table())):
            with open(tmp[suffix], "wb") as fh:
                np.save(fh, array)
                fh.flush()
                os.fsync(fh.fileno())
        record = {
            "unit": index,
            "tokens": writer.count,
            "documents": reader.documents,
            "text_bytes": stats.text_bytes,
            "min_id": stats.min_id,
            "max_id": stats.max_id,
            "empty": reader.empty,
            "empty_at": [list(place) for place in reader.empty_at],
            "separators": reader.separators,
            "lines": reader.lines,
            "sha256": reader.sha256(),
        }
        tmp[".json"].write_text(json.dumps(record) + "\n", encoding="utf-8")
        fsync_file(tmp[".json"])
        for suffix in PART_SUFFIXES:  # the record last: it says the part is whole
            os.replace(tmp[suffix], final[suffix])
        fsync_dir(job.work)
        return record
    except BaseException:
        writer.close()
        for path in tmp.values():
            path.unlink(missing_ok=True)
        raise


class _DocumentHashes:
    """Each document's content hash (blake2b, 128 bits) and UTF-8 length, as its pieces go by."""

    def __init__(self):
        self._hasher = hashlib.blake2b(digest_size=16)
        self._bytes = 0
        self._digests: list[bytes] = []
        self._lengths: list[int] = []

    def __len__(self) -> int:
        return len(self._lengths)

    def add(self, pieces: Sequence[Piece]) -> int:
        """Hash the pieces; returns their UTF-8 bytes."""
        total = 0
        for piece in pieces:
            data = piece.text.encode("utf-8")
            self._hasher.update(data)
            self._bytes += len(data)
            total += len(data)
            if piece.doc_end:
                self._digests.append(self._hasher.digest())
                self._lengths.append(self._bytes)
                self._hasher, self._bytes = hashlib.blake2b(digest_size=16), 0
        return total

    def table(self):
        """(documents, 3) uint64: the hash's two halves and the document's bytes."""
        import numpy as np

        table = np.zeros((len(self), 3), dtype=np.uint64)
        if len(self):
            table[:, :2] = np.frombuffer(b"".join(self._digests), dtype="<u8").reshape(-1, 2)
            table[:, 2] = self._lengths
        return table


class _PartStats:
    """What a part's record says about its ids, gathered as they are written."""

    def __init__(self, writer: NpyWriter, eot_id: int):
        self.writer, self.eot_id = writer, eot_id
        self.text_bytes = 0
        self.min_id: int | None = None
        self.max_id: int | None = None
        self._lengths: list = []
        self._open = 0  # ids of the document the last batch ended inside

    def add(self, ids) -> int:
        import numpy as np

        self.writer.append(ids)
        if len(ids):
            lo, hi = int(ids.min()), int(ids.max())
            self.min_id = lo if self.min_id is None else min(self.min_id, lo)
            self.max_id = hi if self.max_id is None else max(self.max_id, hi)
        bounds = np.flatnonzero(ids == self.eot_id) + 1
        if len(bounds):
            lengths = np.diff(bounds, prepend=0)
            lengths[0] += self._open
            self._lengths.append(lengths)
            self._open = len(ids) - int(bounds[-1])
        else:
            self._open += len(ids)
        return len(ids)

    def lengths(self):
        import numpy as np

        return np.concatenate(self._lengths).astype(np.uint64) if self._lengths else np.zeros(0, np.uint64)


# ---------------------------------------------------------------------------------------------
# Running units: here, or in worker processes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderSpec:
    """How to build the encoder in another process."""

    tokenizer: Path  # its tokenizer.json (the work folder's copy)
    kind: str
    engine: str | None  # "tokenizers" when the fast path disagreed on the corpus; None: not known yet

    def build(self, threads: int):
        from tokenizers import Tokenizer

        from lmtools.data.tokenizer import Encoder

        fast = self.engine != "tokenizers"  # no tiktoken to build where it would not be used
        encoder = Encoder(Tokenizer.from_file(str(self.tokenizer)), self.kind, threads=threads, fast=fast)
        if self.engine == "tokenizers" and encoder.engine == "tiktoken":
            encoder.use_tokenizers()
        return encoder


def run_jobs(
    jobs: Sequence[Job],
    spec: EncoderSpec,
    threads: int,
    on_bytes: Callable[[int], None],
    on_tokens: Callable[[int], None],
    on_record: Callable[[dict], None],
    encoder=None,
    sample: list[str] | None = None,
) -> str:
    """Encode every job's unit; `on_record` gets each part's record as it is committed (in the
    main thread, in the order they finish). With one thread or one job, in this process, with
    `encoder` (built from `spec` when not given) using `threads` threads; else in
    min(threads, jobs) worker processes, the first of which checks the fast path on `sample`
    when `spec.engine` is not known yet. Returns the engine that encoded."""
    if threads <= 1 or len(jobs) <= 1:
        local = encoder or spec.build(threads)
        try:
            engine = local.engine if spec.engine is not None else local.check_fast_path(sample or [])
            for job in jobs:
                on_record(encode_unit(job, local, on_bytes, on_tokens))
        finally:
            if encoder is None:
                local.close()
        return engine
    with _Workers(min(threads, len(jobs)), spec, sample or []) as workers:
        workers.run(jobs, on_bytes, on_tokens, on_record)
        return workers.engine


class _Workers:
    """Worker processes, each sent one job at a time over a pipe and answering on another with
    progress, its record or its error. A worker that dies (killed, out of memory) ends the run
    with a message instead of leaving it waiting; leaving the block ends every worker.

    The workers are started as `python -c ...` of this module, not by multiprocessing's spawn,
    which runs the calling script again in every worker (a script without a main guard would
    then prepare again in each of them)."""

    def __init__(self, count: int, spec: EncoderSpec, sample: list[str]):
        self._count, self._spec, self._sample = count, spec, sample
        self._workers: list[_Worker] = []
        self.engine = spec.engine

    def __enter__(self) -> _Workers:
        try:
            for _ in range(self._count):  # all started first: they boot in parallel
                self._workers.append(_Worker.start())
            for w in self._workers:
                w.send(self._spec)
            if self.engine is None:  # the first one checks the fast path; all follow its verdict
                first = self._workers[0]
                first.send(("check", self._sample))
                self.engine = first.receive()
            for w in self._workers:
                w.send(("engine", self.engine))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for w in self._workers:
            w.stop()

    def run(self, jobs, on_bytes, on_tokens, on_record) -> None:
        from multiprocessing.connection import wait

        todo = list(reversed(jobs))
        busy: dict[Any, _Worker] = {}
        for w in self._workers:
            if todo:
                w.send(todo.pop())
                busy[w.answers] = w
        while busy:
            for conn in wait(list(busy), timeout=POLL_S):
                w = busy[conn]
                try:
                    kind, payload = conn.recv()
                except (EOFError, OSError):
                    raise w.died() from None
                if kind == "progress":
                    on_bytes(payload[0])
                    on_tokens(payload[1])
                elif kind == "record":
                    on_record(payload)
                    del busy[conn]
                    if todo:
                        w.send(todo.pop())
                        busy[conn] = w
                else:
                    raise pickle.loads(payload)
            for w in busy.values():
                if w.proc.poll() is not None:
                    raise w.died()


class _Worker:
    def __init__(self, proc, jobs, answers):
        self.proc, self.jobs, self.answers = proc, jobs, answers

    @staticmethod
    def start() -> _Worker:
        import subprocess
        import sys
        from multiprocessing.connection import Connection

        import lmtools

        job_r, job_w = os.pipe()
        ans_r, ans_w = os.pipe()
        root = str(Path(lmtools.__file__).resolve().parent.parent)
        env = dict(os.environ, RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
        code = f"from lmtools.data.parts import _worker_main; _worker_main({job_r}, {ans_w}, {os.getpid()})"
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", code], pass_fds=(job_r, ans_w), env=env, stdin=subprocess.DEVNULL
            )
        finally:
            os.close(job_r)
            os.close(ans_w)
        return _Worker(proc, Connection(job_w, readable=False), Connection(ans_r, writable=False))

    def send(self, item) -> None:
        try:
            self.jobs.send(item)
        except (BrokenPipeError, OSError):
            raise self.died() from None

    def receive(self):
        """The worker's next answer that is not progress (an error is raised here)."""
        while True:
            try:
                kind, payload = self.answers.recv()
            except (EOFError, OSError):
                raise self.died() from None
            if kind == "error":
                raise pickle.loads(payload)
            if kind != "progress":
                return payload

    def died(self) -> WorkerDied:
        code = self.proc.wait()
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        return WorkerDied(
            f"a prepare worker process died ({how}; out of memory?); "
            "run the same command again to continue from the parts committed"
        )

    def stop(self) -> None:
        for conn in (self.jobs, self.answers):
            conn.close()  # a worker waiting for a job reads the end and leaves
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait()


def _worker_main(jobs_fd: int, answers_fd: int, parent: int) -> None:
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which ends us
    _die_with_parent(parent)
    jobs, answers = Connection(jobs_fd, writable=False), Connection(answers_fd, readable=False)
    try:
        encoder = jobs.recv().build(1)
        while (message := jobs.recv())[0] != "engine":
            answers.send(("verdict", encoder.check_fast_path(message[1])))  # ("check", sample)
    except EOFError:
        return
    if message[1] == "tokenizers" and encoder.engine == "tiktoken":
        encoder.use_tokenizers()
    pending = [0, 0]
    last = time.monotonic()

    def report(nbytes: int = 0, tokens: int = 0, force: bool = False) -> None:
        nonlocal last
        pending[0] += nbytes
        pending[1] += tokens
        if force or pending[0] >= REPORT_BYTES or time.monotonic() - last > 0.5:
            answers.send(("progress", tuple(pending)))
            pending[:] = [0, 0]
            last = time.monotonic()

    while True:
        try:
            job = jobs.recv()
        except EOFError:  # the parent is done with us
            return
        try:
            record = encode_unit(job, encoder, lambda n: report(nbytes=n), lambda n: report(tokens=n))
        except BaseException as exc:  # noqa: BLE001 - every failure goes to the parent
            answers.send(("error", _pickled(exc)))
            return
        report(force=True)
        answers.send(("record", record))


def _pickled(exc: BaseException) -> bytes:
    try:
        return pickle.dumps(exc)
    except Exception:  # noqa: BLE001 - an exception that cannot travel is described instead
        return pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel end this worker when the parent dies (kill -9 included), so no
    orphan writes into the folder after its lock is gone."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


# ---------------------------------------------------------------------------------------------
# The work folder
# ---------------------------------------------------------------------------------------------


class WorkFolder:
    """OUT/.prepare-parts: the parts of a prepare that is not finished yet, and their key."""

    def __init__(self, out: Path):
        self.path = out / WORK_DIR

    def exists(self) -> bool:
        return (self.path / STATE_FILE).is_file()

    def open(self, key: dict, note: Callable[[str], None]) -> tuple[dict[int, dict], dict]:
        """The records of the parts done under `key`, and the saved state (an empty folder
        with a new state when there is none, or when its key differs: say why)."""
        state = self.state()
        if state is not None:
            if state.get("key") == key and state.get("format") == WORK_FORMAT:
                self.remove_temporaries()
                return self.records(), state
            why = what_changed(state.get("key") or {}, key) if state.get("format") == WORK_FORMAT else None
            why = why or "the parts were written by an earlier version of lmtools"
            note(f"starting again: {why}; the earlier parts are removed")
            self.remove()
        self.path.mkdir(parents=True, exist_ok=True)
        state = {"format": WORK_FORMAT, "key": key}
        self.save_state(state)
        return {}, state

    def state(self) -> dict | None:
        """The saved state; None when there is no work folder. A folder of that name that no
        prepare wrote is refused (it is never removed)."""
        if not os.path.lexists(self.path):
            return None
        if self.path.is_dir() and not self.path.is_symlink() and not (self.path / STATE_FILE).exists():
            if all(p.name.startswith(".") and p.name.endswith(".tmp") for p in self.path.iterdir()):
                self.remove()  # a prepare killed as it made the folder: nothing but its temporaries
                return None
        try:
            state = json.loads((self.path / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            state = None
        if (
            not isinstance(state, dict)
            or state.get("format") not in (WORK_FORMAT, *EARLIER_FORMATS)
            or self.path.is_symlink()
        ):
            raise DataError(
                f"{self.path} was not written by lmtools prepare (no {STATE_FILE} of its own); "
                "it is never removed: move it away or choose another --out"
            )
        return state

    def save_state(self, state: dict) -> None:
        write_text_atomically(self.path / STATE_FILE, json.dumps(state, indent=1) + "\n")

    def save_tokenizer(self, tok) -> None:
        write_text_atomically(self.tokenizer_path, tok.to_str(pretty=True))

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER

    def tokenizer(self):
        from tokenizers import Tokenizer

        path = self.tokenizer_path
        return Tokenizer.from_file(str(path)) if path.is_file() else None

    def records(self) -> dict[int, dict]:
        """Unit index -> record of every whole part (a record whose files are missing or torn
        is dropped with them: its unit is done again)."""
        found = {}
        for path in sorted(self.path.glob("part-*.json")):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                index = int(record["unit"])
            except (OSError, ValueError, KeyError, TypeError):
                record, index = None, -1
            files = [part_path(self.path, index, suffix) for suffix in PART_SUFFIXES[:-1]]
            if record is None or path != part_path(self.path, index, ".json") or not all(p.is_file() for p in files):
                for p in (path, *files):
                    p.unlink(missing_ok=True)
                continue
            found[index] = record
        return found

    def remove_temporaries(self) -> None:
        """What a worker or a prepare that died left half written here."""
        for path in self.path.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                path.unlink()

    def remove(self) -> None:
        """Only ever called on a folder `state` recognised as prepare's."""
        shutil.rmtree(self.path, ignore_errors=True)

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())


def what_changed(old: dict, new: dict) -> str:
    """Why parts done under key `old` are no use under key `new`, in a few words."""
    if old.get("tokenizer") != new.get("tokenizer"):
        return "another tokenizer than the interrupted prepare's"
    if old.get("read") != new.get("read"):
        return "the files are read with other options (--separator, --separator_line, --text_field, --text_column)"
    old_files = {f[0]: f[1:] for f in old.get("sources") or []}
    for path, *stat in new.get("sources") or []:
        if path not in old_files:
            return f"{path} was not an input of the interrupted prepare"
        if old_files[path] != stat:
            return f"{path} changed since the interrupted prepare"
    if len(old_files) != len(new.get("sources") or []):
        return "fewer input files than the interrupted prepare's"
    return "other settings than the interrupted prepare's"


def empty_places(records: Sequence[dict], units: Sequence[Unit], sources: Sequence[Source], limit: int) -> list[str]:
    """The first `limit` empty documents of the records (in corpus order), numbered from the
    start of each file: a unit's parts and lines follow those of the units before it."""
    places: list[str] = []
    separators: dict[int, int] = {}
    lines: dict[int, int] = {}
    for record in records:
        src = units[record["unit"]].source
        for kind, n in record["empty_at"]:
            if len(places) >= limit:
                return places
            n += {"part": separators.get(src, 0), "line": lines.get(src, 0)}.get(kind, 0)
            places.append(place_text(sources[src].path, kind, n))
        separators[src] = separators.get(src, 0) + record["separators"]
        lines[src] = lines.get(src, 0) + record["lines"]
    return places


def describe_sources(records: Sequence[dict], units: Sequence[Unit], sources: Sequence[Source]) -> list[dict[str, Any]]:
    """meta.json's "sources": each file with its size, digest, documents and empty documents. A
    file read as several units has the digest of each unit's bytes ("sha256_parts": start,
    end, digest) instead of one for the whole file."""
    out = [{**s.describe(), "documents": 0, "empty_documents": 0, "_digests": []} for s in sources]
    for record in records:
        unit = units[record["unit"]]
        entry = out[unit.source]
        entry["documents"] += record["documents"]
        entry["empty_documents"] += record["empty"]
        entry["_digests"].append([unit.span.hash_start, unit.span.hash_end, record["sha256"]])
    for entry in out:
        digests = entry.pop("_digests")
        if len(digests) == 1:
            entry["sha256"] = digests[0][2]
        else:
            entry["sha256_parts"] = digests
    return [
        {k: e[k] for k in ("path", "size", "sha256", "sha256_parts", "documents", "empty_documents") if k in e}
        for e in out
    ]
