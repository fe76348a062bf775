"""Causal self-attention's core, shared by every architecture: SDPA or flash-attn, a KV cache
for generation, grouped-query attention.

`q` has the query heads, `k` and `v` may have fewer (grouped-query attention: each key/value
head serves `n_head / n_kv_head` query heads); under tensor parallelism each rank holds its
share of both, so only the local head counts matter here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.config import ModelConfig

try:  # flash-attn is an optional extra (CUDA only)
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None


@dataclass
class LayerCache:
    """Keys and values of the tokens seen so far, for one block (used when generating)."""

    k: torch.Tensor | None = None  # (B, n_kv_head, T_seen, head_dim)
    v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.size(2)


def use_flash_attention(cfg: ModelConfig, x: torch.Tensor) -> bool:
    if cfg.attention == "sdpa":
        return False
    available = (
        flash_attn_func is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
    )
    if cfg.attention == "flash" and not available:
        raise RuntimeError(
            "model.attention=flash needs the flash-attn package, a CUDA device and bf16/fp16"
        )
    return available


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: ModelConfig,
    dropout_p: float,
    cache: LayerCache | None = None,
) -> torch.Tensor:
    """Causal attention of `q` (B, T, H, D) over `k`, `v` (B, T, H_kv, D), continuing `cache`
    when given; returns (B, T, H * D)."""
    B, T = q.shape[:2]
    if cache is None and use_flash_attention(cfg, q):
        y = flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True)  # GQA built in
        return y.reshape(B, T, -1)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, D)
    # With no past tokens, mask the future; one new token may see everything cached. (Known
    # from the cache, not from shapes: a compiled block with dynamic shapes needs a bool.)
    is_causal = cache is None or cache.k is None
    if cache is not None:
        if cache.k is not None:
            if T != 1:
                raise ValueError("after the prompt, a KV cache takes one token at a time")
            k = torch.cat([cache.k, k], dim=2)
            v = torch.cat([cache.v, v], dim=2)
        cache.k, cache.v = k, v
    y = F.scaled_dot_product_attention(
        q, k, v, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=k.size(1) != q.size(1)
    )
    return y.transpose(1, 2).reshape(B, T, -1)
