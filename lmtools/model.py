"""The Transformer language model: a pre-norm, decoder-only stack with RoPE and SwiGLU.

Data flows top to bottom through this file: RMSNorm, rotary embedding, attention, feed-forward,
block, model. No biases anywhere; RMSNorm runs in float32 whatever the autocast dtype.

Beyond the specification's model, a few architecture options (off by default, so the default
model is the specification's): RMSNorm on queries and keys (`qk_norm`), a ReLU² feed-forward
(`ffn="relu2"`), zero-initialised residual output projections (`zero_init_proj`) and a tanh
cap on the logits (`logit_softcap`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from lmtools.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    context_length: int
    d_model: int
    num_layers: int
    num_heads: int
    d_ff: int
    rope_theta: float = 10000.0
    # Architecture options; each default is the specification's model.
    qk_norm: bool = False
    ffn: str = "swiglu"
    zero_init_proj: bool = False
    logit_softcap: float = 0.0  # 0: no cap

    def to_dict(self) -> dict:
        """The fields, with each option beyond the specification's model only when it is set:
        a specification model's config reads exactly as it always has."""
        out = asdict(self)
        for name in OPTION_FIELDS:
            if out[name] == OPTION_DEFAULTS[name]:
                del out[name]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """From a checkpoint's dict; fields it lacks (older checkpoints) keep their defaults."""
        return cls(**{k: data[k] for k in MODEL_FIELDS if k in data})

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward), attention included (PaLM appendix B)."""
        n = non_embedding_params(self)
        attn = 12 * self.num_layers * self.d_model * self.context_length
        return 6 * n + attn


# The hyperparameters a checkpoint carries to rebuild its model.
MODEL_FIELDS = tuple(f.name for f in fields(ModelConfig))
# The architecture options beyond the specification's model, and their defaults (which are it).
OPTION_FIELDS = ("qk_norm", "ffn", "zero_init_proj", "logit_softcap")
OPTION_DEFAULTS = {f.name: f.default for f in fields(ModelConfig) if f.name in OPTION_FIELDS}
FFN_KINDS = ("swiglu", "relu2")


def non_embedding_params(cfg: ModelConfig) -> int:
    ffn_matrices = 3 if cfg.ffn == "swiglu" else 2
    qk_gains = 2 * (cfg.d_model // cfg.num_heads) if cfg.qk_norm else 0
    per_layer = 4 * cfg.d_model * cfg.d_model + ffn_matrices * cfg.d_model * cfg.d_ff + 2 * cfg.d_model + qk_gains
    # The output head does matmul work per token; the embedding lookup does not.
    return cfg.num_layers * per_layer + cfg.d_model + cfg.vocab_size * cfg.d_model


class RMSNorm(nn.Module):
    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        # At least float32: half-precision squares overflow and lose the mean.
        x32 = x.float() if x.element_size() < 4 else x
        rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * rms * self.weight.to(x32.dtype)).to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotates adjacent pairs (x[2i], x[2i+1]) by pos * theta^(-2i/d_head)."""

    def __init__(self, d_head: int, max_len: int, theta: float = 10000.0):
        super().__init__()
        if d_head % 2:
            raise ValueError(f"RoPE needs an even head size, got {d_head}")
        self.d_head, self.max_len, self.theta = d_head, max_len, theta
        # Buffers are not saved: they are a function of the config.
        self.register_buffer("cos", torch.empty(max_len, d_head // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_len, d_head // 2), persistent=False)
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """(Re)compute the tables in place, on whatever device the buffers live."""
        if self.cos.is_meta:
            return
        inv_freq = self.theta ** (-torch.arange(0, self.d_head, 2, dtype=torch.float64) / self.d_head)
        angles = torch.arange(self.max_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (..., seq, d_head); positions: (seq,) integer positions."""
        cos = self.cos[positions].to(x.dtype)
        sin = self.sin[positions].to(x.dtype)
        x_even, x_odd = x[..., 0::2], x[..., 1::2]
        out = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
        return out.flatten(-2)


class KVCache:
    """Keys and values of past positions for incremental decoding, one slot per layer."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def layer_length(self, layer: int) -> int:
        k = self.keys[layer]
        return 0 if k is None else k.shape[-2]

    @property
    def length(self) -> int:
        """Positions cached so far (read between forward calls)."""
        return self.layer_length(0)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=-2)
            v = torch.cat((self.values[layer], v), dim=-2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.d_head = cfg.d_model // cfg.num_heads
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.output_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        # QK-norm: queries and keys normalised per head before RoPE, which bounds the attention
        # logits (the gains learn their scale).
        self.q_norm = RMSNorm(self.d_head) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.d_head) if cfg.qk_norm else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        rope: RotaryEmbedding,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        b, t, d = x.shape

        def heads(proj: nn.Linear) -> torch.Tensor:
            return proj(x).view(b, t, self.num_heads, self.d_head).transpose(1, 2)

        q = rope(self.q_norm(heads(self.q_proj)), positions)
        k = rope(self.k_norm(heads(self.k_proj)), positions)
        v = heads(self.v_proj)
        if cache is not None:
            past = cache.layer_length(layer)
            k, v = cache.update(layer, k, v)
            if past and t > 1:
                # Chunked prefill after a prefix: query i sees keys 0..past+i.
                mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(past)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            else:
                # A single new query attends to everything cached; a fresh prompt is causal.
                y = F.scaled_dot_product_attention(q, k, v, is_causal=past == 0 and t > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.output_proj(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ReLU2(nn.Module):
    """W2 relu(W1 x)²: two matrices instead of SwiGLU's three, so cheaper at the same d_ff."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.relu(self.w1(x)).square())


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = RMSNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = RMSNorm(cfg.d_model)
        self.ffn = (SwiGLU if cfg.ffn == "swiglu" else ReLU2)(cfg.d_model, cfg.d_ff)

    def forward(self, x, rope, positions, cache=None, layer=0):
        x = x + self.attn(self.ln1(x), rope, positions, cache, layer)
        return x + self.ffn(self.ln2(x))


class TransformerLM(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        d_model: int,
        num_layers: int,
        num_heads: int,
        d_ff: int,
        rope_theta: float = 10000.0,
        qk_norm: bool = False,
        ffn: str = "swiglu",
        zero_init_proj: bool = False,
        logit_softcap: float = 0.0,
    ):
        super().__init__()
        self.config = ModelConfig(
            vocab_size,
            context_length,
            d_model,
            num_layers,
            num_heads,
            d_ff,
            rope_theta,
            qk_norm,
            ffn,
            zero_init_proj,
            logit_softcap,
        )
        validate_config(self.config)
        self.token_embeddings = nn.Embedding(vocab_size, d_model)
        self.rope = RotaryEmbedding(d_model // num_heads, context_length, rope_theta)
        self.layers = nn.ModuleList(TransformerBlock(self.config) for _ in range(num_layers))
        self.ln_final = RMSNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg: ModelConfig | dict) -> TransformerLM:
        if isinstance(cfg, dict):
            cfg = ModelConfig.from_dict(cfg)
        return cls(**asdict(cfg))

    @torch.no_grad()
    def reset_parameters(self, store=None) -> None:
        """Draw every weight from torch's global RNG, in a fixed order, at its full shape.

        `store(param, value)` writes a drawn value (default: copy it in). A sharded model passes
        one that keeps only its own slice, so with the same seed its shards together equal the
        weights one process would draw.
        """
        store = store or (lambda p, value: p.copy_(value))

        def draw(p: torch.Tensor, fill) -> None:
            # Made on the host whatever the parameter's device, so every device gets the same
            # weights. A meta model has no storage yet: it is initialised once it has.
            if not p.is_meta:
                store(p, fill(torch.empty(p.shape, device="cpu")))

        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                draw(module.weight, lambda t: t.normal_(0.0, 0.02))
            elif isinstance(module, RMSNorm):
                draw(module.weight, lambda t: t.fill_(1.0))
        # Residual projections scaled down with depth (GPT-2), so deep stacks start stable; or
        # zero, so that every block starts as the identity. Drawn last: the option leaves
        # every other weight as it was.
        residual_std = 0.02 / math.sqrt(2 * self.config.num_layers)
        residual = (lambda t: t.zero_()) if self.config.zero_init_proj else (lambda t: t.normal_(0.0, residual_std))
        for name, p in self.named_parameters():
            if name.endswith(("output_proj.weight", "w2.weight")):
                draw(p, residual)
        self.rope.reset()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, token_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """token_ids: (batch, seq) -> logits (batch, seq, vocab_size)."""
        start = cache.length if cache is not None else 0
        t = token_ids.shape[-1]
        if start + t > self.config.context_length:
            raise ValueError(f"sequence of {start + t} tokens exceeds the context length {self.config.context_length}")
        positions = torch.arange(start, start + t, device=token_ids.device)
        x = self.token_embeddings(token_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, self.rope, positions, cache, i)
        logits = self.lm_head(self.ln_final(x))
        if self.config.logit_softcap:
            # Logits squashed smoothly into (-cap, cap): no logit can run away.
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits


def validate_config(cfg: ModelConfig) -> None:
    """Raise ConfigError naming the first out-of-range model hyperparameter."""
    for name in ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"--{name} must be a positive integer, got {value!r}")
    if cfg.d_model % cfg.num_heads:
        raise ConfigError(
            f"--num_heads {cfg.num_heads} does not divide --d_model {cfg.d_model}; "
            f"pick a head count that divides the width"
        )
    if (cfg.d_model // cfg.num_heads) % 2:
        raise ConfigError(f"head size d_model/num_heads = {cfg.d_model // cfg.num_heads} must be even for RoPE")
    if not cfg.rope_theta > 0:
        raise ConfigError(f"--rope_theta must be positive, got {cfg.rope_theta}")
    if cfg.ffn not in FFN_KINDS:
        raise ConfigError(f"--ffn must be one of {', '.join(FFN_KINDS)}, got {cfg.ffn!r}")
    if not (math.isfinite(cfg.logit_softcap) and cfg.logit_softcap >= 0):
        raise ConfigError(f"--logit_softcap must be zero (off) or a positive number, got {cfg.logit_softcap}")
