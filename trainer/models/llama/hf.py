"""Llama <-> Hugging Face `transformers`' `LlamaForCausalLM`.

The tensors are the same, only the names differ: our model applies rotary embeddings with
transformers' convention (`rotate_half`: each head's first half against its second half), so
q_proj/k_proj need no permutation here. (Meta's original checkpoints pair neighbouring
dimensions instead; transformers' own conversion script permutes their q/k rows into the
half-split layout, and so would anything reading Meta's files directly.) No `transformers`
import is needed for either direction.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from trainer.config import ModelConfig
from trainer.models.llama.model import ffn_hidden

_BLOCK = {  # ours (inside blocks.<i>.) -> Hugging Face (inside model.layers.<i>.)
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
LAYER_PATTERN = r"^(?:model\.)?layers\.(\d+)\."


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> `LlamaForCausalLM` state dict (contiguous; `lm_head.weight` always
    present, equal to the embedding when tied)."""
    out = {
        "model.embed_tokens.weight": state["tok_emb.weight"],
        "model.norm.weight": state["final_norm.weight"],
        "lm_head.weight": state["tok_emb.weight" if cfg.tie_embeddings else "lm_head.weight"],
    }
    for i in range(cfg.n_layer):
        for ours, theirs in _BLOCK.items():
            out[f"model.layers.{i}.{theirs}"] = state[f"blocks.{i}.{ours}"]
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """`LlamaForCausalLM` (or `LlamaModel`, when tied) state dict -> our state dict. A tied
    model's `lm_head.weight` may be absent (save_pretrained leaves it out)."""
    if "lm_head.weight" in hf and not cfg.tie_embeddings:
        lm_head = hf["lm_head.weight"]
    else:
        lm_head = None
    hf = {k.removeprefix("model."): v for k, v in hf.items()}
    out = {"tok_emb.weight": hf["embed_tokens.weight"], "final_norm.weight": hf["norm.weight"]}
    for i in range(cfg.n_layer):
        for ours, theirs in _BLOCK.items():
            out[f"blocks.{i}.{ours}"] = hf[f"layers.{i}.{theirs}"]
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["tok_emb.weight"]
    elif lm_head is None:
        raise KeyError("lm_head.weight")
    else:
        out["lm_head.weight"] = lm_head
    return {k: v.contiguous() for k, v in out.items()}


def hf_config(cfg: ModelConfig, eot_id: int | None = None) -> dict[str, Any]:
    """The `config.json` of a `LlamaForCausalLM` with our shapes.

    Rotary scaling is written in the legacy `rope_theta` / `rope_scaling` form of the
    published Llama 3.x configs, which transformers 4.x reads as is and 5.x converts into
    its `rope_parameters`. transformers logs a warning when `max_position_embeddings` (our
    block_size) is below `original_max_position_embeddings`; it computes the same model.
    """
    if eot_id is not None and not 0 <= eot_id < cfg.vocab_size:
        eot_id = None
    s = cfg.rope_scaling
    rope_scaling = None
    if s.factor is not None:
        rope_scaling = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": ffn_hidden(cfg),
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.n_embd // cfg.n_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "initializer_range": 0.02,
        "rms_norm_eps": cfg.layer_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "attention_bias": False,
        "attention_dropout": cfg.dropout,  # theirs: attention only; ours also residual/embedding
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "torch_dtype": "float32",
    }


# Our ModelConfig attribute -> its key in a Llama `config.json`, compared for model.init_from.
# `kv_heads` is ModelConfig's property (n_kv_head, or n_head when null). The SwiGLU width
# (intermediate_size) has no single key of ours: a mismatch shows in the tensor shapes. The
# block size is not a shape here (rotary positions have no weights), so it is not compared.
SHAPE_KEYS = {
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "n_embd": "hidden_size",
    "vocab_size": "vocab_size",
}


