"""One declaration per option: the `train` flags generated from TrainConfig's fields, TOML run
configs (`train --config`), and `inspect --config`, which prints the TOML that reproduces a run."""

import json
import re
import tomllib
from dataclasses import fields

import numpy as np
import pytest
import torch
import typer

from helpers import SMALLEST_MODEL, flags, learnable_stream
from lmtools.checkpoint import read_checkpoint
from lmtools.cli import app
from lmtools.cli.app import main
from lmtools.cli.train import _explicit, config_from_params
from lmtools.config.toml import flag_fields, read_run_config, to_toml
from lmtools.config.train_config import TrainConfig
from lmtools.errors import ConfigError

# The flags of the original specification and their defaults (DESIGN.md, "Flags of train").
SPEC_DEFAULTS = {
    "context_length": 512,
    "d_model": 768,
    "num_layers": 12,
    "num_heads": 12,
    "d_ff": 3072,
    "rope_theta": 10000.0,
    "batch_size": 32,
    "learning_rate": 1e-4,
    "min_learning_rate": 1e-5,
    "weight_decay": 0.01,
    "warmup_iters": 2000,
    "max_iters": 100000,
    "gradient_clip_val": 1.0,
    "eval_interval": 1000,
    "log_interval": 100,
    "checkpoint_interval": 5000,
    "checkpoint_path": "checkpoint.pt",
    "device": "cpu",
}


def train_command():
    return typer.main.get_command(app).commands["train"]


def parsed(*args) -> tuple[TrainConfig, frozenset[str]]:
    """The TrainConfig and the user-set names that `lmtools train ARGS` builds, without training."""
    ctx = train_command().make_context("train", [str(a) for a in args])
    fields_ = {f.name for f in fields(TrainConfig)}
    # What steers the invocation (--resume, ...), not the run's config.
    params = {k: v for k, v in ctx.params.items() if k in fields_ or k == "config" or k.startswith("no_")}
    return config_from_params(params, _explicit(ctx))


def test_every_flag_has_help_both_spellings_and_the_spec_defaults():
    options = {p.name: p for p in train_command().params}
    for f in flag_fields():
        opt = options[f.name]
        assert opt.help, f.name
        spellings = {o for o in opt.opts + opt.secondary_opts}
        assert f"--{f.name}" in spellings
        assert f"--{f.name.replace('_', '-')}" in spellings
    for p in options.values():
        assert p.help, p.name
    cfg, explicit = parsed()
    assert explicit == frozenset()
    assert {name: getattr(cfg, name) for name in SPEC_DEFAULTS} == SPEC_DEFAULTS
    assert cfg.vocab_size is None and cfg.train_data == []
    assert "resume" in options and "config" in options


def test_kebab_and_snake_spellings_set_the_same_field():
    assert parsed("--learning-rate", "0.5")[0] == parsed("--learning_rate", "0.5")[0]
    cfg, explicit = parsed("--train_data", "a.npy", "--train-data", "b.npy:2", "--compile")
    assert cfg.train_data == ["a.npy", "b.npy:2"] and cfg.compile is True
    assert explicit == {"train_data", "compile"}


def test_flags_win_over_the_file_and_file_keys_count_as_set(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('train_data = ["x.npy"]\nlearning_rate = 3e-3\nmax_iters = 50\nd-model = 64\ncompile = true\n')
    cfg, explicit = parsed("--config", path, "--max_iters", "70")
    assert cfg.train_data == ["x.npy"] and cfg.learning_rate == 3e-3 and cfg.d_model == 64 and cfg.compile
    assert cfg.max_iters == 70  # typed on the command line
    assert explicit == {"train_data", "learning_rate", "max_iters", "d_model", "compile"}
    assert cfg.num_layers == TrainConfig().num_layers


@pytest.mark.parametrize(
    "text, message",
    [
        ("learning_rat = 1.0\n", "unknown key 'learning_rat'; did you mean learning_rate?"),
        ("max_iters = 1.5\n", "max_iters must be an integer, got 1.5"),
        ("compile = 1\n", "compile must be true or false, got 1"),
        ("train_data = [1]\n", "train_data must be a list of strings"),
        ("schedule_extensions = []\n", "unknown key 'schedule_extensions'"),
        ("max_iters = \n", "is not valid TOML"),
        ("train_data = " + "[" * 100_000 + "]" * 100_000 + "\n", "its values are nested too deeply"),
        ("max_iters = " + "9" * 1_000_000 + "\n", "holds an integer of more than 4,300 digits"),
        ("# " + "x" * (1 << 20) + "\n", "is over 1 MiB, too large for a run config"),
    ],
    ids=lambda v: v[:40] if isinstance(v, str) else v,
)
def test_a_bad_run_config_is_one_line_and_exit_2(tmp_path, capsys, text, message):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        read_run_config(path)
    with pytest.raises(SystemExit) as info:
        main(["train", "--config", str(path), "--checkpoint_path", str(tmp_path / "c.pt")])
    err = capsys.readouterr().err
    assert info.value.code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "c.pt").exists()


