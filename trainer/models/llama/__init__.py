"""Llama 3 style (RoPE, RMSNorm, grouped-query attention, SwiGLU, optional tied embeddings)
for the registry."""

from __future__ import annotations

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

from trainer.models.llama import hf
from trainer.models.llama.model import Llama, ffn_hidden, flops_per_token, init_rule
from trainer.models.spec import (
    HFFormat,
    ModelSpec,
    output_plan,
    sequence_gathered,
    sequence_split,
)


def tp_block_plan(cfg, sequence_parallel: bool = False):
    """Megatron-style: q, k, v split by columns (each rank n_head/tp query heads and
    n_kv_head/tp key/value heads), the SwiGLU's gate and up projections by columns (the same
    hidden units on a rank, so the gating stays local), o_proj and down_proj by rows (partial
    sums, all-reduced).

    With sequence parallel the RMSNorms run on sequence shards, attention and the MLP
    all-gather the sequence at their entry, and o_proj / down_proj reduce-scatter their
    partial sums into sequence shards instead of all-reducing them."""
    sp = sequence_parallel
    rows = RowwiseParallel(output_layouts=Shard(1)) if sp else RowwiseParallel()
    plan = {
        "attn.q_proj": ColwiseParallel(),
        "attn.k_proj": ColwiseParallel(),
        "attn.v_proj": ColwiseParallel(),
        "attn.o_proj": rows,
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": rows,
    }
    if sp:
        plan |= {
            "attn_norm": SequenceParallel(),
            "attn": sequence_gathered(n_inputs=3),  # (x, cache, docs)
            "mlp_norm": SequenceParallel(),
            "mlp": sequence_gathered(),
        }
    return plan


def tp_model_plan(cfg, sequence_parallel: bool, loss_parallel: bool):
    """Around the blocks. Loss parallel splits the token embedding by vocabulary rows: each
    rank looks up the ids in its rows (zeros elsewhere) and the partial embeddings are summed,
    under sequence parallel by a reduce-scatter straight into sequence shards; the output
    layer by vocabulary columns (tied or not: both are Shard(0) of their weight)."""
    plan = {}
    if loss_parallel:
        seq = Shard(1) if sequence_parallel else Replicate()
        plan["tok_emb"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    elif sequence_parallel:
        plan["drop"] = sequence_split()
    return plan | output_plan("final_norm", "lm_head", sequence_parallel, loss_parallel)


def check_layout(m, p) -> str | None:
    """What a Llama config or layout cannot run (the one validation calls it)."""
    if (m.n_embd // m.n_head) % 2:
        return (
            f"model.n_embd={m.n_embd} / model.n_head={m.n_head}: rotary embeddings need an "
            "even head size"
        )
    scaling = m.rope_scaling
    if scaling.factor is not None and not 0 < scaling.low_freq_factor < scaling.high_freq_factor:
        return (
            f"model.rope_scaling: expected 0 < low_freq_factor ({scaling.low_freq_factor}) < "
            f"high_freq_factor ({scaling.high_freq_factor})"
        )
    hidden = ffn_hidden(m)
    if hidden % p.tp:
        return (
            f"parallel.tp={p.tp} must divide the SwiGLU hidden size {hidden} "
            "(from model.n_embd, model.ffn_dim_multiplier, model.multiple_of)"
        )
    return None


SPEC = ModelSpec(
    arch="llama",
    model_class=Llama,
    layers="blocks",
    first_stage=("tok_emb", "drop"),
    last_stage=("final_norm", "lm_head"),
    embedding="tok_emb",
    output="lm_head",
    tp_block_plan=tp_block_plan,
    tp_model_plan=tp_model_plan,
    flops_per_token=flops_per_token,
    # block_size is not among them: rotary positions have no weights.
    shape_keys=(
        "model.n_layer",
        "model.n_head",
        "model.n_kv_head",
        "model.n_embd",
        "model.ffn_dim_multiplier",
        "model.multiple_of",
        "model.tie_embeddings",
    ),
    hf=HFFormat(
        model_type="llama",
        to_hf=hf.to_hf_state_dict,
        from_hf=hf.from_hf_state_dict,
        hf_config=hf.hf_config,
        model_keys=hf.model_keys,
        shape_keys=hf.SHAPE_KEYS,
        layer_pattern=hf.LAYER_PATTERN,
        unsupported=hf.unsupported,
        behaviour_keys=("tie_embeddings", "rope_theta", "rope_scaling", "layer_norm_eps"),
    ),
    init_rule=init_rule,
    check_layout=check_layout,
)
