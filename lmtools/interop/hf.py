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
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import torch

from lmtools.checkpoint import stored_config
from lmtools.config.train_config import TrainConfig
from lmtools.errors import ConfigError, DataError
from lmtools.model import ModelConfig
from lmtools.training.preflight import MODEL_BOUNDS

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
        "tokenizer_config.json": json_text(config),
        "special_tokens_map.json": json_text(special),
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


def json_text(obj: Any) -> str:
    """JSON as the files of a Hugging Face folder hold it: indented, UTF-8 as is, a final newline."""
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def model_card(payload: dict, model_cfg: dict, num_params: int) -> str:
    """README.md for the exported folder: what the model is and how it was trained."""
    cfg = TrainConfig.from_dict(stored_config(payload))
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
    default = TrainConfig()
    parts = ["lmtools train"] + [f"--train_data {d}" for d in cfg.train_data]
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        if f.name in ("train_data", "tokenizer") or value == getattr(default, f.name) or value in (None, False):
            continue
        parts.append(f"--{f.name}" if value is True else f"--{f.name} {value}")
    return " ".join(parts)


# ---- import -----------------------------------------------------------------------------------
#
# A folder is input like any other: every field of config.json is checked for type and range
# (LLAMA_CONFIG) before anything is built, then every tensor's name, dtype and shape is read from
# the safetensors headers and checked against the config's model before a byte of weights is
# loaded. The import is the folder's model exactly, or one error naming what does not fit.

REQUIRED = object()  # a field without a default
# config.json and the shard index are a few KiB; far beyond that, a file is not one transformers wrote.
JSON_LIMIT = 16 << 20
# The dtypes that float32 (lmtools' weights) holds exactly; others would be narrowed or are not weights.
EXACT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
INDEX = "model.safetensors.index.json"
FIX = "fix the file, or save the model again with transformers' save_pretrained"

# Every config.json key lmtools reads. Types are JSON's as transformers writes them: an int is a
# JSON integer (not a bool, not 64.0, not "64"); a float is any finite positive number. An int is
# bounded by the sane bound of the lmtools field named last (preflight.MODEL_BOUNDS). A default of
# None also admits null, which transformers writes for "derive it".
# fmt: off
LLAMA_CONFIG = (
    # key                      type   default    bound
    ("vocab_size",              int,   REQUIRED,  "vocab_size"),
    ("hidden_size",             int,   REQUIRED,  "d_model"),
    ("intermediate_size",       int,   REQUIRED,  "d_ff"),
    ("num_hidden_layers",       int,   REQUIRED,  "num_layers"),
    ("num_attention_heads",     int,   REQUIRED,  "num_heads"),
    ("num_key_value_heads",     int,   None,      "num_heads"),
    ("head_dim",                int,   None,      "d_model"),
    ("max_position_embeddings", int,   2048,      "context_length"),  # LlamaConfig's defaults
    ("rms_norm_eps",            float, 1e-6,      None),
    ("rope_theta",              float, None,      None),
    ("rope_scaling",            dict,  None,      None),  # transformers 4
    ("rope_parameters",         dict,  None,      None),  # transformers 5
    ("hidden_act",              str,   "silu",    None),
    ("attention_bias",          bool,  False,     None),
    ("mlp_bias",                bool,  False,     None),
    ("tie_word_embeddings",     bool,  False,     None),
)
# The keys of rope_scaling / rope_parameters lmtools reads ("type": rope_scaling's older rope_type).
ROPE_CONFIG = (
    ("rope_type",               str,   None,      None),
    ("type",                    str,   None,      None),
    ("rope_theta",              float, None,      None),
)
# fmt: on