def test_a_missing_run_config_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_run_config(tmp_path / "nope.toml")


def test_to_toml_round_trips_every_flag_field(tmp_path):
    cfg = TrainConfig(
        train_data=["a b.npy", 'q"uote.npy:3'],
        val_data="v.npy",
        learning_rate=1e-5,
        max_minutes=2.5,
        compile=True,
        cosine_cycle_iters=7,
        wandb="proj",
    )
    path = tmp_path / "run.toml"
    path.write_text(to_toml(cfg.to_dict()))
    assert TrainConfig(**read_run_config(path)) == cfg
    # State the run records, not a flag, never appears.
    assert all(f.name not in path.read_text() for f in fields(TrainConfig) if not f.metadata["cli"])


@pytest.mark.slow
def test_inspect_config_reproduces_the_run(tmp_path, run_cli):
    np.save(tmp_path / "train.npy", learnable_stream(5000, 0))
    ckpt = tmp_path / "run" / "checkpoint.pt"
    args = [
        "train",
        "--train_data",
        tmp_path / "train.npy",
        *flags(SMALLEST_MODEL, context_length=16, batch_size=4, max_iters=3, warmup_iters=1, eval_interval=100),
        *flags(log_interval=1, learning_rate=2e-3, seed=5),  # the values the recorded config must hold
        "--checkpoint_path",
        ckpt,
    ]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    payload = read_checkpoint(ckpt)
    user, resolved = payload["user_config"], payload["config"]
    # What the user passed and what the data resolved are recorded apart.
    assert user["vocab_size"] is None and resolved["vocab_size"] is not None
    assert user["learning_rate"] == 2e-3 and user["seed"] == 5

    shown = run_cli("inspect", ckpt, "--config")
    assert shown.exit_code == 0, shown.output
    path = tmp_path / "run.toml"
    path.write_text(shown.output)
    assert "vocab_size" not in shown.output and "learning_rate = 0.002" in shown.output
    cfg, _ = parsed("--config", path)
    # All of it but the place the run went, which is a comment: a new run goes elsewhere.
    assert cfg == TrainConfig.from_dict(user | {"checkpoint_path": TrainConfig().checkpoint_path})
    assert f"# checkpoint_path = {json.dumps(str(ckpt))}" in shown.output.splitlines()

    # A resume records the first run's config with its typed override.
    result = run_cli("resume", ckpt, "--max_iters", "4")
    assert result.exit_code == 0, result.output
    again = read_checkpoint(ckpt)
    assert again["user_config"] == {**user, "max_iters": 4, "checkpoint_path": str(ckpt)}
    assert again["config"]["max_iters"] == 4


@pytest.mark.slow
def test_inspect_config_of_a_resumed_run_trains_it_again_into_a_new_place(tmp_path, run_cli, monkeypatch):
    """A run extended by a resume: the TOML holds the max_iters it was started with (the resume
    noted), and the old run's place only as a comment; `train --config` of it trains the same
    run again, elsewhere, and leaves the old checkpoint as it was, byte for byte."""
    monkeypatch.chdir(tmp_path)
    np.save("train.npy", learnable_stream(5000, 0))
    old = tmp_path / "old" / "ckpt.pt"
    run = flags(SMALLEST_MODEL, context_length=16, batch_size=4, warmup_iters=1, eval_interval=100, seed=5)
    result = run_cli("train", "--train_data", "train.npy", *run, "--max_iters", 3, "--checkpoint_path", old)
    assert result.exit_code == 0, result.output
    at_3 = read_checkpoint(old)["model_state_dict"]
    result = run_cli("resume", old, "--max_iters", 6)
    assert result.exit_code == 0, result.output
    assert read_checkpoint(old)["user_config"]["max_iters"] == 6  # what the TOML must not take as the start
    old_bytes = old.read_bytes()

    shown = run_cli("inspect", old, "--config")
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert f"# checkpoint_path = {json.dumps(str(old))}" in lines
    assert "# The run was started with max_iters = 3; a resume moved its end to 6 at iter 3." in lines
    assert "# Resuming the new run at its end with --max_iters 6 does the same." in lines
    assert not [line for line in lines if str(old) in line and not line.startswith("#")]
    toml = tomllib.loads(shown.output)
    assert toml["max_iters"] == 3 and toml["train_data"] == ["train.npy"] and toml["seed"] == 5
    assert not [key for key in toml if key in ("checkpoint_path", "out_dir", "run_dir", "overwrite")]

    (tmp_path / "run.toml").write_text(shown.output)
    before = set(tmp_path.rglob("*.pt"))
    result = run_cli("train", "--config", "run.toml")
    assert result.exit_code == 0, result.output
    new = set(tmp_path.rglob("*.pt")) - before
    assert len(new) == 1 and old.read_bytes() == old_bytes
    again = read_checkpoint(new.pop())
    # The same run: at iter 3, the weights the old run had there, bit for bit (on the CPU).
    assert again["iteration"] == 3
    assert again["model_state_dict"].keys() == at_3.keys()
    assert all(torch.equal(again["model_state_dict"][k], at_3[k]) for k in at_3)


