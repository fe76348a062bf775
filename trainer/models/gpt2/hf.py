"""GPT-2 <-> Hugging Face `transformers`' `GPT2LMHeadModel`.

Hugging Face stores GPT-2's linear layers as `Conv1D`, whose weight is the transpose of an
`nn.Linear` weight, and fuses query/key/value into one `c_attn`. Import splits and transposes;
export fuses and transposes back. No `transformers` import is needed for either direction.
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.config import ModelConfig

_LINEARS = {  # ours (inside blocks.<i>.) -> Hugging Face (inside transformer.h.<i>.)
    "attn.o_proj": "attn.c_proj",
    "mlp.fc": "mlp.c_fc",
    "mlp.proj": "mlp.c_proj",
}
_NORMS = {"ln_1": "ln_1", "ln_2": "ln_2"}


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> `GPT2LMHeadModel` state dict (contiguous tensors, lm_head tied)."""
    out = {
        "transformer.wte.weight": state["tok_emb.weight"],
        "transformer.wpe.weight": state["pos_emb.weight"],
        "transformer.ln_f.weight": state["ln_f.weight"],
        "transformer.ln_f.bias": state["ln_f.bias"],
        "lm_head.weight": state["tok_emb.weight"],
    }
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        qkv = ("q_proj", "k_proj", "v_proj")
        out[theirs + "attn.c_attn.weight"] = torch.cat(
            [state[f"{ours}attn.{n}.weight"] for n in qkv], dim=0
        ).t()
        out[theirs + "attn.c_attn.bias"] = torch.cat([state[f"{ours}attn.{n}.bias"] for n in qkv])
        for src, dst in _LINEARS.items():
            out[f"{theirs}{dst}.weight"] = state[f"{ours}{src}.weight"].t()
            out[f"{theirs}{dst}.bias"] = state[f"{ours}{src}.bias"]
        for src, dst in _NORMS.items():
            for p in ("weight", "bias"):
                out[f"{theirs}{dst}.{p}"] = state[f"{ours}{src}.{p}"]
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """`GPT2LMHeadModel` (or `GPT2Model`) state dict -> our state dict."""
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
    out = {
        "tok_emb.weight": hf["wte.weight"],
        "pos_emb.weight": hf["wpe.weight"],
        "ln_f.weight": hf["ln_f.weight"],
        "ln_f.bias": hf["ln_f.bias"],
    }
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"h.{i}."
        w = hf[theirs + "attn.c_attn.weight"].t()
        b = hf[theirs + "attn.c_attn.bias"]
        for n, wi, bi in zip(("q_proj", "k_proj", "v_proj"), w.chunk(3), b.chunk(3), strict=True):
            out[f"{ours}attn.{n}.weight"], out[f"{ours}attn.{n}.bias"] = wi, bi
        for dst, src in _LINEARS.items():
            out[f"{ours}{dst}.weight"] = hf[f"{theirs}{src}.weight"].t()
            out[f"{ours}{dst}.bias"] = hf[f"{theirs}{src}.bias"]
        for dst, src in _NORMS.items():
            for p in ("weight", "bias"):
                out[f"{ours}{dst}.{p}"] = hf[f"{theirs}{src}.{p}"]
    out["lm_head.weight"] = out["tok_emb.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def hf_config(cfg: ModelConfig, eot_id: int | None = 50256) -> dict:
    """The `config.json` of a `GPT2LMHeadModel` with our shapes."""
    if eot_id is not None and not 0 <= eot_id < cfg.vocab_size:
        eot_id = None
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "torch_dtype": "float32",
    }


# Our ModelConfig field -> its key in a Hugging Face GPT-2 `config.json`.
SHAPE_KEYS = {  # ours -> theirs
    "n_layer": "n_layer",
    "n_head": "n_head",
    "n_embd": "n_embd",
    "block_size": "n_positions",
    "vocab_size": "vocab_size",
}


def model_keys(hf_cfg: dict[str, Any]) -> dict[str, Any]:
    """Our model keys from a (checked) GPT-2 `config.json`."""
    return {
        "arch": "gpt2",
        **{ours: hf_cfg[theirs] for ours, theirs in SHAPE_KEYS.items()},
        "layer_norm_eps": hf_cfg.get("layer_norm_epsilon", 1e-5),
        "tie_embeddings": True,
    }


def unsupported(hf_cfg: dict[str, Any]) -> str | None:
    if hf_cfg.get("n_inner") not in (None, 4 * hf_cfg["n_embd"]):
        return f"n_inner={hf_cfg['n_inner']} is not supported (4*n_embd)"
    return None
