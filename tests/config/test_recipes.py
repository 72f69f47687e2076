"""The options beyond the specification (Muon, QK-norm, ReLU², zero-initialised projections,
logit soft-capping, document-aligned windows) and the recipes that bundle them."""

import math
import random
from functools import partial

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import REPO, TINY_MODEL, flags, run_cli, train_config
from lmtools import _sampler
from lmtools.checkpoint import read_checkpoint
from lmtools.config.recipes import RECIPES, apply_recipe
from lmtools.config.train_config import TrainConfig
from lmtools.data.loader import BatchLoader
from lmtools.data.prepare import prepare_corpus
from lmtools.errors import ConfigError, DataError
from lmtools.model import ModelConfig, TransformerLM
from lmtools.training.optim import MuonWithAdamW, make_optimizer
from lmtools.training.schedule import lr_at
from lmtools.training.trainer import train_model

WORDS = "the a model learns tokens from text and then writes more of it slowly or quickly".split()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared folder: a few hundred documents joined by <|endoftext|>, of varied lengths."""
    folder = tmp_path_factory.mktemp("recipe")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 120))) for _ in range(400)]
    corpus = folder / "corpus.txt"
    corpus.write_text("<|endoftext|>".join(docs), encoding="utf-8")
    prepare_corpus([corpus], folder / "data", vocab_size=300, val_fraction=0.1, separator="<|endoftext|>")
    return folder / "data"


# Two layers, eight steps on one cosine cycle, a validation loss every four.
RECIPE_RUN = dict(num_layers=2, batch_size=8, learning_rate=3e-3, min_learning_rate=3e-4, warmup_iters=2, max_iters=8)
config = partial(
    train_config,
    **RECIPE_RUN,
    cosine_cycle_iters=8,
    eval_interval=4,
    eval_iters=2,
    log_interval=1,
    checkpoint_interval=1000,
)


def losses_and_weights(cfg, explicit=frozenset()):
    result = train_model(cfg, explicit=explicit, log=lambda _line: None)
    return result.losses, read_checkpoint(cfg.checkpoint_path)


OPTIONS = [
    {"optimizer": "muon"},
    {"qk_norm": True},
    {"ffn": "relu2"},
    {"zero_init_proj": True},
    {"logit_softcap": 5.0},
    {"doc_aligned": True},
    {"recipe": "modern"},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_exact_resume_with_each_option(prepared, tmp_path, options):
    straight = config(prepared, tmp_path / "a.pt", **options)
    losses_straight, payload_straight = losses_and_weights(straight)
    cfg = payload_straight["config"]
    for name, value in (RECIPES["modern"] if options.get("recipe") == "modern" else options).items():
        assert cfg[name] == value  # recorded in the checkpoint
        if name in ModelConfig.__dataclass_fields__:
            assert payload_straight["model_config"][name] == value

    first = config(prepared, tmp_path / "b.pt", max_iters=4, **options)
    losses_first, _ = losses_and_weights(first)
    result = train_model(
        TrainConfig(max_iters=8, checkpoint_path=first.checkpoint_path),
        resume_from=first.checkpoint_path,
        explicit=frozenset({"max_iters", "checkpoint_path"}),
        log=lambda _line: None,
    )
    assert losses_first + result.losses == losses_straight  # exact float equality
    resumed = read_checkpoint(first.checkpoint_path)
    for key, value in payload_straight["model_state_dict"].items():
        assert torch.equal(value, resumed["model_state_dict"][key]), key
    assert resumed["config"] == {**cfg, "checkpoint_path": first.checkpoint_path}
    # Both optimizers' states travel: a resumed Muon run continues its momentum.
    if cfg["optimizer"] == "muon":
        assert set(resumed["optimizer_state_dict"]) == {"adamw", "muon"}
        assert resumed["optimizer_state_dict"]["muon"]["state"]


def test_spec_recipe_is_the_run_without_the_flag(prepared, tmp_path):
    plain, plain_payload = losses_and_weights(config(prepared, tmp_path / "a.pt"))
    spec, spec_payload = losses_and_weights(config(prepared, tmp_path / "b.pt", recipe="spec"), frozenset({"recipe"}))
    assert plain == spec
    for key, value in plain_payload["model_state_dict"].items():
        assert torch.equal(value, spec_payload["model_state_dict"][key]), key
    assert set(plain_payload["model_state_dict"]) == set(spec_payload["model_state_dict"])


def test_explicit_flags_override_the_recipe():
    cfg = apply_recipe(TrainConfig(recipe="modern", ffn="swiglu"), frozenset({"ffn"}))
    assert cfg.ffn == "swiglu" and cfg.optimizer == RECIPES["modern"].get("optimizer", "adamw")
    # A value moved off its default in code also stays.
    assert apply_recipe(TrainConfig(recipe="modern", logit_softcap=7.0)).logit_softcap == 7.0
    assert apply_recipe(TrainConfig(recipe="spec")) == TrainConfig()
    for name, value in RECIPES["modern"].items():
        assert getattr(apply_recipe(TrainConfig(recipe="modern")), name) == value


def test_default_options_draw_the_specifications_weights():
    shape = dict(vocab_size=50, context_length=8, d_model=16, num_layers=2, num_heads=2, d_ff=32)
    torch.manual_seed(3)
    plain = TransformerLM(**shape).state_dict()
    torch.manual_seed(3)
    zero = TransformerLM(**shape, zero_init_proj=True).state_dict()
    for key, value in plain.items():
        if key.endswith(("output_proj.weight", "w2.weight")):
            assert not zero[key].any() and value.std() > 0
        else:
            assert torch.equal(value, zero[key]), key


def test_model_config_lists_only_the_options_that_are_set():
    shape = dict(vocab_size=50, context_length=8, d_model=16, num_layers=2, num_heads=2, d_ff=32, rope_theta=10000.0)
    assert ModelConfig(**shape).to_dict() == shape
    cfg = ModelConfig(**shape, ffn="relu2", logit_softcap=15.0)
    assert cfg.to_dict() == {**shape, "ffn": "relu2", "logit_softcap": 15.0}
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_architecture_options_shape_the_model():
    shape = dict(vocab_size=50, context_length=8, d_model=16, num_layers=2, num_heads=2, d_ff=32)
    relu2 = TransformerLM(**shape, ffn="relu2")
    assert not hasattr(relu2.layers[0].ffn, "w3")
    assert relu2.num_parameters() == TransformerLM(**shape).num_parameters() - 2 * 16 * 32
    qk = TransformerLM(**shape, qk_norm=True)
    assert "layers.0.attn.q_norm.weight" in qk.state_dict() and qk.state_dict()[
        "layers.0.attn.k_norm.weight"
    ].shape == (8,)
    assert qk.num_parameters() == TransformerLM(**shape).num_parameters() + 2 * 2 * 8
    assert TransformerLM.from_config(qk.config).config == qk.config
    for model in (relu2, qk):
        assert (
            model.num_parameters()
            == sum(p.numel() for n, p in model.named_parameters() if n != "token_embeddings.weight") + 50 * 16
        )
        assert model.config.flops_per_token() > 0


def test_logit_softcap_bounds_the_logits():
    shape = dict(vocab_size=50, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    capped = TransformerLM(**shape, logit_softcap=2.0)
    with torch.no_grad():
        capped.lm_head.weight.mul_(1000)  # logits in the hundreds without the cap
        logits = capped(torch.randint(0, 50, (2, 8)))
    assert logits.abs().max() <= 2.0 and logits.abs().max() > 1.9


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = TransformerLM(vocab_size=50, context_length=8, d_model=16, num_layers=2, num_heads=2, d_ff=32, qk_norm=True)
    opt = make_optimizer(model, 1e-3, 0.1, torch.device("cpu"), optimizer="muon", muon_lr=0.05)
    assert isinstance(opt, MuonWithAdamW)
    in_muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    in_adamw = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i in in_muon} == {
        n for n, p in model.named_parameters() if n.startswith("layers.") and p.dim() == 2
    }
    assert "token_embeddings.weight" in {names[i] for i in in_adamw} and "lm_head.weight" in {
        names[i] for i in in_adamw
    }
    assert in_muon.isdisjoint(in_adamw) and len(in_muon | in_adamw) == len(list(model.parameters()))
    assert opt.muon.param_groups[0]["lr_scale"] == pytest.approx(50.0)
    assert make_optimizer(model, 1e-3, 0.1, torch.device("cpu")).__class__ is torch.optim.AdamW
    with pytest.raises(ValueError, match="not Muon with AdamW"):
        opt.load_state_dict(opt.adamw.state_dict())


def test_muon_learning_rate_follows_the_schedule(prepared, tmp_path):
    cfg = config(prepared, tmp_path / "m.pt", optimizer="muon", muon_lr=0.04, max_iters=3)
    train_model(cfg, log=lambda _line: None)
    groups = read_checkpoint(cfg.checkpoint_path)["optimizer_state_dict"]
    last_lr = lr_at(cfg, 3)
    assert groups["adamw"]["param_groups"][0]["lr"] == pytest.approx(last_lr)
    assert groups["muon"]["param_groups"][0]["lr"] == pytest.approx(last_lr * 0.04 / cfg.learning_rate)


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=30),
    context=st.integers(1, 24),
    eot=st.integers(0, 9),
    seed=st.integers(0, 2**32),
)
def test_document_aligned_windows_start_at_documents(lengths, context, eot, seed):
    # Documents of the given lengths (tokens other than eot), each followed by eot.
    rng = np.random.default_rng(seed)
    parts = []
    for n in lengths:
        doc = rng.integers(0, 10, n)
        doc[doc == eot] = (eot + 1) % 10
        parts += [doc, [eot]]
    data = np.concatenate(parts).astype(np.uint16)
    if len(data) <= context:
        with pytest.raises(DataError):
            BatchLoader(data, 4, context, doc_eot=eot, prefetch=0)
        return
    valid = [p for p in range(len(data) - context) if p == 0 or data[p - 1] == eot]
    sampler = _sampler.Sampler([(1.0, [_sampler.TokenFile.from_buffer(data)])], context, None, eot)
    assert sampler.num_windows == len(valid) and sampler.document_aligned
    if len(valid) == 1:  # no boundary a window can start at: refused
        with pytest.raises(DataError, match="end-of-text"):
            BatchLoader(data, 4, context, doc_eot=eot, prefetch=0)
        return
    loader = BatchLoader(data, 4, context, seed=seed, doc_eot=eot, prefetch=0)
    for step in range(3):
        x, y = loader.batch_at(step)
        starts = [start for _, start in loader.windows_at(step)]
        assert set(starts) <= set(valid)
        for row, start in enumerate(starts):
            assert x[row].tolist() == data[start : start + context].tolist()
            assert y[row].tolist() == data[start + 1 : start + context + 1].tolist()
        # Deterministic: the same (seed, rank, step) gives the same windows.
        again = BatchLoader(data, 4, context, seed=seed, doc_eot=eot, prefetch=0)
        assert again.windows_at(step) == loader.windows_at(step)


def test_document_aligned_windows_cover_every_start_evenly():
    data = np.array([1, 2, 0, 3, 0, 4, 5, 6, 0, 7, 8, 9, 9, 9], dtype=np.uint16)  # starts 0, 3, 5, 9
    loader = BatchLoader(data, 64, 4, seed=1, doc_eot=0, prefetch=0)
    counts = np.bincount([s for step in range(100) for _, s in loader.windows_at(step)], minlength=10)
    assert set(np.flatnonzero(counts)) == {0, 3, 5, 9}
    assert counts[[0, 3, 5, 9]].min() > 1400  # 6400 draws, about 1600 each


CLI_MODEL = flags(TINY_MODEL, num_layers=2, batch_size=8, warmup_iters=2, eval_interval=4, log_interval=2)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ffn", "gelu"], "--ffn must be one of swiglu, relu2"),
        (["--optimizer", "sgd"], "--optimizer must be one of adamw, muon"),
        (["--logit_softcap", "-1"], "--logit_softcap must be zero"),
        (["--muon_lr", "0"], "--muon_lr must be a positive number"),
        (["--recipe", "fast"], "--recipe must be one of spec, modern"),
    ],
)
def test_bad_option_values_exit_2(prepared, tmp_path, flags, message):
    result = run_cli(
        "train",
        "--train_data",
        prepared,
        *CLI_MODEL,
        "--max_iters",
        "2",
        "--checkpoint_path",
        tmp_path / "c.pt",
        *flags,
    )
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "c.pt").exists()


def test_doc_aligned_needs_the_datasets_end_of_text_id(tmp_path):
    np.save(tmp_path / "bare.npy", np.arange(500, dtype=np.uint16) % 50)
    with pytest.raises(ConfigError, match="--doc_aligned needs the end-of-text id"):
        train_model(
            config(tmp_path / "bare.npy", tmp_path / "c.pt", vocab_size=50, doc_aligned=True), log=lambda _l: None
        )
    result = run_cli(
        "train",
        "--train_data",
        tmp_path / "bare.npy",
        "--vocab_size",
        "50",
        *CLI_MODEL,
        "--max_iters",
        "2",
        "--checkpoint_path",
        tmp_path / "c.pt",
        "--doc_aligned",
    )
    assert result.exit_code == 2 and "meta.json" in result.output and "Traceback" not in result.output


def test_muon_refuses_fsdp(prepared, tmp_path):
    with pytest.raises(ConfigError, match="muon does not work with --fsdp"):
        config(prepared, tmp_path / "c.pt", optimizer="muon", fsdp=True).validate()


@pytest.mark.slow
def test_modern_recipe_end_to_end(prepared, tmp_path):
    """train --recipe modern (one flag overridden), resume, sample, inspect, eval."""
    ckpt = tmp_path / "run" / "c.pt"
    result = run_cli(
        "train",
        "--train_data",
        prepared,
        *CLI_MODEL,
        *flags(max_iters=6, checkpoint_path=ckpt, recipe="modern"),
        "--no-qk-norm",
        "--learning_rate",
        "3e-3",
    )
    assert result.exit_code == 0, result.output
    assert "recipe : modern | Muon (lr 0.02) + AdamW | relu2 feed-forward" in result.output
    assert "QK-norm" not in result.output
    payload = read_checkpoint(ckpt)
    # Options at their defaults are left out of the model config (a spec model's reads as always).
    assert payload["config"]["recipe"] == "modern" and "qk_norm" not in payload["model_config"]
    for name, value in RECIPES["modern"].items():
        if name != "qk_norm":
            assert payload["config"][name] == value
    result = run_cli("resume", ckpt, "--max_iters", "8")
    assert result.exit_code == 0 and "at iter 6" in result.output, result.output
    assert read_checkpoint(ckpt)["iteration"] == 8

    result = run_cli("inspect", ckpt, "--json")
    assert result.exit_code == 0, result.output
    import json

    report = json.loads(result.output)
    assert report["model"]["ffn"] == "relu2" and "qk_norm" not in report["model"] and not report.get("problems")
    assert report["training"]["recipe"] == "modern" and report["training"]["optimizer"] == "muon"
    assert report["optimizer"]["adamw"]["step"] == 8 and report["optimizer"]["muon"]["lr"] > 0

    from lmtools.generate import load_model

    model, _ = load_model(ckpt, torch.device("cpu"))
    assert model.config == ModelConfig.from_dict(payload["model_config"]) and model.config.ffn == "relu2"
    result = run_cli("sample", ckpt, "--prompt", "the model", "--max_new_tokens", "5")
    assert result.exit_code == 0, result.output
    result = run_cli("eval", ckpt, prepared / "val.npy", "--json")
    assert result.exit_code == 0, result.output
    assert 0 < json.loads(result.output)["files"][0]["loss"] < 10
    # A Llama folder cannot hold a ReLU² model: refused in one line, nothing written.
    result = run_cli("export", ckpt, "--out", tmp_path / "hf")
    assert result.exit_code == 2 and "ffn='relu2'" in result.output, result.output
    assert not (tmp_path / "hf" / "config.json").exists()


@pytest.mark.parametrize("bare", [False, True], ids=["prepared", "bare-npy"])
def test_gpu_recipe_script_runs_tiny_on_the_cpu(prepared, tmp_path, bare):
    import importlib.util

    path = REPO / "benchmarks" / "gpu_recipe.py"
    spec = importlib.util.spec_from_file_location("gpu_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # A prepared folder, or a bare token file (its tail becomes validation, its ids give the vocabulary).
    data = prepared
    if bare:
        data = tmp_path / "tokens.npy"
        np.save(data, np.load(prepared / "train.npy"))
    text = module.main(["--tiny", "--seconds", "2", "--data", str(data)])
    rows = [line for line in text.splitlines() if line.startswith("| default") or line.startswith("| modern")]
    assert len(rows) == 2, text
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        steps, epochs, tok_s, val_loss = (
            int(cells[1]),
            float(cells[2]),
            float(cells[3].replace(",", "")),
            float(cells[4]),
        )
        assert steps >= 4 and tok_s > 0 and 0 < val_loss < math.log(320) + 1
        n = len(np.load(prepared / "train.npy"))
        train_tokens = n - max(n // 50, 4096) if bare else n
        assert epochs == pytest.approx(steps * 4 * 32 / train_tokens, abs=0.01)
    assert "vs default" in text and rows[0].split("|")[7].strip() == "1.000x"


def test_init_from_keeps_the_sources_model_under_a_recipe(prepared, tmp_path):
    source = config(prepared, tmp_path / "src.pt", max_iters=2)
    train_model(source, log=lambda _line: None)
    cfg = config(prepared, tmp_path / "new.pt", max_iters=2, recipe="modern", init_from=str(tmp_path / "src.pt"))
    train_model(cfg, explicit=frozenset({"recipe", "init_from"}), log=lambda _line: None)
    payload = read_checkpoint(tmp_path / "new.pt")
    # The architecture is the source's (the recipe's options would not fit its weights);
    # the recipe's optimizer applies.
    assert payload["config"]["ffn"] == "swiglu" and payload["config"]["qk_norm"] is False
    assert payload["model_config"] == read_checkpoint(tmp_path / "src.pt")["model_config"]
    assert payload["config"]["optimizer"] == "muon"
