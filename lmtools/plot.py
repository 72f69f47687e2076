"""Loss curves: train and validation loss of one or more runs, from their metrics.jsonl, as a PNG.

A run is named by its folder (holding metrics.jsonl), the metrics.jsonl itself, or a checkpoint
(whose sibling metrics.jsonl is used). matplotlib is an optional extra (`lmtools[plot]`); it
draws on a bare `Figure` with the Agg canvas, so no GUI backend or global pyplot state is
touched.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from lmtools.errors import ConfigError, DataError
from lmtools.layout import METRICS_FILE
from lmtools.training.metrics import read_records


@dataclass
class RunCurves:
    name: str
    metrics_path: Path
    train: list[tuple[int, float]] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)
    # Named validation sets (one per prepared folder of a mixture): name -> points.
    val_sets: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    damaged: int = 0  # lines skipped as unreadable


def metrics_path(run: str | os.PathLike) -> Path:
    """The metrics.jsonl of a run folder, a metrics file, or a checkpoint."""
    p = Path(run)
    if p.is_dir():
        path = p / METRICS_FILE
        if not path.is_file():
            raise DataError(f"{p} holds no {METRICS_FILE}; pass a run folder, a metrics.jsonl or a checkpoint")
        return path
    if not p.exists():
        raise DataError(f"{p} does not exist; pass a run folder, a metrics.jsonl or a checkpoint")
    if p.suffix.lower() == ".jsonl":
        return p
    path = p.with_name(METRICS_FILE)
    if not path.is_file():
        raise DataError(f"no {METRICS_FILE} beside {p}; was the run trained with metrics turned off?")
    return path


def read_curves(run: str | os.PathLike) -> RunCurves:
    """Train and validation loss by iteration; a resumed run's later record for an iteration wins."""
    path = metrics_path(run)
    p = Path(run)
    name = p.name if p.is_dir() else path.parent.name or str(path)
    train: dict[int, float] = {}
    val: dict[int, float] = {}
    val_sets: dict[str, dict[int, float]] = {}
    try:
        records, bad = read_records(path)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    for _raw, record in records:
        it = record["iter"]
        if _finite_number(record.get("loss")):
            train[it] = float(record["loss"])
        if _finite_number(record.get("val_loss")):
            val[it] = float(record["val_loss"])
        for key, value in record.items():
            if key.startswith("val/") and _finite_number(value):
                val_sets.setdefault(key.removeprefix("val/"), {})[it] = float(value)
    if not train and not val:
        what = f"no loss records ({bad} unreadable lines)" if bad else "no loss records"
        raise DataError(f"{path} holds {what}; train for at least --log_interval steps first")
    sets = {k: sorted(points.items()) for k, points in val_sets.items()}
    return RunCurves(name, path, sorted(train.items()), sorted(val.items()), sets, bad)


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_runs(
    runs: list[str | os.PathLike],
    out: str | os.PathLike = "loss.png",
    *,
    title: str | None = None,
    log_y: bool = False,
    warn=None,
) -> Path:
    """Draw the loss curves of `runs` into the PNG `out`; returns its path."""
    if not runs:
        raise ConfigError("name at least one run folder, metrics.jsonl or checkpoint to plot")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out} must end in .png")
    curves = [read_curves(r) for r in runs]
    for c in curves:
        if c.damaged and warn is not None:
            warn(f"warning: skipped {c.damaged} damaged line(s) in {c.metrics_path}")
    _unique_names(curves)
    fig = _loss_figure(curves, title, log_y)
    _save_png(fig, out)
    return out


def _loss_figure(curves: list[RunCurves], title: str | None, log_y: bool):
    """A matplotlib Figure (no pyplot, no display) with every run's curves in its own color."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ConfigError(
            "plotting needs matplotlib: pip install 'lmtools[plot]' (or pip install matplotlib)"
        ) from None

    fig = Figure(figsize=(8, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, run in enumerate(curves):
        _plot_run(ax, run, color=f"C{i % 10}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats per token)")
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title or ("loss: " + ", ".join(c.name for c in curves)))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    return fig


def _plot_run(ax, run: RunCurves, color: str) -> None:
    """Train solid, val dashed with dots, each named validation set dotted with its own marker."""
    if run.train:
        xs, ys = zip(*run.train)
        ax.plot(xs, ys, color=color, linewidth=1.5, label=f"{run.name} train")
    if run.val:
        xs, ys = zip(*run.val)
        ax.plot(xs, ys, color=color, linestyle="--", marker="o", markersize=3, linewidth=1.2, label=f"{run.name} val")
    for (set_name, points), marker in zip(run.val_sets.items(), "sv^Dpx*"):
        xs, ys = zip(*points)
        ax.plot(
            xs,
            ys,
            color=color,
            linestyle=":",
            marker=marker,
            markersize=3,
            linewidth=1,
            label=f"{run.name} val/{set_name}",
        )


def _save_png(fig, out: Path) -> None:
    """Write the PNG under a temporary name, then rename it into place."""
    if not out.parent.is_dir():
        out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"could not write {out}: {exc.strerror}; choose a writable --out") from None


def _unique_names(curves: list[RunCurves]) -> None:
    """Runs in folders of the same name are told apart by their parent folders."""
    seen: dict[str, int] = {}
    for c in curves:
        seen[c.name] = seen.get(c.name, 0) + 1
    for c in curves:
        if seen[c.name] > 1:
            c.name = str(c.metrics_path.parent)