def import_llama(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], str | None]:
    """A Hugging Face Llama folder as (lmtools model config, TransformerLM state dict, tokenizer.json
    text or None). Weights are read with safetensors (one file or an index of shards) and widened
    to float32; anything that is not the config's Llama is refused, named in the error."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise DataError(f"{folder} is not a Hugging Face model folder (no config.json)")
    hf_cfg = read_json(config_path)
    model_cfg = model_config_from_llama(hf_cfg, config_path)
    tied = hf_cfg.get("tie_word_embeddings") is True  # a bool: model_config_from_llama checked it
    headers = _tensor_headers(folder, _shard_files(folder))
    _check_tensors(headers, llama_shapes(model_cfg), tied, folder)
    tensors = _load_tensors(folder, headers)
    if tied:
        _tie_head(tensors, folder)
    state = from_hf_state(tensors, model_cfg)
    return model_cfg, state, _tokenizer_text(folder / "tokenizer.json")


def model_config_from_llama(hf: Any, where: Path) -> dict:
    """lmtools' model config for a LlamaConfig dict: every field checked first (LLAMA_CONFIG),
    then each Llama feature lmtools' model lacks refused by name (a ConfigError)."""

    def refuse(feature: str) -> ConfigError:
        return ConfigError(f"{where}: {feature}, which lmtools' model does not have; it cannot be imported")

    if not isinstance(hf, dict):
        raise DataError(f"{where} is not a JSON object (it holds a {type(hf).__name__}); {FIX}")
    if hf.get("model_type") != "llama":
        raise refuse(f"model_type {_shown(hf.get('model_type'))} is not a Llama model")
    c = read_fields(LLAMA_CONFIG, hf, f"{where}: ")
    d_model, heads = c["hidden_size"], c["num_attention_heads"]
    kv_heads = c["num_key_value_heads"] or heads
    if kv_heads != heads:
        raise refuse(f"grouped-query attention ({kv_heads} key/value heads for {heads} query heads)")
    if d_model % heads:
        raise refuse(f"heads that do not split hidden_size {d_model} evenly ({heads} heads)")
    if c["head_dim"] not in (None, d_model // heads):
        raise refuse(f"head_dim {c['head_dim']} differs from hidden_size / num_attention_heads")
    if d_model // heads % 2:  # RoPE rotates pairs of a head's dimensions
        raise refuse(f"an odd head size ({d_model // heads})")
    for flag in ("attention_bias", "mlp_bias"):
        if c[flag]:
            raise refuse(f"{flag} is set (lmtools has no biases)")
    if c["hidden_act"] != "silu":
        raise refuse(f"hidden_act {c['hidden_act']!r} (lmtools' feed-forward is SwiGLU with silu)")
    if c["rms_norm_eps"] != NORM_EPS:
        raise refuse(f"rms_norm_eps {c['rms_norm_eps']} (lmtools' RMSNorm uses {NORM_EPS})")
    return {
        "vocab_size": c["vocab_size"],
        "context_length": c["max_position_embeddings"],
        "d_model": d_model,
        "num_layers": c["num_hidden_layers"],
        "num_heads": heads,
        "d_ff": c["intermediate_size"],
        "rope_theta": _rope_theta(c, where, refuse),
    }


def read_fields(table: tuple, data: dict, where: str) -> dict[str, Any]:
    """Each field of `table` from `data` (its default where absent), or a ConfigError naming the
    first whose type or range is wrong; `where` prefixes the field's name in the error."""
    values = {}
    for key, kind, default, bound in table:
        value = data.get(key, default)
        if value is REQUIRED:
            raise ConfigError(f"{where}{key} is missing; {FIX}")
        expected = None if value is None and default is None else _expected(value, kind, bound)
        if expected:
            raise ConfigError(f"{where}{key} must be {expected}, got {_shown(value)}; {FIX}")
        values[key] = value
    return values


def _expected(value: Any, kind: type, bound: str | None) -> str | None:
    """What a field of this kind must be, where `value` is not that; None where it is."""
    if kind is int:  # type(), not isinstance: True is an int in Python, not in config.json
        limit = MODEL_BOUNDS[bound]
        fits = type(value) is int and 1 <= value <= limit
        return None if fits else f"an integer from 1 to {limit:,} (lmtools' sane bound for {bound})"
    if kind is float:  # the comparisons refuse NaN, infinities and integers beyond a float
        fits = type(value) in (int, float) and 0 < value <= sys.float_info.max
        return None if fits else "a positive finite number"
    return None if type(value) is kind else {str: "a string", bool: "true or false", dict: "an object or null"}[kind]


def _shown(value: Any) -> str:
    """A value as config.json spells it, cut short; a list or an object by its kind alone."""
    if isinstance(value, (list, dict)):
        return f"a JSON {'list' if isinstance(value, list) else 'object'}"
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _rope_theta(c: dict, where: Path, refuse) -> float:
    """RoPE's base, from rope_theta (transformers 4) or rope_parameters (5); a scaled RoPE is
    refused, and two bases that disagree are one model too many."""
    thetas, scaled = set(), set()
    if c["rope_theta"] is not None:
        thetas.add(float(c["rope_theta"]))
    for key in ("rope_scaling", "rope_parameters"):
        if c[key] is not None:
            rope = read_fields(ROPE_CONFIG, c[key], f"{where}: {key}.")
            scaled |= {rope["rope_type"], rope["type"]} - {None, "default"}
            if rope["rope_theta"] is not None:
                thetas.add(float(rope["rope_theta"]))
    if scaled:
        raise refuse(f"scaled RoPE ({', '.join(sorted(scaled))})")
    if len(thetas) > 1:
        raise ConfigError(f"{where}: rope_theta is given twice, as {' and '.join(map(str, sorted(thetas)))}; {FIX}")
    return thetas.pop() if thetas else 10000.0


def read_json(path: Path) -> Any:
    """A JSON file of a Hugging Face folder, or a DataError saying why it cannot be one."""
    try:
        with open(path, "rb") as f:
            raw = f.read(JSON_LIMIT + 1)
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror or exc})") from None
    if len(raw) > JSON_LIMIT:
        raise DataError(f"{path} is larger than {JSON_LIMIT >> 20} MiB, so transformers did not write it; {FIX}")
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise DataError(f"{path} is nested too deep to be read; {FIX}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); {FIX}") from None
    except ValueError:  # Python's limit on the digits of an integer read from text
        raise DataError(f"{path} holds an integer with too many digits to be read; {FIX}") from None


