"""Initial weights as a pure function of (seed, parameter name, full shape), so every layout
starts from the same model without any rank ever holding all of it.

A model is built on the `meta` device (shapes only: no memory, no random numbers drawn),
the parallelism is applied to it (pipeline stages drop what they do not run, TP and FSDP2
turn parameters into sharded DTensors, still on meta), and then :func:`materialize` gives
each rank storage for what it holds (`to_empty`) and fills it:

    for each parameter, by its name in the full model:
        generate the full tensor on the CPU with a generator seeded from (seed, name)
        keep this rank's part of it (a DTensor's local shard, as its placements say)

One full parameter exists at a time (the peak is the largest parameter, not the model), and
the values do not depend on how the model is split: one process, DDP, FSDP, TP or a
pipeline stage all hold slices of the same tensors. Each architecture states its rule per
parameter (`ModelSpec.init_rule`, e.g. GPT-2's N(0, 0.02)); a checkpoint or a Hugging Face
folder can fill the parameters instead (`values`), and buffers that no checkpoint holds
(Llama's rotary tables) are recomputed by every module's `reset_buffers()`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

# name in the full model, full shape -> the full tensor (CPU, float32)
Values = Callable[[str, torch.Size], torch.Tensor]


@dataclass(frozen=True)
class Init:
    """How one parameter starts: "normal" (mean 0, `std`), "zeros" or "ones"."""

    kind: str
    std: float = 0.0

    def apply_(self, tensor: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Fill `tensor` in place (with the global RNG when no `generator` is given)."""
        with torch.no_grad():
            if self.kind == "zeros":
                tensor.zero_()
            elif self.kind == "ones":
                tensor.fill_(1.0)
            else:
                tensor.normal_(0.0, self.std, generator=generator)


def name_seed(seed: int, name: str) -> int:
    """A generator seed from (train.seed, parameter name): stable across runs, processes and
    machines (sha256, not Python's salted `hash`)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def initial_value(rule: Init, seed: int, name: str, shape: torch.Size) -> torch.Tensor:
    """The full initial tensor of parameter `name` (CPU, float32): a pure function of its
    arguments."""
    full = torch.empty(shape, dtype=torch.float32)
    rule.apply_(full, torch.Generator().manual_seed(name_seed(seed, name)))
    return full


def seeded_values(rules: Callable[[str], Init], seed: int) -> Values:
    """The `values` of a fresh model: each parameter drawn by its architecture's rule."""
    return lambda name, shape: initial_value(rules(name), seed, name, shape)


def local_part(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """What this rank holds of `full` as `param` holds it: for a DTensor the local shard its
    placements say (FSDP2's uneven Shard(0) chunks, TP's Shard(0)/Shard(1), both at once on
    a 2-D mesh), cut locally: every rank has the same `full`, so nothing is sent
    (`src_data_rank=None`). On a GPU mesh DTensor copies `full` to the device before cutting
    it: the device peak is then this rank's part plus one full parameter."""
    if not isinstance(param, DTensor):
        return full
    placed = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    return placed.to_local()


def full_names(
    model: nn.Module, tied: tuple[tuple[str, str], ...]
) -> Iterator[tuple[str, nn.Parameter]]:
    """(name in the full model, parameter) of each parameter `model` holds, once each; a tied
    pair goes by its first name (a pipeline's last stage holds the output side alone)."""
    alias = {second: first for first, second in tied}
    for name, param in model.named_parameters():
        yield alias.get(name, name), param


def retie(model: nn.Module, tied: tuple[tuple[str, str], ...]) -> None:
    """Point the second name of each tied pair at the first one's parameter again
    (`to_empty` gives each module a new DTensor parameter, which unties a pair)."""
    for first, second in tied:
        (owner_a, _, attr_a), (owner_b, _, attr_b) = first.rpartition("."), second.rpartition(".")
        a, b = _submodule(model, owner_a), _submodule(model, owner_b)
        if a is not None and b is not None and getattr(b, attr_b) is not getattr(a, attr_a):
            setattr(b, attr_b, getattr(a, attr_a))


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    """`model`'s submodule at `path`, or None where a pipeline stage dropped it."""
    module: nn.Module | None = model
    for part in path.split(".") if path else ():
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def reset_buffers(model: nn.Module) -> None:
    """Recompute the buffers a checkpoint does not hold (each module's `reset_buffers()`)."""
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()


@torch.no_grad()
def fill(model: nn.Module, values: Values, tied: tuple[tuple[str, str], ...]) -> None:
    """Copy into each parameter this rank's part of `values(name, full shape)`, one
    parameter at a time."""
    for name, param in full_names(model, tied):
        full = values(name, param.shape)  # a DTensor's shape is the full one
        target = param.to_local() if isinstance(param, DTensor) else param
        target.copy_(local_part(full, param))
        del full


def materialize(
    model: nn.Module,
    device: torch.device,
    values: Values | None,
    tied: tuple[tuple[str, str], ...],
) -> None:
    """Give `model` (built on meta, already parallelised) storage on `device` for what this
    rank holds, recompute its buffers, and fill its parameters from `values` (None: leave
    them empty, for a checkpoint restore to fill)."""
    model.to_empty(device=device)
    retie(model, tied)
    reset_buffers(model)
    if values is not None:
        fill(model, values, tied)


def on_meta(model: nn.Module) -> bool:
    """Whether `model` still has to be materialised (built on the meta device)."""
    return any(p.is_meta for p in model.parameters())
