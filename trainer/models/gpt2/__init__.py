"""GPT-2 (learned positions, LayerNorm, GELU MLP, tied embeddings) for the registry."""

from __future__ import annotations

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

from trainer.models.gpt2 import hf
from trainer.models.gpt2.model import GPT, flops_per_token, init_rule
from trainer.models.spec import (
    HFFormat,
    ModelSpec,
    output_plan,
    sequence_gathered,
    sequence_split,
)


def tp_block_plan(cfg, sequence_parallel: bool = False):
    """Megatron-style: q, k, v and the MLP's first layer split by columns (heads / hidden
    units), the projections after them by rows (partial sums, all-reduced).

    With sequence parallel the LayerNorms run on sequence shards, attention and the MLP
    all-gather the sequence at their entry, and the row-parallel projections reduce-scatter
    their partial sums into sequence shards instead of all-reducing them."""
    if not sequence_parallel:
        return {
            "attn.q_proj": ColwiseParallel(),
            "attn.k_proj": ColwiseParallel(),
            "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(),
            "mlp.fc": ColwiseParallel(),
            "mlp.proj": RowwiseParallel(),
        }
    return {
        "ln_1": SequenceParallel(),
        "attn": sequence_gathered(n_inputs=3),  # (x, cache, docs)
        "attn.q_proj": ColwiseParallel(),
        "attn.k_proj": ColwiseParallel(),
        "attn.v_proj": ColwiseParallel(),
        "attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
        "ln_2": SequenceParallel(),
        "mlp": sequence_gathered(),
        "mlp.fc": ColwiseParallel(),
        "mlp.proj": RowwiseParallel(output_layouts=Shard(1)),
    }


def tp_model_plan(cfg, sequence_parallel: bool, loss_parallel: bool):
    """Around the blocks. Loss parallel splits the tied token embedding / output layer by
    vocabulary rows (the same Shard(0) of one weight from both sides); the embedding's
    partial lookups are all-reduced, as the learned positions are added to the whole
    sequence before sequence parallel's dropout keeps each rank's slice."""
    plan = {}
    if loss_parallel:
        plan["tok_emb"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if sequence_parallel:
        plan["drop"] = sequence_split()
    return plan | output_plan("ln_f", "lm_head", sequence_parallel, loss_parallel)


def check_layout(m, p) -> str | None:
    if (4 * m.n_embd) % p.tp:
        return f"parallel.tp={p.tp} must divide the MLP width 4*model.n_embd"
    return None


SPEC = ModelSpec(
    arch="gpt2",
    model_class=GPT,
    layers="blocks",
    first_stage=("tok_emb", "pos_emb", "drop"),
    last_stage=("ln_f", "lm_head"),
    embedding="tok_emb",
    output="lm_head",
    tp_block_plan=tp_block_plan,
    tp_model_plan=tp_model_plan,
    flops_per_token=flops_per_token,
    shape_keys=("model.n_layer", "model.n_head", "model.n_embd", "model.block_size"),
    hf=HFFormat(
        model_type="gpt2",
        to_hf=hf.to_hf_state_dict,
        from_hf=hf.from_hf_state_dict,
        hf_config=hf.hf_config,
        model_keys=hf.model_keys,
        shape_keys=hf.SHAPE_KEYS,
        layer_pattern=r"^(?:transformer\.)?h\.(\d+)\.",
        unsupported=hf.unsupported,
        behaviour_keys=("layer_norm_eps",),
    ),
    init_rule=init_rule,
    check_layout=check_layout,
)