def _rope(hf_cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, the scaling dict or None) from either config.json form: transformers 4.x
    (`rope_theta`, `rope_scaling`) or 5.x (`rope_parameters` holding both)."""
    params = hf_cfg.get("rope_parameters") or {}
    theta = hf_cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = hf_cfg.get("rope_scaling") or params or None
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        scaling = None
    return float(theta), scaling


def ffn_keys(n_embd: int, intermediate_size: int) -> dict[str, Any]:
    """`ffn_dim_multiplier` and `multiple_of` for which `ffn_hidden` gives exactly
    `intermediate_size`: rounding up to a multiple of intermediate_size itself lands on it
    from anything in (0, intermediate_size]; a multiplier brings the base 8/3*n_embd there
    when it is larger."""
    base = int(2 * 4 * n_embd / 3)
    keys = {"ffn_dim_multiplier": None, "multiple_of": intermediate_size}
    if base > intermediate_size:
        keys["ffn_dim_multiplier"] = intermediate_size / base
    return keys


def model_keys(hf_cfg: dict[str, Any]) -> dict[str, Any]:
    """Our model keys from a (checked) Llama `config.json`."""
    theta, scaling = _rope(hf_cfg)
    rope_scaling: dict[str, Any] = {"factor": None}
    if scaling is not None:
        rope_scaling = {
            "factor": float(scaling["factor"]),
            "low_freq_factor": float(scaling.get("low_freq_factor", 1.0)),
            "high_freq_factor": float(scaling.get("high_freq_factor", 4.0)),
            "original_max_position_embeddings": int(
                scaling.get("original_max_position_embeddings", hf_cfg["max_position_embeddings"])
            ),
        }
    heads = hf_cfg["num_attention_heads"]
    return {
        "arch": "llama",
        "n_layer": hf_cfg["num_hidden_layers"],
        "n_head": heads,
        "n_kv_head": hf_cfg.get("num_key_value_heads") or heads,
        "n_embd": hf_cfg["hidden_size"],
        "block_size": hf_cfg.get("max_position_embeddings", 2048),
        "vocab_size": hf_cfg["vocab_size"],
        "layer_norm_eps": float(hf_cfg.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf_cfg.get("tie_word_embeddings", False)),
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        **ffn_keys(hf_cfg["hidden_size"], hf_cfg["intermediate_size"]),
    }


def unsupported(hf_cfg: dict[str, Any]) -> str | None:
    """What a Llama `config.json` may say that this model cannot build, or None."""
    d, heads = hf_cfg["hidden_size"], hf_cfg["num_attention_heads"]
    if hf_cfg.get("hidden_act", "silu") != "silu":
        return f"hidden_act={hf_cfg['hidden_act']!r} is not supported (silu)"
    for key in ("attention_bias", "mlp_bias"):
        if hf_cfg.get(key):
            return f"{key}=true is not supported (no biases)"
    if d % heads:
        return f"num_attention_heads={heads} does not divide hidden_size={d}"
    if hf_cfg.get("head_dim") not in (None, d // heads):
        return f"head_dim={hf_cfg['head_dim']} is not supported (hidden_size/num_attention_heads)"
    _, scaling = _rope(hf_cfg)
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            return f"rope_scaling rope_type={kind!r} is not supported (llama3 or none)"
        if not isinstance(scaling.get("factor"), (int, float)) or scaling["factor"] <= 0:
            return f"rope_scaling factor={scaling.get('factor')!r}: expected a positive number"
    size = hf_cfg.get("intermediate_size")
    if not isinstance(size, int) or size < 2:
        return f"intermediate_size={size!r}: expected an integer >= 2"
    shape = SimpleNamespace(n_embd=d, **ffn_keys(d, size))
    if ffn_hidden(shape) != size:  # not for size >= 2; checked rather than assumed
        return f"intermediate_size={size} cannot be expressed as model.ffn_dim_multiplier"
    return None
