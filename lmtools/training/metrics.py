"""Run metrics: the console line, metrics.jsonl beside the checkpoint, and spike detection."""

from __future__ import annotations

import json
import math
import os
from collections import deque
from pathlib import Path

from lmtools.errors import ConfigError


def format_log_line(iteration: int, loss: float, lr: float, val_loss: float | None = None, **extra: str) -> str:
    """`Iter   1000 | Loss: 5.4123 | LR: 5.00e-05 | Val Loss: 5.6234`, then extra fields."""
    line = f"Iter {iteration:6d} | Loss: {loss:.4f} | LR: {lr:.2e}"
    if val_loss is not None:
        line += f" | Val Loss: {val_loss:.4f}"
    for key, value in extra.items():
        line += f" | {key}: {value}"
    return line


def parse_record(line: bytes) -> dict | None:
    """One metrics.jsonl line as a record (a JSON object with a non-negative integer "iter"),
    or None for a damaged line: torn, not UTF-8, not an object, nested past the parser's limit."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    it = record.get("iter")
    if type(it) is not int or it < 0:
        return None
    return record


def read_records(path: Path) -> tuple[list[tuple[bytes, dict]], int]:
    """The records of a metrics file as (raw line, record), and the count of damaged lines.
    The file is a log: a damaged line is skipped, never fatal."""
    records, damaged = [], 0
    with open(path, "rb") as f:
        for raw in f:
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            record = parse_record(raw)
            if record is None:
                damaged += 1
            else:
                records.append((raw, record))
    return records, damaged


class MetricsWriter:
    """Appends one JSON object per line; each line is flushed so a crash loses at most one."""

    def __init__(self, path: Path | None):
        self.path = path
        self._file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self._file is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        try:
            self._file.write(json.dumps(clean) + "\n")
            self._file.flush()
        except OSError:
            # A full disk must not kill the run over a log line; checkpoints report their own errors.
            self.close()

    def truncate_after(self, iteration: int) -> int:
        """Drop lines past `iteration` (left by a run that died after its last checkpoint), and
        damaged lines; returns how many damaged lines were dropped (for a warning)."""
        if self.path is None or not self.path.exists():
            return 0
        records, damaged = read_records(self.path)
        kept = [raw for raw, record in records if record["iter"] <= iteration]
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(b"".join(raw + b"\n" for raw in kept))
        os.replace(tmp, self.path)
        if self._file is not None:
            self._file.close()
            self._file = open(self.path, "a", encoding="utf-8")
        return damaged

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class SpikeDetector:
    """Flags a value whose z-score against a running window of recent values exceeds a bound."""

    def __init__(self, zscore: float, window: int = 100, warmup: int = 20):
        self.zscore = zscore
        self.values: deque[float] = deque(maxlen=window)
        self.warmup = warmup

    def check(self, value: float) -> float | None:
        """Return the z-score when `value` is a spike, else None; spikes stay out of the window."""
        if len(self.values) >= self.warmup:
            mean = sum(self.values) / len(self.values)
            var = sum((v - mean) ** 2 for v in self.values) / (len(self.values) - 1)
            std = math.sqrt(var) if var > 0 else 0.0
            z = (value - mean) / std if std > 0 else 0.0
            if z > self.zscore:
                return z
        self.values.append(value)
        return None

    def state_dict(self) -> dict:
        return {"values": list(self.values)}

    def load_state_dict(self, state: dict) -> None:
        self.values.clear()
        self.values.extend(float(v) for v in state.get("values", []))


class ExternalLoggers:
    """TensorBoard and Weights & Biases, through their own libraries, when asked for and installed."""

    def __init__(self, tensorboard: str | None, wandb_project: str | None, config: dict):
        self._tb = None
        self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self._tb = SummaryWriter(log_dir=tensorboard)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ConfigError("--wandb needs the wandb package: pip install wandb") from None
            self._wandb = wandb.init(project=wandb_project, config=config, resume="allow")

    def write(self, record: dict) -> None:
        step = int(record["iter"])
        scalars = {k: v for k, v in record.items() if k != "iter" and isinstance(v, (int, float)) and math.isfinite(v)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
