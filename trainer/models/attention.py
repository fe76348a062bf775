"""Causal self-attention's core, shared by every architecture: SDPA or flash-attn, a KV cache
for generation, grouped-query attention, and document masking for packed windows.

`q` has the query heads, `k` and `v` may have fewer (grouped-query attention: each key/value
head serves `n_head / n_kv_head` query heads); under tensor parallelism each rank holds its
share of both, so only the local head counts matter here.

Document masking (`model.doc_mask`): a training window is cut from one token stream with an
end-of-text (EOT) token after every document, so it usually holds the end of one document
and the start of the next. With the mask a token attends only to earlier tokens of its own
document, as if each document had been run alone. :func:`find_documents` works out where
the documents are once per forward, from the token ids, and every block's attention reuses
it; which kernel applies the mask is decided there too:

    CPU (or model.attention=sdpa, or dropout > 0)  SDPA with a (B, 1, T, T) boolean mask
    CUDA, flash-attn installed, bf16/fp16           flash-attn's varlen kernel: the batch
                                                    flattened, one sequence per document
    CUDA otherwise                                  FlexAttention (compiled), a block mask
                                                    that skips the blocks no query may see
The two CUDA paths were written without a GPU to run them on (docs/models.md).

Context parallel (`parallel.cp`): inside :func:`sequence_shard` a forward runs on one rank's
part of each sequence; attention then asks the shard's `attend` (trainer/parallel/
context_parallel.py) and positions are the tokens' true ones (:func:`token_positions`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from trainer.config import ModelConfig

try:  # flash-attn is an optional extra (CUDA only)
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = flash_attn_varlen_func = None


@dataclass
class LayerCache:
    """Keys and values of the tokens seen so far, for one block (used when generating)."""

    k: torch.Tensor | None = None  # (B, n_kv_head, T_seen, head_dim)
    v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.size(2)


@dataclass(frozen=True)
class Documents:
    """The documents of a batch of packed windows, as the chosen kernel needs them (exactly
    one of `mask`, `block_mask`, `cu_seqlens` is set), plus each token's position inside its
    document when positions restart per document."""

    positions: torch.Tensor | None  # (B, T) int64; None: positions run on across documents
    mask: torch.Tensor | None = None  # SDPA: (B, 1, T, T) bool, True where a query may look
    block_mask: Any = None  # FlexAttention: a BlockMask
    cu_seqlens: torch.Tensor | None = None  # flash varlen: int32 starts of the flat sequences
    max_seqlen: int = 0  # flash varlen: the longest of them


@dataclass(frozen=True)
class SequenceShard:
    """Context parallel: this rank holds only some tokens of every sequence."""

    positions: torch.Tensor  # (T_local,) each local token's position in the whole sequence
    # causal attention of the local q (B, T, H, D) over the whole sequence's keys and values
    # (given the local k, v (B, T, H_kv, D)); returns (B, T, H * D)
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


_shard: SequenceShard | None = None  # set for a whole step: recomputation runs in backward


@contextlib.contextmanager
def sequence_shard(shard: SequenceShard) -> Iterator[None]:
    """Run the model on `shard`'s tokens (forward and backward inside)."""
    global _shard
    _shard, previous = shard, _shard
    try:
        yield
    finally:
        _shard = previous


def token_positions(start: int, length: int, device: torch.device) -> torch.Tensor:
    """(length,) positions of the tokens of a forward: start, start+1, ... or, under context
    parallel, the true positions of this rank's tokens."""
    if _shard is not None:
        return _shard.positions
    return torch.arange(start, start + length, device=device)


