"""Hugging Face Llama folders: a checkpoint exported as one, and one imported as lmtools weights.

lmtools' model is Llama's architecture (pre-norm RMSNorm with eps 1e-5, SwiGLU, RoPE, no
biases, untied head), so every weight maps one to one, with one twist: lmtools rotates adjacent
pairs (x[2i], x[2i+1]) as Meta's original Llama code did, while transformers' Llama rotates
halves (x[i], x[i + d_head/2]). The query and key rows are therefore permuted within each head on
the way out (the permutation transformers' convert_llama_weights_to_hf applies) and back on the
way in. Values pass bit for bit; tensors are read and written with `safetensors`, never pickle.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import torch

from lmtools.errors import ConfigError, DataError

# The ModelConfig fields a LlamaConfig expresses; any other field must keep its default.
LLAMA_FIELDS = ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff", "rope_theta")
NORM_EPS = 1e-5  # lmtools' RMSNorm
_ROTATED = ("attn.q_proj.weight", "attn.k_proj.weight")


# Each lmtools weight of a block (without its "layers.{i}." prefix), in the model's order.
BLOCK_WEIGHTS = (
    "ln1",
    "attn.q_proj",
    "attn.k_proj",
    "attn.v_proj",
    "attn.output_proj",
    "ln2",
    "ffn.w1",
    "ffn.w3",
    "ffn.w2",
)


def renamed_weights(
    num_layers: int, outer: tuple[str, str, str], block: str, names: tuple[str, ...]
) -> list[tuple[str, str]]:
    """(lmtools name, other name) of every weight, in the model's order. `outer`: the other names
    of the token embedding, final norm and head; `block`: a layer's prefix with `{i}`; `names`:
    the other names of BLOCK_WEIGHTS. Every name in `outer` and `names` is given without the
    ".weight" that ends it."""
    embed, norm, head = outer
    pairs = [("token_embeddings", embed)]
    for i in range(num_layers):
        pairs += [(f"layers.{i}.{ours}", block.format(i=i) + theirs) for ours, theirs in zip(BLOCK_WEIGHTS, names)]
    pairs += [("ln_final", norm), ("lm_head", head)]
    return [(f"{ours}.weight", f"{theirs}.weight") for ours, theirs in pairs]


def weight_names(num_layers: int) -> list[tuple[str, str]]:
    """(lmtools name, transformers name) of every weight, in the model's order."""
    return renamed_weights(
        num_layers,
        ("model.embed_tokens", "model.norm", "lm_head"),
        "model.layers.{i}.",
        (
            "input_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "post_attention_layernorm",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ),
    )


def pairs_to_halves(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder each head's rows from adjacent-pair RoPE layout to rotate-half layout."""
    out_dim, in_dim = w.shape
    return w.view(num_heads, out_dim // num_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def halves_to_pairs(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The inverse of `pairs_to_halves`."""
    out_dim, in_dim = w.shape
    return w.view(num_heads, 2, out_dim // num_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def to_hf_state(state: dict[str, torch.Tensor], model_cfg: dict) -> dict[str, torch.Tensor]:
    """An lmtools state dict as LlamaForCausalLM's (contiguous tensors, as safetensors needs)."""
    out = {}
    for ours, theirs in weight_names(int(model_cfg["num_layers"])):
        w = state[ours].detach().cpu()
        if ours.endswith(_ROTATED):
            w = pairs_to_halves(w, int(model_cfg["num_heads"]))
        out[theirs] = w.contiguous()
    return out


def from_hf_state(tensors: dict[str, torch.Tensor], model_cfg: dict) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM weights as an lmtools TransformerLM state dict."""
    out = {}
    for ours, theirs in weight_names(int(model_cfg["num_layers"])):
        w = tensors[theirs]
        if ours.endswith(_ROTATED):
            w = halves_to_pairs(w, int(model_cfg["num_heads"]))
        out[ours] = w.contiguous()
    return out


def check_exportable(model_cfg: dict) -> None:
    """Refuse a model whose shape a LlamaConfig cannot express: any option beyond Llama's that
    differs from lmtools' default, named in the error."""
    from lmtools.model import ModelConfig

    defaults = {f.name: f.default for f in fields(ModelConfig)}
    for key, value in model_cfg.items():
        if key in LLAMA_FIELDS:
            continue
        default = defaults.get(key, MISSING)
        if default is MISSING or value != default:
            raise ConfigError(
                f"the model's {key}={value!r} has no faithful Llama equivalent in transformers, so it cannot be "
                f"exported as a Hugging Face folder; use --format safetensors for its plain weights"
            )


# ---- export -----------------------------------------------------------------------------------


def llama_config(model_cfg: dict, eot_id: int | None, dtype: torch.dtype) -> dict:
    """config.json of LlamaForCausalLM (rope_theta spelled for transformers 4 and 5 alike)."""
    theta = float(model_cfg["rope_theta"])
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(model_cfg["vocab_size"]),
        "hidden_size": int(model_cfg["d_model"]),
        "intermediate_size": int(model_cfg["d_ff"]),
        "num_hidden_layers": int(model_cfg["num_layers"]),
        "num_attention_heads": int(model_cfg["num_heads"]),
        "num_key_value_heads": int(model_cfg["num_heads"]),
        "head_dim": int(model_cfg["d_model"]) // int(model_cfg["num_heads"]),
        "hidden_act": "silu",
        "max_position_embeddings": int(model_cfg["context_length"]),
        "rms_norm_eps": NORM_EPS,
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
        "torch_dtype": str(dtype).removeprefix("torch."),  # the name before transformers 5
    }


def tokenizer_files(tokenizer_json: str, eot: str, context_length: int) -> dict[str, str]:
    """tokenizer.json and the two small files that make AutoTokenizer load it as a fast tokenizer.

    As GPT-2's: <|endoftext|> is the beginning, end and unknown token; nothing is added to the
    text when encoding, so ids equal lmtools' own.
    """
    special = {"bos_token": eot, "eos_token": eot, "unk_token": eot}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
    }
    return {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": _json(config),
        "special_tokens_map.json": _json(special),
    }


def generation_config(eot_id: int | None) -> dict:
    """transformers' generation defaults, set to `lmtools sample`'s own (temperature 0.8, top-p 0.95)."""
    return {
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "pad_token_id": eot_id,
        "do_sample": True,
        "temperature": 0.8,
        "top_p": 0.95,
    }


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write `tensors` with safetensors; a failed write (a full disk) is an OSError, as Python's own."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt", **metadata})
    except SafetensorError as exc:  # its Rust I/O errors end in "(os error N)"
        found = re.search(r"\(os error (\d+)\)", str(exc))
        if found is None:
            raise
        code = int(found[1])
        raise OSError(code, os.strerror(code), str(path)) from None


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def model_card(payload: dict, model_cfg: dict, num_params: int) -> str:
    """README.md for the exported folder: what the model is and how it was trained."""
    from lmtools.config import TrainConfig

    cfg = TrainConfig.from_dict(payload.get("config") or {})
    metrics = payload.get("metrics") or {}
    steps = int(payload.get("iteration", 0))
    world = int(payload.get("world_size", 1))
    tokens = steps * cfg.batch_size * cfg.context_length * cfg.grad_accum_steps * world
    rows = [
        ("data", ", ".join(f"`{d}`" for d in cfg.train_data) or "unknown"),
        ("steps", f"{steps:,}"),
        ("tokens seen", f"{tokens:,}"),
        ("parameters", f"{num_params:,}"),
        ("model", ", ".join(f"{k} {model_cfg[k]}" for k in LLAMA_FIELDS)),
    ]
    if "val_loss" in metrics:
        rows.append(("final validation loss", f"{metrics['val_loss']:.4f} (at step {metrics.get('iter', steps)})"))
    if "val_bpb" in metrics:
        rows.append(("final validation bits per byte", f"{metrics['val_bpb']:.4f}"))
    if "loss" in metrics:
        rows.append(("final training loss", f"{metrics['loss']:.4f}"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [lmtools, llama]
---

# A Llama-architecture language model trained with lmtools

| | |
|---|---|
{table}

## Training command

```
{train_command(cfg)}
```

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=50)[0]))
```
"""


def train_command(cfg) -> str:
    """`lmtools train` with the flags whose values differ from the defaults: the run's command."""
    from lmtools.config import TrainConfig

    default = TrainConfig()
    parts = ["lmtools train"] + [f"--train_data {d}" for d in cfg.train_data]
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        if f.name in ("train_data", "tokenizer") or value == getattr(default, f.name) or value in (None, False):
            continue
        parts.append(f"--{f.name}" if value is True else f"--{f.name} {value}")
    return " ".join(parts)


# ---- import -----------------------------------------------------------------------------------


def import_llama(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], str | None]:
    """A Hugging Face Llama folder as (lmtools model config, TransformerLM state dict, tokenizer.json
    text or None). Weights are read with safetensors (one file or an index of shards) and widened
    to float32; a feature lmtools' model lacks is refused, named in the error."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise DataError(f"{folder} is not a Hugging Face model folder (no config.json)")
    try:
        hf_cfg = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{config_path} is not valid JSON ({exc})") from None
    model_cfg = model_config_from_llama(hf_cfg, config_path)
    tensors = _read_safetensors(folder)
    tied = hf_cfg.get("tie_word_embeddings", False)
    if "lm_head.weight" not in tensors and tied:
        # Untied by copy: the same function now, two weights that may part ways in training.
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    missing = [theirs for _, theirs in weight_names(model_cfg["num_layers"]) if theirs not in tensors]
    if missing:
        raise DataError(f"{folder} lacks {len(missing)} Llama weights, e.g. {missing[0]}")
    state = from_hf_state({k: v.float() for k, v in tensors.items()}, model_cfg)
    tok_path = folder / "tokenizer.json"
    tokenizer_json = tok_path.read_text(encoding="utf-8") if tok_path.is_file() else None
    return model_cfg, state, tokenizer_json


def model_config_from_llama(hf: dict, where: Path) -> dict:
    """lmtools' model config for a LlamaConfig dict, or a ConfigError naming what lmtools lacks."""

    def refuse(feature: str) -> ConfigError:
        return ConfigError(f"{where}: {feature}, which lmtools' model does not have; it cannot be imported")

    if hf.get("model_type") != "llama":
        raise refuse(f"model_type {hf.get('model_type')!r} is not a Llama model")
    d_model, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    if kv_heads != heads:
        raise refuse(f"grouped-query attention ({kv_heads} key/value heads for {heads} query heads)")
    if hf.get("head_dim") not in (None, d_model // heads):
        raise refuse(f"head_dim {hf['head_dim']} differs from hidden_size / num_attention_heads")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise refuse(f"{flag} is set (lmtools has no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise refuse(f"hidden_act {hf['hidden_act']!r} (lmtools' feed-forward is SwiGLU with silu)")
    if float(hf.get("rms_norm_eps", 1e-6)) != NORM_EPS:
        raise refuse(f"rms_norm_eps {hf.get('rms_norm_eps', 1e-6)} (lmtools' RMSNorm uses {NORM_EPS})")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    # transformers 4 writes rope_scaling, 5 rope_parameters: either may name a scaling.
    scaled = {rope.get("rope_type"), scaling.get("rope_type") or scaling.get("type")} - {None, "default"}
    if scaled:
        raise refuse(f"scaled RoPE ({', '.join(sorted(scaled))})")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    return {
        "vocab_size": int(hf["vocab_size"]),
        "context_length": int(hf.get("max_position_embeddings", 2048)),
        "d_model": d_model,
        "num_layers": int(hf["num_hidden_layers"]),
        "num_heads": heads,
        "d_ff": int(hf["intermediate_size"]),
        "rope_theta": float(theta),
    }


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors, or of the shards model.safetensors.index.json names."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise DataError(f"{index} is not a safetensors index ({exc})") from None
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        pickled = [p.name for p in folder.glob("*.bin")]
        hint = f" ({pickled[0]} is a pickle, which lmtools never loads)" if pickled else ""
        raise DataError(f"{folder} holds no model.safetensors{hint}; save it with safe_serialization=True")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            tensors.update(load_file(str(folder / name)))
        except (SafetensorError, OSError) as exc:
            raise DataError(f"{folder / name} is not a readable safetensors file ({exc})") from None
    return tensors
