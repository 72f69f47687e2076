"""GGUF for llama.cpp: the model as its `llama` architecture, with the byte-level BPE tokenizer.

llama.cpp's llama rotates adjacent pairs, as lmtools does (transformers' permutation is undone
by llama.cpp's own converter), so the weights go in unchanged, in float32. Only a plain GPT-2
style byte-level BPE (what `lmtools prepare` trains) is written: llama.cpp's `gpt2` tokenizer
with the GPT-2 split pattern encodes exactly as it does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmtools.data.tokenizer import _plain_byte_level
from lmtools.errors import ConfigError
from lmtools.interop.hf import NORM_EPS, renamed_weights


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError("--format gguf needs the gguf package: pip install 'lmtools[gguf]' (or gguf)") from None
    return gguf


def gguf_names(num_layers: int) -> list[tuple[str, str]]:
    """(lmtools name, GGUF tensor name) of every weight."""
    return renamed_weights(
        num_layers,
        ("token_embd", "output_norm", "output"),
        "blk.{i}.",
        ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"),
    )


def gguf_vocab(tokenizer_json: str, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens by id (padded to the model's vocabulary), their GGUF types, and the merges."""
    gguf = _gguf()
    spec = json.loads(tokenizer_json)
    model = spec.get("model") or {}
    if not _plain_byte_level(spec, model):
        raise ConfigError(
            "--format gguf needs a plain byte-level BPE tokenizer (as lmtools prepare trains); "
            "this checkpoint's tokenizer is another kind"
        )
    by_id = {int(i): tok for tok, i in model["vocab"].items()}
    special = set()
    for added in spec.get("added_tokens") or []:
        by_id[int(added["id"])] = added["content"]
        special.add(int(added["id"]))
    if max(by_id) >= vocab_size:
        raise ConfigError(f"the tokenizer has ids up to {max(by_id)}, beyond the model's vocabulary of {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(
            gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if not merges:
        raise ConfigError(
            "--format gguf needs a BPE with merges (llama.cpp loads no byte-level vocabulary "
            "without them); this checkpoint's tokenizer has none"
        )
    return tokens, types, merges


def write_gguf(
    path: Path, state: dict[str, torch.Tensor], model_cfg: dict, tokenizer_json: str, eot_id: int | None
) -> None:
    """One float32 GGUF file: llama hyperparameters, the tokenizer, every weight."""
    gguf = _gguf()
    tokens, types, merges = gguf_vocab(tokenizer_json, int(model_cfg["vocab_size"]))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(int(model_cfg["context_length"]))
    writer.add_embedding_length(int(model_cfg["d_model"]))
    writer.add_block_count(int(model_cfg["num_layers"]))
    writer.add_feed_forward_length(int(model_cfg["d_ff"]))
    writer.add_head_count(int(model_cfg["num_heads"]))
    writer.add_head_count_kv(int(model_cfg["num_heads"]))
    writer.add_rope_dimension_count(int(model_cfg["d_model"]) // int(model_cfg["num_heads"]))
    writer.add_rope_freq_base(float(model_cfg["rope_theta"]))
    writer.add_layer_norm_rms_eps(NORM_EPS)
    writer.add_vocab_size(int(model_cfg["vocab_size"]))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if eot_id is not None:
        writer.add_bos_token_id(eot_id)
        writer.add_eos_token_id(eot_id)
    writer.add_add_bos_token(False)
    for ours, theirs in gguf_names(int(model_cfg["num_layers"])):
        writer.add_tensor(theirs, state[ours].detach().float().cpu().contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