def flash_available(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether flash-attn runs here (model.attention=flash insists on it)."""
    if cfg.attention == "sdpa":
        return False
    available = (
        flash_attn_func is not None
        and device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
    )
    if cfg.attention == "flash" and not available:
        raise RuntimeError(
            "model.attention=flash needs the flash-attn package, a CUDA device and bf16/fp16"
        )
    return available


def use_flash_attention(cfg: ModelConfig, x: torch.Tensor) -> bool:
    return flash_available(cfg, x.device, x.dtype)


def compute_dtype(device: torch.device, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype attention will compute in: autocast's when it is on, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return param_dtype


def document_ids(idx: torch.Tensor, eot_id: int) -> torch.Tensor:
    """(B, T) index of each token's document in its window: the number of EOTs strictly
    before it (an EOT ends the document it belongs to; the next token starts a new one)."""
    is_eot = (idx == eot_id).long()
    return is_eot.cumsum(1) - is_eot


def document_starts(idx: torch.Tensor, eot_id: int) -> torch.Tensor:
    """(B, T) bool: True where a document starts, at the window's start and after every EOT."""
    starts = torch.ones_like(idx, dtype=torch.bool)
    starts[:, 1:] = idx[:, :-1] == eot_id
    return starts


def document_positions(idx: torch.Tensor, eot_id: int) -> torch.Tensor:
    """(B, T) position of each token inside its document, counting from 0 at its start."""
    arange = torch.arange(idx.size(1), device=idx.device).expand_as(idx)
    starts = document_starts(idx, eot_id)
    first = torch.where(starts, arange, 0).cummax(1).values  # where the document began
    return arange - first


def find_documents(idx: torch.Tensor, cfg: ModelConfig, dtype: torch.dtype) -> Documents:
    """Where the documents of `idx` (B, T) are, for attention computed in `dtype`."""
    positions = document_positions(idx, cfg.eot_id) if cfg.doc_positions == "reset" else None
    if flash_available(cfg, idx.device, dtype):
        return varlen_documents(idx, cfg.eot_id, positions)
    doc = document_ids(idx, cfg.eot_id)
    if idx.is_cuda and cfg.attention != "sdpa" and cfg.dropout == 0:  # flex has no dropout
        return Documents(positions, block_mask=flex_block_mask(doc))
    causal = torch.ones(idx.size(1), idx.size(1), dtype=torch.bool, device=idx.device).tril()
    same_doc = doc[:, None, :, None] == doc[:, None, None, :]
    return Documents(positions, mask=same_doc & causal)


def varlen_documents(idx: torch.Tensor, eot_id: int, positions: torch.Tensor | None) -> Documents:
    """flash-attn's varlen form: the (B, T) windows flattened into one row of B*T tokens, cut
    into sequences at every window start and after every EOT (a document that crosses a
    window boundary is two sequences, one per window)."""
    first = document_starts(idx, eot_id).flatten().nonzero().flatten()
    end = torch.tensor([idx.numel()], device=idx.device)
    cu_seqlens = torch.cat([first, end]).to(torch.int32)
    max_seqlen = int(cu_seqlens.diff().max())  # one host sync per forward, not per layer
    return Documents(positions, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


def flex_block_mask(doc: torch.Tensor) -> Any:
    """FlexAttention's block mask for causal attention inside each document of `doc` (B, T)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_document(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc[b, q_idx] == doc[b, kv_idx])

    B, T = doc.shape
    # Compiled on CUDA, the block mask is built without materialising a (B, T, T) mask.
    return create_block_mask(same_document, B, None, T, T, device=doc.device, _compile=doc.is_cuda)


@functools.cache
def compiled_flex_attention():
    """FlexAttention compiled once: uncompiled it materialises the full score matrix."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: ModelConfig,
    dropout_p: float,
    cache: LayerCache | None = None,
    docs: Documents | None = None,
) -> torch.Tensor:
    """Causal attention of `q` (B, T, H, D) over `k`, `v` (B, T, H_kv, D), continuing `cache`
    when given, inside each document of `docs` when given; returns (B, T, H * D)."""
    B, T = q.shape[:2]
    if _shard is not None and cache is None:  # context parallel (no doc_mask, no dropout)
        return _shard.attend(q, k, v)
    if docs is not None:
        return attend_documents(q, k, v, docs, dropout_p)
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


def attend_documents(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents, dropout_p: float
) -> torch.Tensor:
    """Causal attention inside each document, with the kernel `docs` was made for."""
    B, T = q.shape[:2]
    if docs.cu_seqlens is not None:  # flash varlen: (B*T, heads, D), one sequence per document
        cu, n = docs.cu_seqlens, docs.max_seqlen
        q, k, v = (t.reshape(B * T, t.size(2), t.size(3)) for t in (q, k, v))
        y = flash_attn_varlen_func(q, k, v, cu, cu, n, n, dropout_p=dropout_p, causal=True)
        return y.reshape(B, T, -1)  # GQA built in
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, D)
    gqa = k.size(1) != q.size(1)
    if docs.block_mask is not None:
        y = compiled_flex_attention()(q, k, v, block_mask=docs.block_mask, enable_gqa=gqa)
    else:
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=docs.mask, dropout_p=dropout_p, enable_gqa=gqa
        )
    return y.transpose(1, 2).reshape(B, T, -1)
