"""Context parallelism (CP): every sequence split over `cp` ranks, attention across them.

Each CP rank of a group reads the same windows (the data-parallel rank excludes `cp`) and
keeps only its part of every sequence. Everything but attention is per token, so it runs on
the local tokens unchanged; attention needs every earlier token of the sequence, so each
layer all-gathers the keys and values of the group and merges the causal attention over each
chunk of them with its logsumexp (the online softmax of ring / flash attention).

Load balancing: causal attention costs more for later tokens (they see more keys). The
sequence is cut into 2*cp chunks; rank r holds chunk r and its mirror 2*cp-1-r, so every
rank holds one cheap and one expensive chunk (cp=2: rank 0 holds chunks 0 and 3, rank 1
chunks 1 and 2). Positions (GPT-2's table, Llama's rotations) use each token's true place.

The loss of a rank is the mean over its tokens; every rank holds the same number of them, so
the mean over the ranks (gradients averaged by FSDP over dp_shard x cp) is the mean over the
whole sequence. Parameters are sharded over dp_shard x cp, as torchtitan does (mesh.py).
See docs/context_parallel.md.

PyTorch's own `torch.distributed.tensor.experimental.context_parallel` patches only the CUDA
SDPA kernels (flash, efficient, cuDNN): on CPU (torch 2.13) it fails with "aten.
_scaled_dot_product_flash_attention_for_cpu ... does not have a sharding strategy". This
module is plain torch (any device); it computes each chunk's attention with explicit matmuls.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from trainer.models.attention import SequenceShard, sequence_shard


def chunk_ids(rank: int, cp: int) -> tuple[int, int]:
    """The two chunks (of 2*cp) that `rank` holds: a head chunk and its mirrored tail."""
    return rank, 2 * cp - 1 - rank


def local_positions(seq_len: int, rank: int, cp: int, device: torch.device) -> torch.Tensor:
    """(seq_len / cp,) the positions in the whole sequence of the tokens `rank` holds."""
    size = seq_len // (2 * cp)
    head, tail = chunk_ids(rank, cp)
    return torch.cat([torch.arange(c * size, (c + 1) * size, device=device) for c in (head, tail)])


class GatherSequence(torch.autograd.Function):
    """All-gather along the sequence (dim 1) over `group`; backward: each rank's gradient is
    the sum over the ranks of the gradients of its piece (a reduce-scatter; gloo has none,
    so there an all-reduce and a slice)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, x.contiguous(), group=group)
        return torch.stack(pieces)  # (cp, B, T_local, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        rank = dist.get_rank(ctx.group)
        if dist.get_backend(ctx.group) == dist.Backend.GLOO:
            dist.all_reduce(grad, group=ctx.group)
            return grad[rank], None
        mine = torch.empty_like(grad[rank])
        dist.reduce_scatter_tensor(mine, grad, group=ctx.group)
        return mine, None


def chunk_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q over one chunk of keys: (output, logsumexp of the scores).
    `causal`: the same chunk, so query i sees keys 0..i of it. Shapes (B, H, c, D)."""
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.size(-1))
    if causal:
        future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    lse = scores.logsumexp(-1, keepdim=True)
    out = torch.exp(scores - lse).to(v.dtype) @ v
    return out.float(), lse


def merge(
    out: torch.Tensor, lse: torch.Tensor, part: torch.Tensor, part_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two partial softmax attentions over disjoint keys -> the attention over both: each is
    reweighted by its share exp(lse_i - lse) of the total normaliser."""
    total = torch.logaddexp(lse, part_lse)
    return out * torch.exp(lse - total) + part * torch.exp(part_lse - total), total


def context_parallel_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup
) -> torch.Tensor:
    """Causal attention of this rank's queries over the whole sequence of the CP group.

    q (B, T_local, H, D), k and v (B, T_local, H_kv, D) in the load-balanced layout; returns
    (B, T_local, H * D)."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    B, T = q.shape[:2]
    repeat = q.size(2) // k.size(2)  # grouped-query attention: kv heads serve `repeat` queries

    def chunks(t: torch.Tensor) -> list[torch.Tensor]:  # (B, T_local, h, D) -> 2 x (B, h, c, D)
        return list(t.transpose(1, 2).chunk(2, dim=2))

    # Keys and values of every rank (sent with their few kv heads; expanded after the gather).
    k_all, v_all = (GatherSequence.apply(t, group) for t in (k, v))  # (cp, B, T_local, h, D)
    keys: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for source in range(cp):
        pairs = zip(chunks(k_all[source]), chunks(v_all[source]), strict=True)
        for c, (kc, vc) in zip(chunk_ids(source, cp), pairs, strict=True):
            keys[c] = (kc.repeat_interleave(repeat, 1), vc.repeat_interleave(repeat, 1))
    outputs = []
    for c, qc in zip(chunk_ids(rank, cp), chunks(q), strict=True):
        out, lse = chunk_attention(qc, *keys[c], causal=True)  # its own chunk: the diagonal
        for earlier in range(c):  # every earlier chunk is seen whole; later ones not at all
            out, lse = merge(out, lse, *chunk_attention(qc, *keys[earlier], causal=False))
        outputs.append(out.to(q.dtype))
    return torch.cat(outputs, dim=2).transpose(1, 2).reshape(B, T, -1)


class ContextParallel:
    """This rank's place in its CP group, and how a micro-batch runs there."""

    def __init__(self, cp_mesh: DeviceMesh):
        self.group = cp_mesh.get_group()
        self.rank, self.size = cp_mesh.get_local_rank(), cp_mesh.size()
        self.attend = functools.partial(context_parallel_attention, group=self.group)

    def split(self, *batches: torch.Tensor) -> list[torch.Tensor]:
        """This rank's tokens of each (B, T) batch (inputs, targets), in the balanced layout."""
        seq_len = batches[0].size(1)
        index = local_positions(seq_len, self.rank, self.size, batches[0].device)
        return [b[:, index] for b in batches]

    @contextlib.contextmanager
    def running(self, seq_len: int, device: torch.device) -> Iterator[None]:
        """Forward (and backward: activation checkpointing recomputes inside it) of the local
        tokens of `seq_len`-token sequences."""
        positions = local_positions(seq_len, self.rank, self.size, device)
        with sequence_shard(SequenceShard(positions, self.attend)):
            yield
