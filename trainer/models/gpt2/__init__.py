"""GPT-2 (learned positions, LayerNorm, GELU MLP, tied embeddings) for the registry."""

from __future__ import annotations

from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from trainer.models.gpt2 import hf
from trainer.models.gpt2.model import GPT, flops_per_token
from trainer.models.spec import HFFormat, ModelSpec


def tp_block_plan(cfg):
    """Megatron-style: q, k, v and the MLP's first layer split by columns (heads / hidden
    units), the projections after them by rows (partial sums, all-reduced)."""
    return {
        "attn.q_proj": ColwiseParallel(),
        "attn.k_proj": ColwiseParallel(),
        "attn.v_proj": ColwiseParallel(),
        "attn.o_proj": RowwiseParallel(),
        "mlp.fc": ColwiseParallel(),
        "mlp.proj": RowwiseParallel(),
    }


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
    check_layout=check_layout,
)