def llama_shapes(model_cfg: dict) -> dict[str, tuple[int, ...]]:
    """The transformers name and shape of every weight of the Llama `model_cfg` describes (the
    query and key permutation keeps shapes, so lmtools' model has the same ones)."""
    d, ff, vocab = model_cfg["d_model"], model_cfg["d_ff"], model_cfg["vocab_size"]
    shapes = {"token_embeddings": (vocab, d), "ln_final": (d,), "lm_head": (vocab, d), "ln1": (d,), "ln2": (d,)}
    shapes |= {f"attn.{p}": (d, d) for p in ("q_proj", "k_proj", "v_proj", "output_proj")}
    shapes |= {"ffn.w1": (ff, d), "ffn.w3": (ff, d), "ffn.w2": (d, ff)}
    return {theirs: shapes[_weight_kind(ours)] for ours, theirs in weight_names(model_cfg["num_layers"])}


def _weight_kind(ours: str) -> str:
    """An lmtools weight's name without its layer and ".weight": "layers.3.attn.q_proj.weight" -> "attn.q_proj"."""
    name = ours.removesuffix(".weight")
    return name.split(".", 2)[2] if name.startswith("layers.") else name


def _shard_files(folder: Path) -> list[str]:
    """The safetensors files of the folder: model.safetensors, or the shards its index names,
    each a plain file name beside the index (never a path that leaves the folder)."""
    index = folder / INDEX
    if not index.is_file():
        if (folder / "model.safetensors").is_file():
            return ["model.safetensors"]
        pickled = [p.name for p in folder.glob("*.bin")]
        hint = f" ({pickled[0]} is a pickle, which lmtools never loads)" if pickled else ""
        raise DataError(f"{folder} holds no model.safetensors{hint}; save it with safe_serialization=True")
    weight_map = read_json(index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise DataError(f"{index}: its weight_map must map each tensor's name to a shard's file name; {FIX}")
    files = sorted(set(weight_map.values()))
    for name in files:
        if name in ("", ".", "..") or Path(name).name != name or "\\" in name or "\0" in name:
            raise DataError(f"{index} names the shard {_shown(name)}, which is not a file name in {folder}; {FIX}")
        if not (folder / name).is_file():
            raise DataError(f"{index} names the shard {name}, which is not in {folder}; copy the whole folder")
    return files


def _tensor_headers(folder: Path, files: list[str]) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """Name -> (file, safetensors dtype, shape) of every tensor in the files, from their headers
    alone (no weights read); a tensor held by two files is refused, as either could be meant."""
    from safetensors import SafetensorError, safe_open

    found: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    for file in files:
        try:
            with safe_open(str(folder / file), framework="pt") as f:
                for name in f.keys():
                    if name in found:
                        raise DataError(f"{folder}: {name} is in both {found[name][0]} and {file}; {FIX}")
                    part = f.get_slice(name)
                    found[name] = (file, part.get_dtype(), tuple(part.get_shape()))
        except (SafetensorError, OSError) as exc:
            raise DataError(f"{folder / file} is not a readable safetensors file ({exc})") from None
    return found


def _check_tensors(headers: dict, expected: dict[str, tuple[int, ...]], tied: bool, folder: Path) -> None:
    """Every tensor is one of the config's Llama weights, of its shape, in a dtype float32 holds
    exactly, and every weight is there (the head may be missing when tied to the embeddings)."""
    for name, (file, dtype, shape) in headers.items():
        if name not in expected:
            raise DataError(
                f"{folder / file} holds {name}, which the Llama of config.json has no place for (lmtools' model "
                f"has no biases or extra weights); it cannot be imported"
            )
        if dtype not in EXACT_DTYPES:
            raise DataError(
                f"{folder / file}: {name} is {_torch_dtype_name(dtype)}; lmtools imports weights of "
                f"{', '.join(EXACT_DTYPES.values())} (which float32 holds exactly); save the model in one of those"
            )
        if shape != expected[name]:
            raise DataError(
                f"{folder / file}: {name} has shape {shape}, but config.json's model needs {expected[name]}; "
                f"the weights and config.json are of different models"
            )
    missing = [name for name in expected if name not in headers and not (tied and name == "lm_head.weight")]
    if missing:
        raise DataError(f"{folder} lacks {len(missing)} Llama weights, e.g. {missing[0]}")


def _torch_dtype_name(code: str) -> str:
    """safetensors' dtype codes (F64, I8, U16, BOOL) as torch names them (float64, int8, ...)."""
    prefix = {"F": "float", "I": "int", "U": "uint"}.get(code[:1])
    return prefix + code[1:].lower() if prefix and code[1:2].isdigit() else code.lower()


def _load_tensors(folder: Path, headers: dict) -> dict[str, torch.Tensor]:
    """Every tensor the headers list, widened to float32 (exact for the dtypes checked)."""
    from safetensors import SafetensorError, safe_open

    tensors = {}
    for file in sorted({file for file, _, _ in headers.values()}):
        try:
            with safe_open(str(folder / file), framework="pt") as f:
                tensors |= {name: f.get_tensor(name).float() for name in f.keys()}
        except (SafetensorError, OSError) as exc:
            raise DataError(f"{folder / file} is not a readable safetensors file ({exc})") from None
    return tensors


def _tie_head(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """A tied head is the embedding: untied here by copy (the same function now, two weights that
    may part ways in training). A stored head other than the embedding is not the tied model."""
    embed = tensors["model.embed_tokens.weight"]
    head = tensors.setdefault("lm_head.weight", embed.clone())
    if not torch.equal(head, embed):
        raise DataError(
            f"{folder}: config.json ties lm_head to the embeddings (tie_word_embeddings), but lm_head.weight "
            f"differs from model.embed_tokens.weight; {FIX}"
        )


def _tokenizer_text(path: Path) -> str | None:
    """tokenizer.json's text, where the folder has one."""
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} cannot be read as text ({exc}); {FIX}") from None
