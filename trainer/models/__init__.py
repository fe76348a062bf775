"""The model registry: `model.arch` -> the architecture's :class:`~trainer.models.spec.ModelSpec`.

Adding an architecture: a folder `trainer/models/<arch>/` with the model and its `SPEC`, one
line below, and its name in `trainer.config.ARCHS` (docs/models.md).
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.config import ConfigError, ModelConfig
from trainer.models import gpt2, llama
from trainer.models.spec import ModelSpec

REGISTRY: dict[str, ModelSpec] = {
    "gpt2": gpt2.SPEC,
    "llama": llama.SPEC,
}


def spec_of(arch: str | ModelConfig) -> ModelSpec:
    """The spec of an architecture (or of a model config's `arch`)."""
    name = arch.arch if isinstance(arch, ModelConfig) else arch
    if name not in REGISTRY:
        raise ConfigError(f"model.arch={name!r}: expected one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def spec_for_hf(model_type: str, where: str) -> ModelSpec:
    """The spec whose Hugging Face `model_type` is `model_type` (from `where`'s config.json)."""
    for spec in REGISTRY.values():
        if spec.hf.model_type == model_type:
            return spec
    known = ", ".join(repr(s.hf.model_type) for s in REGISTRY.values())
    raise ConfigError(f"{where}: model_type={model_type!r}, expected one of {known}")


def build_model(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised model of `cfg.arch`."""
    return spec_of(cfg).model_class(cfg)


def build_on_meta(cfg: ModelConfig) -> nn.Module:
    """The model of `cfg.arch` on the meta device: shapes only, no memory, no random numbers
    drawn (trainer/models/init.py's `materialize` gives it storage and values)."""
    with torch.device("meta"):
        return build_model(cfg)


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (or the module itself)."""
    return getattr(module, "module", module)
