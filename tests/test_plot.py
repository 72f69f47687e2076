"""`plot`: loss curves from metrics.jsonl into a PNG; missing or empty metrics are one-line errors."""

import json
import struct
import sys
from pathlib import Path

import pytest

from helpers import one_line_error
from lmtools.errors import ConfigError, DataError
from lmtools.plot import metrics_path, plot_runs, read_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(folder: Path, records: list[dict], extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + extra, encoding="utf-8")
    (folder / "checkpoint.pt").write_bytes(b"not read by plot")
    return folder


def records(n: int = 20, scale: float = 1.0) -> list[dict]:
    out = []
    for i in range(1, n + 1):
        r = {"iter": 10 * i, "loss": scale * (8.0 - 0.2 * i), "lr": 1e-3}
        if i % 5 == 0:
            r["val_loss"] = scale * (8.1 - 0.2 * i)
        out.append(r)
    return out


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_read_curves_values(tmp_path):
    # A resumed run re-logs iteration 30; a torn last line is ignored.
    recs = records(4) + [{"iter": 30, "loss": 1.5, "val_loss": 1.25}]
    run = write_run(tmp_path / "a", recs, extra='{"iter": 50, "lo')
    c = read_curves(run)
    assert c.name == "a" and c.metrics_path == run / "metrics.jsonl"
    assert c.train == [(10, 7.8), (20, 7.6), (30, 1.5), (40, 7.2)]
    assert c.val == [(30, 1.25)]


def test_metrics_path_from_folder_file_or_checkpoint(tmp_path):
    run = write_run(tmp_path / "r", records(2))
    expected = run / "metrics.jsonl"
    assert metrics_path(run) == metrics_path(expected) == metrics_path(run / "checkpoint.pt") == expected


def test_png_written(tmp_path):
    a = write_run(tmp_path / "a", records())
    b = write_run(tmp_path / "b", records(scale=0.9))
    out = plot_runs([a, b / "checkpoint.pt"], tmp_path / "plots" / "loss.png")
    assert out == tmp_path / "plots" / "loss.png"
    assert png_size(out) == (880, 550)
    assert out.stat().st_size > 10_000  # two runs' curves, legend and axes, not a blank image
    assert not list(out.parent.glob(".*.tmp"))


def test_cli_writes_png_and_names_it(tmp_path, run_cli):
    a = write_run(tmp_path / "x" / "run", records())
    b = write_run(tmp_path / "y" / "run", records(scale=0.5))
    out = tmp_path / "cmp.png"
    result = run_cli("plot", a, b / "metrics.jsonl", "--out", out, "--log-y", "--title", "two runs")
    assert result.exit_code == 0, result.output
    assert f"Wrote {out}" in result.stdout
    assert png_size(out) == (880, 550) and out.stat().st_size > 10_000


def test_missing_and_empty_metrics_are_one_line_errors(tmp_path, run_cli):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    (tmp_path / "junk.jsonl").write_text("not json\n{}\n")
    (tmp_path / "bare").mkdir()
    (tmp_path / "lonely.pt").write_bytes(b"x")
    out = tmp_path / "loss.png"
    one_line_error(run_cli("plot", tmp_path / "empty", "--out", out), "holds no loss records")
    one_line_error(run_cli("plot", tmp_path / "junk.jsonl", "--out", out), "no loss records (2 unreadable lines)")
    one_line_error(run_cli("plot", tmp_path / "bare", "--out", out), "holds no metrics.jsonl")
    one_line_error(run_cli("plot", tmp_path / "lonely.pt", "--out", out), "no metrics.jsonl beside")
    one_line_error(run_cli("plot", tmp_path / "nowhere", "--out", out), "does not exist")
    one_line_error(
        run_cli("plot", write_run(tmp_path / "ok", records()), "--out", tmp_path / "x.jpg"), "must end in .png"
    )
    assert not out.exists()


def test_without_matplotlib_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    run = write_run(tmp_path / "a", records())
    with pytest.raises(ConfigError, match=r"pip install 'lmtools\[plot\]'"):
        plot_runs([run], tmp_path / "loss.png")
    with pytest.raises(DataError):
        read_curves(tmp_path / "missing")
