"""Causal self-attention's core, shared by every architecture: SDPA or flash-attn, a KV cache
for generation, grouped-query attention, and document masking for packed windows.

`q` has the query heads, `k` and `v` may have fewer (grouped-query attention: each key/value
head serves `n_head / n_kv_head` query heads); under tensor parallelism each rank holds its
share of both, so only the local head counts matter here.

Kernels (`model.attention`): :func:`choose_kernel` is the one place that decides, from the
setting, the device and the dtype of q (what the kernel receives: under CUDA autocast a block's
input stays fp32 after LayerNorm, while q, the output of a Linear, is bf16):

    sdpa    torch's scaled_dot_product_attention, which picks its own backend
    flash   the flash-attn package (CUDA, bf16/fp16)
    cudnn   SDPA with its cuDNN backend asked first (CUDA sm80+, bf16/fp16); shapes cuDNN
            cannot serve fall back to SDPA's other backends
    auto    on CUDA with bf16/fp16: cudnn on Hopper (sm90, where cuDNN's attention is the
            fastest), else flash when installed; otherwise sdpa

Document masking (`model.doc_mask`): a training window is cut from one token stream with an
end-of-text (EOT) token after every document, so it usually holds the end of one document
and the start of the next. With the mask a token attends only to earlier tokens of its own
document, as if each document had been run alone. :func:`find_documents` works out where
the documents are once per forward, from the token ids, and every block's attention reuses
it; the kernel comes from :func:`choose_kernel` too:

    flash   flash-attn's varlen kernel: the batch flattened, one sequence per document
    flex    (CUDA, no dropout, attention not sdpa) FlexAttention (compiled), a block mask
            that skips the blocks no query may see
    sdpa    (CPU, model.attention=sdpa, or dropout > 0) SDPA with a (B, 1, T, T) boolean mask
The CUDA paths were written without a GPU to run them on (docs/models.md).

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
from torch.nn.attention import SDPBackend, sdpa_kernel

from trainer.config import ConfigError, ModelConfig

try:  # flash-attn is an optional extra (CUDA only)
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = flash_attn_varlen_func = None


@dataclass
class LayerCache:
    """Keys and values of the tokens seen so far, for one block (used when generating)."""

    k: torch.Tensor | None = None  # (B, T_seen, n_kv_head, head_dim), as every kernel takes it
    v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.size(1)

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens' keys and values; returns all of them (seen and new)."""
        if self.k is not None:
            if k.size(1) != 1:
                raise ValueError("after the prompt, a KV cache takes one token at a time")
            k, v = torch.cat([self.k, k], dim=1), torch.cat([self.v, v], dim=1)
        self.k, self.v = k, v
        return k, v


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


HALF_PRECISION = (torch.float16, torch.bfloat16)
FLASH_DEVICES = ("cuda",)  # where flash-attn runs (a test adds "cpu" with a stand-in kernel)
# cudnn: SDPA's backends in this order (set_priority): cuDNN first, the others as fallbacks
CUDNN_FIRST = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]
UNAVAILABLE = {
    "flash": "model.attention=flash needs the flash-attn package, a CUDA device and bf16/fp16 "
    "compute (precision=bf16|fp16)",
    "cudnn": "model.attention=cudnn needs a CUDA GPU of compute capability 8.0 or newer and "
    "bf16/fp16 compute (precision=bf16|fp16)",
}


def flash_runs(device: torch.device, q_dtype: torch.dtype) -> bool:
    """Whether the flash-attn package can take q of `q_dtype` on `device`."""
    return (
        flash_attn_func is not None and device.type in FLASH_DEVICES and q_dtype in HALF_PRECISION
    )


def cuda_major(device: torch.device) -> int:
    """The compute capability's major version of a CUDA device (0 for any other device)."""
    # get_device_properties is constant-folded by torch.compile (no graph break)
    return torch.cuda.get_device_properties(device).major if device.type == "cuda" else 0


def cudnn_runs(device: torch.device, q_dtype: torch.dtype) -> bool:
    """Whether torch's cuDNN attention can take q of `q_dtype` on `device` (sm80 and newer)."""
    return cuda_major(device) >= 8 and q_dtype in HALF_PRECISION


def choose_kernel(
    cfg: ModelConfig, device: torch.device, q_dtype: torch.dtype, packed: bool = False
) -> str:
    """The attention kernel for q of `q_dtype` on `device` (the table in this module's
    docstring): "flash", "cudnn" or "sdpa"; with `packed` documents (`model.doc_mask`)
    "flash" (varlen), "flex" or "sdpa" (a boolean mask). A kernel that `model.attention` asks
    for and this machine cannot run is a one-line ConfigError."""
    if cfg.attention == "sdpa":
        return "sdpa"
    runs = {"flash": flash_runs(device, q_dtype), "cudnn": cudnn_runs(device, q_dtype)}
    if cfg.attention in runs and not runs[cfg.attention]:
        raise ConfigError(UNAVAILABLE[cfg.attention])
    if packed:  # cuDNN takes no document structure: FlexAttention's block mask instead
        if cfg.attention in ("auto", "flash") and runs["flash"]:
            return "flash"
        return "flex" if device.type == "cuda" and cfg.dropout == 0 else "sdpa"  # flex: no dropout
    if cfg.attention != "auto":
        return cfg.attention
    if runs["cudnn"] and cuda_major(device) == 9:  # Hopper: cuDNN beats FlashAttention-2 there
        return "cudnn"
    return "flash" if runs["flash"] else "sdpa"


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
    kernel = choose_kernel(cfg, idx.device, dtype, packed=True)
    if kernel == "flash":
        return varlen_documents(idx, cfg.eot_id, positions)
    doc = document_ids(idx, cfg.eot_id)
    if kernel == "flex":
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
    # With no past tokens, mask the future; one new token may see everything cached. (Known
    # from the cache, not from shapes: a compiled block with dynamic shapes needs a bool.)
    is_causal = cache is None or cache.k is None
    if cache is not None:
        k, v = cache.extend(k, v)
    kernel = choose_kernel(cfg, q.device, q.dtype)
    if kernel == "flash":  # (B, T, heads, D) in and out; GQA built in
        y = flash_attn_func(q, k, v, dropout_p=dropout_p, causal=is_causal)
        return y.reshape(B, T, -1)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, D): the layout cuDNN takes
    backends = (
        sdpa_kernel(CUDNN_FIRST, set_priority=True)
        if kernel == "cudnn"
        else contextlib.nullcontext()
    )
    with backends:
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
