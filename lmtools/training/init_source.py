"""`--init_from`: a new run that starts from trained weights.

The source is an lmtools checkpoint or a Hugging Face model folder (a directory with
config.json, imported by `lmtools.interop.hf`). The new run takes the source's model shape and weights,
and nothing else: its schedule starts at iteration 0, its optimizer is fresh (unless
`--init_optimizer`), and it writes its own checkpoint. Its data must be tokenized as the
source's was.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from lmtools.config.train_config import TrainConfig
from lmtools.errors import CheckpointError, ConfigError


@dataclass
class InitSource:
    path: str
    kind: str  # "checkpoint" or "Hugging Face folder"
    model_config: dict
    tokenizer_text: str | None
    payload: dict | None = None  # an lmtools checkpoint, read weights-only
    state_dict: dict[str, torch.Tensor] | None = None  # an imported Hugging Face model

    def load_into(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Copy the source's weights (and, if given an optimizer, its optimizer state) into the new run."""
        from lmtools.checkpoint import load_state

        if self.payload is not None:
            load_state(self.payload, model, optimizer)
            return
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise CheckpointError(
                f"--init_from {self.path}: its weights do not fit its own model config ({first})"
            ) from None


def read_init_source(path: str) -> InitSource:
    """The checkpoint or Hugging Face folder that `--init_from` names."""
    from lmtools.inspection import check_checkpoint_file

    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ConfigError(
                f"--init_from {p} is a folder without config.json; pass a checkpoint written by lmtools train "
                f"or a Hugging Face model folder"
            )
        try:
            from lmtools.interop.hf import import_llama
        except ImportError:
            raise ConfigError(
                f"--init_from {p}: this lmtools cannot import Hugging Face folders (no lmtools.interop.hf); "
                f"pass a checkpoint written by lmtools train"
            ) from None
        model_config, state_dict, tokenizer_text = import_llama(p)
        return InitSource(
            str(p.resolve()), "Hugging Face folder", dict(model_config), tokenizer_text, state_dict=state_dict
        )
    check_checkpoint_file(p, "--init_from")
    from lmtools.checkpoint import read_checkpoint
    from lmtools.model import MODEL_FIELDS

    payload = read_checkpoint(p)
    config = payload.get("config") if isinstance(payload.get("config"), dict) else {}
    model_config = payload.get("model_config") or {k: config[k] for k in MODEL_FIELDS if k in config}
    if "vocab_size" not in model_config:
        raise CheckpointError(f"--init_from {p} records no model config; it was not written by lmtools train")
    return InitSource(str(p.resolve()), "checkpoint", dict(model_config), _tokenizer_text(payload, p), payload=payload)


def _tokenizer_text(payload: dict, checkpoint: Path) -> str | None:
    """The checkpoint's tokenizer.json text: stored in it, or the file it names (if still there)."""
    config = payload.get("config") or {}
    for value in (payload.get("tokenizer_json"), payload.get("tokenizer"), config.get("tokenizer")):
        if isinstance(value, dict):
            import json

            return json.dumps(value)
        if isinstance(value, str) and value.lstrip().startswith("{"):
            return value
        if isinstance(value, str) and value:
            for cand in (Path(value), checkpoint.parent / Path(value).name):
                if cand.is_file():
                    return cand.read_text(encoding="utf-8")
    return None


def apply_model_shape(cfg: TrainConfig, source: InitSource, explicit: frozenset[str]) -> TrainConfig:
    """A copy of `cfg` whose model is the source's: its shape flags come from it; a typed flag
    that contradicts it is an error."""
    known = {f.name for f in fields(TrainConfig)}
    shape = {key: theirs for key, theirs in source.model_config.items() if key in known}
    for key, theirs in shape.items():
        ours = getattr(cfg, key)
        if key in explicit and ours != theirs:
            raise ConfigError(
                f"--{key} {ours} contradicts --init_from {source.path}, whose model has {key}={theirs}; "
                f"drop the flag (the model's shape comes from --init_from)"
            )
    return replace(cfg, **shape)


def check_vocabulary(cfg: TrainConfig, source: InitSource, data_tokenizer: Any) -> None:
    """The new data must be tokenized as the source was: same vocabulary size, same tokenizer."""
    from lmtools.data.dataset import parse_tokenizer_text

    theirs = int(source.model_config["vocab_size"])
    if cfg.vocab_size != theirs:
        raise ConfigError(
            f"--init_from {source.path} has a vocabulary of {theirs:,} ids but --train_data's has "
            f"{cfg.vocab_size:,}: tokenize the new corpus with the model's tokenizer "
            f"(lmtools prepare CORPUS --tokenizer ITS_TOKENIZER.json)"
        )
    if source.tokenizer_text is None or data_tokenizer is None:
        return
    if parse_tokenizer_text(source.tokenizer_text, f"--init_from {source.path}") != data_tokenizer:
        raise ConfigError(
            f"--init_from {source.path} was trained with another tokenizer than --train_data's ({cfg.tokenizer}), "
            f"of the same size: tokenize the new corpus with the model's tokenizer "
            f"(lmtools prepare CORPUS --tokenizer ITS_TOKENIZER.json)"
        )


def check_init_flags(cfg: TrainConfig, source: InitSource | None) -> None:
    if source is None:
        return
    if Path(cfg.checkpoint_path).resolve() == Path(source.path):
        raise ConfigError(
            f"--init_from and --checkpoint_path are the same file ({cfg.checkpoint_path}); a new run needs its own "
            f"--checkpoint_path (to continue that run instead: lmtools resume {cfg.checkpoint_path})"
        )
    if cfg.init_optimizer and source.payload is None:
        raise ConfigError(
            f"--init_optimizer: {source.path} is a {source.kind}, which holds no optimizer state; drop the flag"
        )