def test_reproducing_toml_comments_out_every_key_of_the_old_place():
    from lmtools.config.toml import is_output_place, reproducing_toml

    user = TrainConfig(train_data=["d/"], checkpoint_path="runs/a/ckpt.pt", tensorboard="tb", overwrite=True)
    text = reproducing_toml(user.to_dict(), user.to_dict(), "runs/a/ckpt.pt")
    lines = text.splitlines()
    assert {'# checkpoint_path = "runs/a/ckpt.pt"', '# tensorboard = "tb"', "# overwrite = true"} <= set(lines)
    kept = tomllib.loads(text)
    assert not [key for key in kept if is_output_place(key)] and kept["train_data"] == ["d/"]
    # A folder option (--out_dir, its alias, any *_dir) says where a run goes, as a path does.
    assert all(is_output_place(name) for name in ("out_dir", "run_dir", "log_dir", "checkpoint_path"))
    assert not any(is_output_place(name) for name in ("train_data", "val_data", "init_from", "wandb", "max_iters"))
    # No resume moved the schedule: max_iters as passed, and no note.
    assert kept["max_iters"] == user.max_iters and not [
        line for line in lines if "max_iters" in line[:40] and "#" in line
    ]
    # What is kept is to_toml's, less the place.
    place = ("checkpoint_path", "tensorboard", "overwrite")
    assert kept == {k: v for k, v in tomllib.loads(to_toml(user.to_dict())).items() if k not in place}


def test_reproducing_toml_starts_from_the_first_max_iters_of_a_run_resumed_twice():
    from lmtools.config.toml import reproducing_toml

    user = TrainConfig(train_data=["d/"], max_iters=30).to_dict()  # a resume's --max_iters replaces it
    extensions = [
        {"start": 10, "end": 20, "from_lr": 1e-4, "to_lr": 1e-5, "previous_end": 10},
        {"start": 15, "end": 30, "from_lr": 5e-5, "to_lr": 1e-5, "previous_end": 20},  # a rollback to iter 15
    ]
    text = reproducing_toml(user, user | {"schedule_extensions": extensions}, "old\nrun.pt")
    lines = text.splitlines()
    assert tomllib.loads(text)["max_iters"] == 10  # a path with a newline stays in its comment
    assert "# The run config of old\\nrun.pt (lmtools inspect --config):" in lines
    note = "# The run was started with max_iters = 10; resumes moved its end to 20 at iter 10, to 30 at iter 15."
    assert lines[lines.index("max_iters = 10") - 1] == note
    assert not any(line.startswith("# Resuming") for line in lines)  # not at the end: no plain resume does it


def test_inspect_config_needs_a_checkpoint(tmp_path, run_cli):
    np.save(tmp_path / "tokens.npy", np.arange(100, dtype=np.uint16))
    result = run_cli("inspect", tmp_path / "tokens.npy", "--config")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "needs a checkpoint" in result.stderr


def test_a_hidden_negative_sets_the_option_off_explicitly(run_cli):
    cfg, explicit = parsed("--recipe", "modern", "--no_qk_norm", "--no-doc-aligned")
    assert cfg.qk_norm is False and cfg.doc_aligned is False and cfg.recipe == "modern"
    assert explicit == {"recipe", "qk_norm", "doc_aligned"}
    help_text = run_cli("train", "--help", env={"COLUMNS": "200"}).output
    assert "--qk_norm" in help_text and "--no_qk_norm," not in help_text


def test_a_run_config_that_exhausts_memory_is_one_line(tmp_path, monkeypatch):
    import tomllib

    def exhausted(text):
        raise MemoryError

    path = tmp_path / "run.toml"
    path.write_text("max_iters = 1\n")
    monkeypatch.setattr(tomllib, "loads", exhausted)
    with pytest.raises(ConfigError, match="do not fit in memory"):
        read_run_config(path)
