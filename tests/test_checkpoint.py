"""Checkpoints: round trips, atomic writes, torn files, and files that would run code."""

import io
import os
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmtools import AdamW, TransformerLM, load_checkpoint, save_checkpoint
from lmtools.checkpoint import keep_snapshot, newest_sound, read_checkpoint, snapshot_base, snapshots, write_atomic
from lmtools.errors import CheckpointError


def model_and_opt(seed=0):
    torch.manual_seed(seed)
    model = TransformerLM(vocab_size=40, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    opt = AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 40, (2, 8))
    model(x).sum().backward()
    opt.step()
    return model, opt


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


@pytest.mark.parametrize("through", ["path", "bytesio"])
def test_round_trip(tmp_path, through):
    model, opt = model_and_opt(0)
    target = tmp_path / "c.pt" if through == "path" else io.BytesIO()
    save_checkpoint(model, opt, 123, target, config={"lr": 0.1}, note="hello")
    if through == "bytesio":
        target.seek(0)
    other, other_opt = model_and_opt(1)
    assert load_checkpoint(target, other, other_opt) == 123
    assert_same_state(model, other)
    s1, s2 = opt.state_dict()["state"], other_opt.state_dict()["state"]
    for k in s1:
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(s1[k][name], s2[k][name], rtol=0, atol=0)
    if through == "path":
        payload = torch.load(target, weights_only=True)  # plain torch can read it safely
        assert payload["note"] == "hello" and payload["config"] == {"lr": 0.1}
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@settings(max_examples=15, deadline=None)
@given(
    iteration=st.integers(0, 2**40),
    extra=st.dictionaries(
        st.text(min_size=1, max_size=8),
        st.one_of(
            st.integers(-(2**60), 2**60),
            st.floats(allow_nan=False),
            st.text(max_size=20),
            st.none(),
            st.lists(st.integers(0, 10), max_size=5),
        ),
        max_size=5,
    ),
)
def test_extras_round_trip(iteration, extra):
    model, opt = model_and_opt(0)
    buf = io.BytesIO()
    save_checkpoint(model, opt, iteration, buf, extra=extra)
    buf.seek(0)
    payload = read_checkpoint(buf)
    assert payload["iteration"] == iteration and payload["extra"] == extra


def test_compiled_or_wrapped_model_saves_plain_keys(tmp_path):
    model, opt = model_and_opt(0)

    class Wrapper(torch.nn.Module):  # what torch.compile's OptimizedModule looks like
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    save_checkpoint(Wrapper(model), opt, 1, tmp_path / "c.pt")
    keys = read_checkpoint(tmp_path / "c.pt")["model_state_dict"].keys()
    assert not [k for k in keys if k.startswith("_orig_mod")]


class Boom:
    def __reduce__(self):
        return (os.system, (f"touch {Boom.marker}",))


@pytest.mark.parametrize("where", ["top", "nested"])
def test_refuses_pickled_code(tmp_path, where):
    marker = tmp_path / "pwned"
    Boom.marker = marker
    evil = tmp_path / "evil.pt"
    payload = {"model_state_dict": {}, "iteration": 1, "x": Boom()} if where == "nested" else Boom()
    torch.save(payload, evil)
    model, opt = model_and_opt(0)
    with pytest.raises(CheckpointError, match="refusing"):
        load_checkpoint(evil, model, opt)
    assert not marker.exists()


def test_plain_pickle_file_refused(tmp_path):
    marker = tmp_path / "pwned"
    Boom.marker = marker
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError):
        read_checkpoint(evil)
    assert not marker.exists()


@pytest.mark.parametrize("cut", [0, 10, 100, 0.5, -20])
def test_truncated_checkpoint_names_the_way_on(tmp_path, cut):
    model, opt = model_and_opt(0)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(model, opt, 5, path)
    keep_snapshot(path, 5, keep_last=2)
    data = path.read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else (cut if cut >= 0 else len(data) + cut)
    path.unlink()  # the snapshot is a hard link: replace, don't write through it
    path.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match="ckpt-00000005.pt"):
        read_checkpoint(path)
    assert newest_sound(path) == snapshots(path)[0]


def test_failed_write_keeps_previous(tmp_path):
    model, opt = model_and_opt(0)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(model, opt, 7, path)
    before = path.read_bytes()

    def disk_full(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(CheckpointError, match="No space left"):
        write_atomic(path, disk_full)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_missing_folder_and_missing_file(tmp_path):
    model, opt = model_and_opt(0)
    with pytest.raises(CheckpointError, match="does not exist"):
        save_checkpoint(model, opt, 1, tmp_path / "nope" / "c.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pt", model, opt)


def test_mismatched_model_is_a_clear_error(tmp_path):
    model, opt = model_and_opt(0)
    save_checkpoint(model, opt, 1, tmp_path / "c.pt")
    other = TransformerLM(vocab_size=41, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(tmp_path / "c.pt", other)


def test_keep_last_prunes(tmp_path):
    model, opt = model_and_opt(0)
    path = tmp_path / "ckpt.pt"
    for it in (10, 20, 30, 40):
        save_checkpoint(model, opt, it, path)
        keep_snapshot(path, it, keep_last=2)
    assert [p.name for p in snapshots(path)] == ["ckpt-00000040.pt", "ckpt-00000030.pt"]
    assert read_checkpoint(snapshots(path)[1])["iteration"] == 30
    assert snapshot_base(snapshots(path)[1]) == path
