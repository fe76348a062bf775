"""What the generic code needs to know about an architecture, in one place: its `ModelSpec`.

The parallel layouts (`trainer/parallel/`), checkpoints, the Hugging Face import/export, the
loop's FLOPs count and the resume check never name a model's attributes: they read them from
the spec of `model.arch`. Adding an architecture is one folder `trainer/models/<arch>/` that
defines a model class and a `SPEC`, and one line in `trainer/models/__init__.py`
(docs/models.md).

A model class of the registry:

- is built as `Model(cfg: ModelConfig)` with its weights initialised (`reset_parameters()`,
  each parameter by `spec.init_rule`); built under `torch.device("meta")` it holds shapes
  only, and trainer/models/init.py materialises and initialises it per parameter (a module
  with buffers that no checkpoint holds recomputes them in `reset_buffers()`);
- keeps its repeated blocks in an `nn.ModuleDict` keyed "0", "1", ... (`spec.layers`), each
  block called as `block(x, cache, docs)` (`docs`: the documents of packed windows for
  model.doc_mask, or None), so pipeline stages can drop blocks and keep the names;
- `forward(idx, targets=None, kv_cache=None)` returns logits (B, T, vocab), or the mean
  cross-entropy (targets of -100 ignored) when `targets` are given; a pipeline stage has the
  attributes of `spec.first_stage` / `spec.last_stage` set to None when it does not run them:
  without the first ones it takes hidden states instead of token ids, without the last ones
  it returns hidden states;
- ends its forward in trainer/models/head.py: `head_logits(...)` without targets, and its
  `head_loss` attribute (the class's is `head.head_loss`; `train.compile_loss` puts a compiled
  one on the instance) with targets, so the vocabulary padding and the chunked loss work
  the same in every architecture;
- `new_kv_cache()` returns one cache per block for generation (`forward(..., kv_cache=...)`
  then continues the cached tokens, one token at a time after the prompt);
- `num_params(non_embedding=True)` counts parameters (tied weights once).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    SequenceParallel,
)

from trainer.config import ModelConfig
from trainer.models.init import Init


@dataclass(frozen=True)
class HFFormat:
    """Conversion to and from a Hugging Face `transformers` model of this architecture."""

    model_type: str  # config.json's model_type, e.g. "gpt2", "llama"
    # our state dict -> theirs (all of their tensors, contiguous)
    to_hf: Callable[[dict[str, torch.Tensor], ModelConfig], dict[str, torch.Tensor]]
    # theirs -> ours
    from_hf: Callable[[dict[str, torch.Tensor], ModelConfig], dict[str, torch.Tensor]]
    # our config -> their config.json (eot_id: the tokenizer's end-of-text id, or None)
    hf_config: Callable[[ModelConfig, int | None], dict[str, Any]]
    # their (checked) config.json -> our model keys (arch, shapes, eps, rope, ...)
    model_keys: Callable[[dict[str, Any]], dict[str, Any]]
    # our shape key -> their config.json key, compared for model.init_from
    shape_keys: Mapping[str, str]
    # their state-dict keys of block i, e.g. r"^(?:transformer\.)?h\.(\d+)\." (layer count)
    layer_pattern: str | None = None
    # what their config.json may say that we cannot build: a one-line reason, or None
    unsupported: Callable[[dict[str, Any]], str | None] = field(default=lambda hf_cfg: None)
    # our keys that change what the weights compute (not their shapes): compared for
    # model.init_from with what `model_keys` reads from their config.json
    behaviour_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    model_class: type[nn.Module]
    layers: str  # the nn.ModuleDict of repeated blocks
    first_stage: tuple[str, ...]  # attributes only pipeline stage 0 runs (embeddings)
    last_stage: tuple[str, ...]  # attributes only the last stage runs (final norm, output)
    embedding: str  # the token embedding (its weight is the input side of a tied pair)
    output: str  # the output layer (its weight is the output side of a tied pair)
    # tensor parallel plan inside one block: submodule name -> ColwiseParallel() / ...;
    # (cfg, sequence_parallel)
    tp_block_plan: Callable[[ModelConfig, bool], Mapping[str, ParallelStyle]]
    # the plan of the layers around the blocks (embeddings, final norm, output layer):
    # (cfg, sequence_parallel, loss_parallel); empty for plain TP (they stay replicated)
    tp_model_plan: Callable[[ModelConfig, bool, bool], Mapping[str, ParallelStyle]]
    # training FLOPs per token (forward + backward) for a model with `n_params` parameters
    flops_per_token: Callable[[ModelConfig, int], float]
    # model.* keys a checkpoint's weights depend on (a resume with another value is refused)
    shape_keys: tuple[str, ...]
    hf: HFFormat
    # how parameter `name` (its name in the full model) starts: trainer/models/init.py draws
    # each one from it, whole, and every rank keeps its part (meta-device initialisation)
    init_rule: Callable[[str, ModelConfig], Init]
    # layouts this architecture cannot run: a one-line message naming the key, or None
    check_layout: Callable[[ModelConfig, Any], str | None] = field(default=lambda m, p: None)

    def tied(self, cfg: ModelConfig) -> tuple[tuple[str, str], ...]:
        """Parameter names that are one tensor in the whole model (none when untied)."""
        if not cfg.tie_embeddings:
            return ()
        return ((f"{self.embedding}.weight", f"{self.output}.weight"),)


# ------------------------------------------------- tensor parallel styles the plans share
# Under sequence parallel (SP) the activations between the TP regions are sharded over the
# sequence (Shard(1) of (B, T, d)); inside attention and the MLP every rank needs the whole
# sequence, so each TP region starts with an all-gather and ends with a reduce-scatter.


def sequence_gathered(n_inputs: int = 1) -> PrepareModuleInput:
    """SP: a TP region's entry (attention, MLP): all-gather the first input's sequence;
    the others (KV cache, documents) pass unchanged.

    The gathered input stays a DTensor (`use_local_output=False`), so the column-parallel
    layers that read it (q, k and v) add their partial input gradients into one DTensor, and
    backward reduce-scatters that once per region instead of all-reducing each of them."""
    rest = (None,) * (n_inputs - 1)
    return PrepareModuleInput(
        input_layouts=(Shard(1), *rest),
        desired_input_layouts=(Replicate(), *rest),
        use_local_output=False,
    )


def sequence_split() -> PrepareModuleInput:
    """SP: the start of the sequence-sharded region (the dropout after the embeddings): each
    rank keeps its slice of the replicated activations (a local slice, no communication)."""
    return PrepareModuleInput(
        input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True
    )


def output_plan(norm: str, output: str, sp: bool, lp: bool) -> dict[str, ParallelStyle]:
    """The final norm and the output layer: under SP the norm runs on sequence shards; under
    loss parallel (LP) the output layer is split by vocabulary and its logits stay a DTensor
    sharded over it (trainer/models/loss.py computes the loss from the shards)."""
    plan: dict[str, ParallelStyle] = {}
    if sp:
        plan[norm] = SequenceParallel()
    seq = Shard(1) if sp else Replicate()
    if lp:
        plan[output] = ColwiseParallel(
            input_layouts=seq, output_layouts=Shard(-1), use_local_output=False
        )
    elif sp:  # a replicated output layer: it needs the whole sequence
        plan[output] = PrepareModuleInput(
            input_layouts=(seq,), desired_input_layouts=(Replicate(),), use_local_output=True
        )
    return plan
