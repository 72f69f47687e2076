"""One declaration per option: the `train` flags generated from TrainConfig's fields, TOML run
configs (`train --config`), and `inspect --config`, which prints the TOML that reproduces a run."""

import re
from dataclasses import fields

import numpy as np
import pytest
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
    assert cfg == TrainConfig.from_dict(user)

    # A resume records the first run's config with its typed override.
    result = run_cli("resume", ckpt, "--max_iters", "4")
    assert result.exit_code == 0, result.output
    again = read_checkpoint(ckpt)
    assert again["user_config"] == {**user, "max_iters": 4, "checkpoint_path": str(ckpt)}
    assert again["config"]["max_iters"] == 4


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
