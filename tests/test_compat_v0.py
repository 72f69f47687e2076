"""A run written by an earlier lmtools (tests/fixtures/v0_run, made by revision ae79801 before the
package was reorganised): its checkpoint still loads, resumes and exports, and every read-only
command prints the same bytes it printed then.

The checkpoint records its data by absolute path, so the fixture is laid out where it was made
(FIXTURE_ROOT) before the commands run there.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import PROCESS_ENV
from lmtools.checkpoint import read_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "v0_run"
FIXTURE_ROOT = Path("/tmp/lmtools-v0-fixture")  # where the run was made (its recorded paths)
OUTPUTS = FIXTURE / "outputs"
COMMANDS = {
    "inspect_ckpt": ["inspect", "run/ckpt.pt"],
    "inspect_data": ["inspect", "data"],
    "inspect_config": ["inspect", "run/ckpt.pt", "--config"],
    "sample": ["sample", "run/ckpt.pt", "--prompt", "the", "--temperature", "0", "--max_new_tokens", "24"],
    "eval": ["eval", "run/ckpt.pt", "data/val.npy"],
}


@pytest.fixture(scope="module")
def root() -> Path:
    """The fixture's files at the place they were made (the same bytes if already there)."""
    for part in ("data", "run"):
        for src in (FIXTURE / part).iterdir():
            dst = FIXTURE_ROOT / part / src.name
            if not dst.is_file() or dst.read_bytes() != src.read_bytes():
                dst.parent.mkdir(parents=True, exist_ok=True)
                tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
                shutil.copyfile(src, tmp)
                os.replace(tmp, dst)  # atomic: another test run may read it meanwhile
    return FIXTURE_ROOT


def lmtools(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(PROCESS_ENV, COLUMNS="80")
    return subprocess.run(
        [sys.executable, "-m", "lmtools.cli", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True
    )


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_command_prints_the_bytes_it_printed_before(root, name):
    result = lmtools(*COMMANDS[name], cwd=root)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout == (OUTPUTS / f"{name}.txt").read_text(encoding="utf-8")


def test_the_old_checkpoint_exports_to_the_same_files(root, tmp_path):
    out = tmp_path / "hf"
    result = lmtools("export", "run/ckpt.pt", "--out", out, cwd=root)
    assert result.returncode == 0, result.stderr
    expected = json.loads((OUTPUTS / "export_sha256.json").read_text())
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()} == expected


@pytest.mark.slow
def test_the_old_checkpoint_resumes_where_it_stopped(root, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    shutil.copyfile(root / "run" / "ckpt.pt", ckpt)
    before = read_checkpoint(ckpt)
    result = lmtools("resume", ckpt, "--max_iters", "6", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    after = read_checkpoint(ckpt)
    assert (before["iteration"], after["iteration"]) == (4, 6)
    assert after["config"]["train_data"] == before["config"]["train_data"]
    weights = before["model_state_dict"], after["model_state_dict"]
    changed = [k for k in weights[0] if not (weights[0][k] == weights[1][k]).all()]
    assert changed  # it trained: the weights moved
    assert (root / "run" / "ckpt.pt").read_bytes() == (FIXTURE / "run" / "ckpt.pt").read_bytes()  # written in place
