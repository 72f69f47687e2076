"""Small models for the interop tests: a random TransformerLM (saved as an lmtools checkpoint)
and a random LlamaForCausalLM (saved as transformers saves it)."""

from __future__ import annotations

import torch

from lmtools.checkpoint import save_checkpoint
from lmtools.config.train_config import TrainConfig
from lmtools.data.tokenizer import bytes_tokenizer
from lmtools.model import TransformerLM


def random_model(seed=0, **shape) -> TransformerLM:
    cfg = dict(vocab_size=257, context_length=32, d_model=32, num_layers=2, num_heads=4, d_ff=48, rope_theta=500.0)
    torch.manual_seed(seed)
    model = TransformerLM(**(cfg | shape))
    with torch.no_grad():  # gains away from 1, so a misplaced norm weight shows
        for name, p in model.named_parameters():
            if name.endswith(("ln1.weight", "ln2.weight", "ln_final.weight")):
                p.uniform_(0.5, 1.5)
    return model.eval()


def write_checkpoint(path, model: TransformerLM, **extra):
    cfg = TrainConfig(train_data=["corpus/train.npy"], context_length=model.config.context_length)
    extra = {"tokenizer_json": bytes_tokenizer().to_str()} | extra
    save_checkpoint(model, None, 7, path, config=cfg.to_dict(), model_config=model.config.to_dict(), **extra)
    return path


def save_llama(path, sharded=False, **overrides):
    """A randomly initialised LlamaForCausalLM (gains away from 1), saved as transformers saves it."""
    import transformers  # only the interop tests need it (they skip without it)

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        **(
            {
                "vocab_size": 97,
                "hidden_size": 48,
                "intermediate_size": 80,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "max_position_embeddings": 40,
                "rms_norm_eps": 1e-5,
                "rope_theta": 2000.0,
            }
            | overrides
        )
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, max_shard_size="50KB" if sharded else "5GB")
    return model
