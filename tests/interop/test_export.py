"""Hugging Face export and import, checked against the real `transformers` and `safetensors`."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import MIXED_CORPUS_RUN, cli_output, flags
from lmtools.checkpoint import read_checkpoint, tokenizer_from_checkpoint
from lmtools.data.tokenizer import train_bpe
from lmtools.errors import ConfigError, DataError
from lmtools.generate import generate_ids, load_model
from lmtools.interop.export import export_checkpoint
from lmtools.interop.hf import check_exportable, halves_to_pairs, import_llama, pairs_to_halves
from lmtools.layout import EOT
from lmtools.model import RotaryEmbedding, TransformerLM
from models import random_model, save_llama, write_checkpoint
from prepared import mixed_documents, prepare_mixed, train_on_mixed

transformers = pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"  # every load below is from a local folder

MIXED_TEXT = (
    "def greet(name):\n    return f'héllo {name}!'  # naïve café\n"
    "東京 日本語 Straße ünïcödé 😀<|endoftext|>the cat sat on a mat\n\t{'k': [1, 2]}"
)


def hf_logits(folder, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.dtype == torch.float32
    with torch.no_grad():
        return model(ids).logits


# ---- the mapping -------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(heads=st.integers(1, 4), half=st.integers(1, 8), width=st.integers(1, 6))
def test_pair_and_half_layouts_are_inverse_permutations(heads, half, width):
    w = torch.randn(heads * 2 * half, width)
    out = pairs_to_halves(w, heads)
    assert sorted(out[:, 0].tolist()) == sorted(w[:, 0].tolist())
    assert torch.equal(halves_to_pairs(out, heads), w)
    # Within a head: row 2i goes to i, row 2i+1 to i + half.
    assert torch.equal(out[:half], w[0 : 2 * half : 2]) and torch.equal(out[half : 2 * half], w[1 : 2 * half : 2])


def test_adjacent_pair_rope_equals_rotate_half_rope_on_permuted_rows():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half  # noqa: F401

    d_head, t, theta = 16, 10, 500.0
    x = torch.randn(1, 1, t, d_head, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rope = RotaryEmbedding(d_head, t, theta).double()
    rope.reset()  # the tables in float64 too
    ours = rope(x, torch.arange(t))
    inv = theta ** (-torch.arange(0, d_head, 2, dtype=torch.float64) / d_head)
    angles = torch.arange(t, dtype=torch.float64)[:, None] * inv
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    permuted = pairs_to_halves(x[0, 0].T, 1).T[None, None]
    theirs, _ = apply_rotary_pos_emb(permuted, permuted, cos[None], sin[None])
    assert torch.allclose(pairs_to_halves(ours[0, 0].T, 1).T, theirs[0, 0], atol=1e-12)


# ---- export --------------------------------------------------------------------------------


def test_exported_folder_loads_offline_and_gives_lmtools_logits(tmp_path):
    model = random_model()
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", model, metrics={"iter": 7, "val_loss": 2.5, "val_bpb": 1.25})
    files = export_checkpoint(ckpt, tmp_path / "hf")
    assert {f.name for f in files} == {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "README.md",
        "lmtools_export.json",  # what export wrote: what a later --overwrite may replace
    }
    record = json.loads((tmp_path / "hf" / "lmtools_export.json").read_text())
    assert set(record["files"]) == {f.name for f in files} - {"lmtools_export.json"} and record["format"] == "hf"
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rms_norm_eps"] == 1e-5 and config["max_position_embeddings"] == 32
    assert config["num_key_value_heads"] == 4 and config["tie_word_embeddings"] is False
    assert config["bos_token_id"] == config["eos_token_id"] == 256
    loaded = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert loaded.rope_parameters["rope_theta"] == 500.0 and loaded.hidden_act == "silu"

    ids = torch.randint(0, 257, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids)
    torch.testing.assert_close(hf_logits(tmp_path / "hf", ids), ours, atol=1e-4, rtol=0)
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "2.5000" in card and "1.2500" in card and "lmtools train --train_data corpus/train.npy" in card
    assert "| steps | 7 |" in card


def test_export_then_import_gives_bit_identical_weights(tmp_path):
    model = random_model(seed=3, num_heads=2)
    export_checkpoint(write_checkpoint(tmp_path / "ckpt.pt", model), tmp_path / "hf")
    cfg, state, tokenizer_json = import_llama(tmp_path / "hf")
    assert cfg == model.config.to_dict()
    original = model.state_dict()
    assert state.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(state[name], tensor), name
    assert tokenizer_json is not None and json.loads(tokenizer_json)["model"]["type"] == "BPE"


def test_safetensors_format_holds_plain_weights_and_the_config(tmp_path):
    from safetensors import safe_open

    model = random_model()
    export_checkpoint(write_checkpoint(tmp_path / "ckpt.pt", model), tmp_path / "w", fmt="safetensors")
    with safe_open(tmp_path / "w" / "model.safetensors", "pt") as f:
        assert json.loads(f.metadata()["lmtools_model_config"]) == model.config.to_dict()
        assert set(f.keys()) == set(model.state_dict())
        for name, tensor in model.state_dict().items():
            assert torch.equal(f.get_tensor(name), tensor)


def test_gguf_reads_back_and_loads_in_transformers_with_equal_logits_and_ids(tmp_path):
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("accelerate")  # transformers' GGUF loader needs it
    bpe = train_bpe([mixed_documents(200)], 300)
    model = random_model(num_heads=2, vocab_size=300)
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", model, tokenizer_json=bpe.to_str())
    export_checkpoint(ckpt, tmp_path / "g", fmt="gguf")
    reader = gguf.GGUFReader(tmp_path / "g" / "model.gguf")
    fields = {name: f.contents() for name, f in reader.fields.items()}
    assert fields["general.architecture"] == "llama" and fields["llama.attention.head_count"] == 2
    # A float32 field, as llama.cpp (and lmtools' float32 RMSNorm) uses the eps.
    assert fields["llama.rope.freq_base"] == 500.0 and fields["llama.attention.layer_norm_rms_epsilon"] == np.float32(
        1e-5
    )
    eot = bpe.token_to_id(EOT)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.eos_token_id"] == eot
    assert fields["tokenizer.ggml.tokens"][eot] == EOT and len(fields["tokenizer.ggml.tokens"]) == 300
    stored = {t.name: np.array(t.data) for t in reader.tensors}
    state = model.state_dict()
    assert np.array_equal(stored["blk.1.attn_q.weight"], state["layers.1.attn.q_proj.weight"].numpy())
    assert np.array_equal(stored["output.weight"], state["lm_head.weight"].numpy()) and len(stored) == len(state)

    # transformers reads GGUF as llama.cpp lays it out (its own q/k permutation included).
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file="model.gguf").eval()
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids), atol=1e-4, rtol=0)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "g", gguf_file="model.gguf")
    assert tok(MIXED_TEXT)["input_ids"] == bpe.encode(MIXED_TEXT, add_special_tokens=False).ids

    # The byte tokenizer has no merges, which llama.cpp cannot load: refused, not written.
    with pytest.raises(ConfigError, match="merges"):
        export_checkpoint(write_checkpoint(tmp_path / "b.pt", random_model()), tmp_path / "b", fmt="gguf")


def test_model_options_beyond_llama_are_refused_by_name(tmp_path):
    base = random_model().config.to_dict()
    check_exportable(base)  # every lmtools default is Llama-expressible
    for extra in ({"qk_norm": True}, {"ffn": "relu2"}, {"logit_softcap": 30.0}):
        with pytest.raises(ConfigError, match=next(iter(extra))):
            check_exportable(base | extra)
    ckpt = tmp_path / "ckpt.pt"
    write_checkpoint(ckpt, random_model())
    payload = read_checkpoint(ckpt)
    payload["model_config"]["logit_softcap"] = 30.0
    torch.save(payload, ckpt)
    out = cli_output("export", ckpt, "--out", tmp_path / "hf", code=2)
    assert "logit_softcap=30.0" in out and "Traceback" not in out and len(out.strip().splitlines()) == 1
    assert not (tmp_path / "hf").exists()


def test_export_keeps_an_existing_folder_and_needs_a_tokenizer(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", random_model())
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "mine.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):  # a folder export did not write is never replaced
        out = cli_output("export", ckpt, "--out", tmp_path / "hf", *extra, code=2)
        assert "did not write" in out and "mine.txt" in out and len(out.strip().splitlines()) == 1
        assert (tmp_path / "hf" / "mine.txt").read_text() == "keep me"
    cli_output("export", ckpt, "--out", tmp_path / "ours")
    out = cli_output("export", ckpt, "--out", tmp_path / "ours", code=2)
    assert "--overwrite" in out and "already holds an export" in out
    (tmp_path / "ours" / "README.md").write_text("an old card")
    cli_output("export", ckpt, "--out", tmp_path / "ours", "--overwrite")
    assert (tmp_path / "ours" / "README.md").read_text() != "an old card"
    assert (tmp_path / "ours" / "model.safetensors").is_file()

    payload = read_checkpoint(ckpt)
    payload.pop("tokenizer_json")
    torch.save(payload, ckpt)
    out = cli_output("export", ckpt, "--out", tmp_path / "hf2", code=2)
    assert "no tokenizer" in out and "--tokenizer" in out and not (tmp_path / "hf2").exists()


# ---- import --------------------------------------------------------------------------------


def assert_same_logits(model_cfg, state, theirs):
    ours = TransformerLM.from_config(model_cfg)
    ours.load_state_dict(state)  # strict: every weight, no extras
    ids = torch.randint(
        0, model_cfg["vocab_size"], (2, model_cfg["context_length"]), generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids), theirs(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sharded", [False, True])
def test_random_llama_imports_and_gives_transformers_logits(tmp_path, sharded):
    theirs = save_llama(tmp_path, sharded)
    assert (tmp_path / "model.safetensors.index.json").is_file() == sharded
    model_cfg, state, tokenizer_json = import_llama(tmp_path)
    assert model_cfg == dict(
        vocab_size=97, context_length=40, d_model=48, num_layers=2, num_heads=4, d_ff=80, rope_theta=2000.0
    )
    assert tokenizer_json is None
    assert_same_logits(model_cfg, state, theirs)


def test_tied_embeddings_are_untied_by_copy(tmp_path):
    theirs = save_llama(tmp_path, tie_word_embeddings=True)
    model_cfg, state, _ = import_llama(tmp_path)
    assert torch.equal(state["lm_head.weight"], state["token_embeddings.weight"])
    assert_same_logits(model_cfg, state, theirs)


@pytest.mark.parametrize(
    "change, named",
    [
        ({"num_key_value_heads": 2}, "grouped-query attention"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "scaled RoPE"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "scaled RoPE"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rms_norm_eps": 1e-6}, "rms_norm_eps"),
        ({"model_type": "mistral"}, "not a Llama model"),
    ],
)
def test_features_lmtools_lacks_are_refused_by_name(tmp_path, change, named):
    save_llama(tmp_path)
    spec = json.loads((tmp_path / "config.json").read_text()) | change
    (tmp_path / "config.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match=named):
        import_llama(tmp_path)


def test_import_never_unpickles(tmp_path):
    with pytest.raises(DataError, match="no config.json"):
        import_llama(tmp_path)
    save_llama(tmp_path)
    os.replace(tmp_path / "model.safetensors", tmp_path / "pytorch_model.bin")
    with pytest.raises(DataError, match="pytorch_model.bin is a pickle"):
        import_llama(tmp_path)


# ---- a model trained by the CLI ---------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    data, ckpt = train_on_mixed(root, max_iters=60, eval_interval=30, log_interval=30)
    cli_output("export", ckpt, "--out", root / "hf")
    return data, ckpt, root / "hf"


@pytest.mark.slow
def test_trained_model_exports_with_equal_logits_and_greedy_text(trained):
    data, ckpt, hf = trained
    model, payload = load_model(ckpt, torch.device("cpu"))
    val = torch.from_numpy(np.load(data / "val.npy")[: 4 * 64].astype(np.int64)).view(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(hf, val), model(val), atol=1e-4, rtol=0)

    tok = tokenizer_from_checkpoint(payload)
    prompt = tok.encode("the cat", add_special_tokens=False).ids
    ours = list(generate_ids(model, prompt, 50, temperature=0))  # no stop token: all 50
    theirs_model = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    out = theirs_model.generate(torch.tensor([prompt]), max_new_tokens=50, min_new_tokens=50, do_sample=False)
    assert out[0, len(prompt) :].tolist() == ours and len(ours) == 50
    # `lmtools sample` at temperature 0 writes the text transformers generates (both stop at <|endoftext|>).
    sampled = cli_output("sample", ckpt, "--prompt", "the cat", "--temperature", "0", "--max_new_tokens", "50")
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf)
    out = theirs_model.generate(torch.tensor([prompt]), max_new_tokens=50, do_sample=False)
    assert sampled == "the cat" + hf_tok.decode(out[0, len(prompt) :], skip_special_tokens=True) + "\n"

    card = (hf / "README.md").read_text()
    assert f"{payload['metrics']['val_loss']:.4f}" in card and "bits per byte" in card
    assert f"| tokens seen | {60 * 8 * 64:,} |" in card


@pytest.mark.slow
def test_auto_tokenizer_gives_lmtools_ids(trained):
    _, ckpt, hf = trained
    ours = tokenizer_from_checkpoint(read_checkpoint(ckpt))
    theirs = transformers.AutoTokenizer.from_pretrained(hf)
    for text in (MIXED_TEXT, EOT, "", "  spaces\r\n\ttabs", "ß" * 30):
        ids = ours.encode(text, add_special_tokens=False).ids
        assert theirs(text)["input_ids"] == ids, text
        assert theirs.decode(ids) == ours.decode(ids, skip_special_tokens=False)
    assert theirs(MIXED_TEXT)["input_ids"].count(ours.token_to_id(EOT)) == 1
    assert theirs.eos_token == theirs.bos_token == EOT


@pytest.mark.slow
def test_checkpoint_travels_without_its_dataset(tmp_path):
    data, ckpt = train_on_mixed(tmp_path, n_docs=120, max_iters=6, eval_interval=6, log_interval=3)
    stored = read_checkpoint(ckpt)["tokenizer_json"]
    assert stored == (data / "tokenizer.json").read_text(encoding="utf-8")
    before = cli_output("sample", ckpt, "--prompt", "the café", "--temperature", "0", "--max_new_tokens", "20")
    shutil.rmtree(data)
    assert cli_output("sample", ckpt, "--prompt", "the café", "--temperature", "0", "--max_new_tokens", "20") == before
    cli_output("export", ckpt, "--out", tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.json").read_text(encoding="utf-8") == stored
    report = json.loads(cli_output("inspect", ckpt, "--json"))
    assert report["tokenizer"]["stored"] is True and report["tokenizer"]["found"] is None
    assert report["tokenizer"]["vocab_size"] == read_checkpoint(ckpt)["model_config"]["vocab_size"]
    text = tmp_path / "doc.txt"
    text.write_text("the cat sat on a mat", encoding="utf-8")
    assert json.loads(cli_output("eval", ckpt, text, "--json"))["files"][0]["bits_per_byte"] > 0


@pytest.mark.slow
def test_sharded_checkpoint_exports(tmp_path):
    from helpers import torchrun

    data = prepare_mixed(tmp_path, n_docs=120)
    ckpt = tmp_path / "run" / "ckpt.pt"
    run = torchrun(
        "train",
        "--fsdp",
        "--train_data",
        data,
        *MIXED_CORPUS_RUN,
        *flags(max_iters=4, eval_interval=4, log_interval=2, checkpoint_path=ckpt),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "dcp" in read_checkpoint(ckpt)
    cli_output("export", ckpt, "--out", tmp_path / "hf")
    model, _ = load_model(ckpt, torch.device("cpu"))
    ids = torch.from_numpy(np.load(data / "val.npy")[:64].astype(np.int64))[None]
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(tmp_path / "hf", ids), model(ids), atol=1e-4, rtol=0)
