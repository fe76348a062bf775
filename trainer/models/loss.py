"""The language-model loss, shared by every architecture and the pipeline's last stage.

Next-token cross-entropy in fp32 (targets of -100 are ignored), and optionally PaLM's z-loss
(Chowdhery et al. 2022, sec. 5): `z_loss * mean(logsumexp(logits)^2)` added to what is
minimised. The softmax does not change when every logit moves by the same amount, so nothing
holds the log-normaliser `logsumexp(logits)` near 0 but this term; a drifting normaliser is a
known source of late loss spikes in bf16. Only training adds it: what is reported as the loss
(and validation) stays the plain cross-entropy, so runs with and without it compare.

Under loss parallel (`parallel.loss_parallel`) the logits arrive as a DTensor sharded over the
vocabulary, and both terms are computed without gathering them: the cross-entropy by
`torch.distributed.tensor.parallel.loss_parallel()` (the caller holds that context around
forward *and* backward), the log-normaliser from a max and a sum over each rank's slice (two
all-reduces of one number per token). The results come back as ordinary tensors.

Two more things this module knows, both about the vocabulary axis:

- **Padding** (`model.pad_vocab_to_multiple`): the output layer may have more rows than the
  vocabulary (50257 -> 50304: matmuls whose sizes are multiples of 64/128 run faster). Those
  columns are cut off before the softmax (`real_vocab`), so a padded id gets no probability.
- **Chunks** (`model.loss_chunk_size`, `chunked_lm_loss`): with N tokens and V classes the
  plain path holds the logits, their fp32 copy and the log-probabilities, each (N, V): at
  16 x 1024 tokens and V=50257 ~3 GiB apiece. The chunked loss computes the output layer and
  the loss of `chunk` tokens at a time, under activation checkpointing, so backward recomputes
  each chunk's logits instead of keeping them: one (chunk, V) block alive at a time, for one
  more output-layer matmul in backward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # targets with this id count in neither term
PAD_LOGIT = -1e30  # added to a padded column of sharded logits: exp() of it is 0 in fp32


class LossTerms(NamedTuple):
    """The two terms of a training loss: cross-entropy and the z term (None: z-loss off)."""

    ce: torch.Tensor  # mean cross-entropy over the counted targets (the reported loss)
    z: torch.Tensor | None  # mean logsumexp(logits)^2 over the same targets

    def objective(self, z_loss: float) -> torch.Tensor:
        """What backward minimises: the cross-entropy plus `z_loss` times the z term."""
        return self.ce if self.z is None else self.ce + z_loss * self.z


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of logits (B, T, V) against targets (B, T), in fp32."""
    if isinstance(logits, DTensor):  # loss parallel: sharded over the vocabulary
        return sharded_lm_loss(logits, targets, 0.0).ce
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def sharded_lm_loss(logits: DTensor, targets: torch.Tensor, z_loss: float) -> LossTerms:
    """`lm_loss` of logits (B, T, V) sharded over the vocabulary, inside `loss_parallel()`.

    loss_parallel's log_softmax has no backward of its own (its nll_loss backward does both),
    so the z term must not reuse the log-probabilities: its logsumexp is computed afresh, as
    max + log(sum(exp(logits - max))), from ops DTensor reduces across the shards."""
    flat, targets = logits.float().flatten(0, 1), targets.reshape(-1)
    ce = F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX).to_local()
    if z_loss == 0:
        return LossTerms(ce, None)
    peak = flat.detach().amax(dim=-1, keepdim=True)  # a constant shift: no gradient needed
    lse = ((flat - peak).exp().sum(dim=-1).log() + peak.squeeze(-1)).to_local()  # replicated
    counted = targets != IGNORE_INDEX
    z = torch.where(counted, lse.square(), 0.0).sum() / counted.sum()
    return LossTerms(ce, z)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, z_loss: float) -> LossTerms:
    """The training loss terms; with `z_loss` 0 exactly `cross_entropy` (and no z term).

    With z-loss on, both terms come from one log-softmax: the cross-entropy exactly as
    `cross_entropy` computes it, and logsumexp(logits) = logit - log_softmax(logit) of any
    one class (the first), so the z term costs no second pass over the vocabulary."""
    if isinstance(logits, DTensor):  # loss parallel: sharded over the vocabulary
        return sharded_lm_loss(logits, targets, z_loss)
    if z_loss == 0:
        return LossTerms(cross_entropy(logits, targets), None)
    flat, targets = logits.float().flatten(0, 1), targets.reshape(-1)
    log_probs = flat.log_softmax(dim=-1)
    ce = F.nll_loss(log_probs, targets, ignore_index=IGNORE_INDEX)  # = F.cross_entropy
    lse = flat[:, 0] - log_probs[:, 0]
    counted = targets != IGNORE_INDEX
    z = torch.where(counted, lse.square(), 0.0).sum() / counted.sum()
    return LossTerms(ce, z)


def real_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits (..., V_padded) restricted to the real vocabulary: the padded columns sliced
    off; when sharded over the vocabulary (loss parallel), masked to PAD_LOGIT instead (a
    slice across the shards would gather them), which gives them no probability either."""
    padded = logits.size(-1)
    if padded == vocab_size:
        return logits
    if isinstance(logits, DTensor) and any(p.is_shard() for p in logits.placements):
        column = torch.arange(padded, device=logits.to_local().device)
        mask = torch.where(column < vocab_size, 0.0, PAD_LOGIT)  # each rank builds it whole
        vocab_dim = logits.ndim - 1
        placements = [Shard(0) if p.is_shard(vocab_dim) else Replicate() for p in logits.placements]
        mask = distribute_tensor(mask, logits.device_mesh, placements, src_data_rank=None)
        return logits.float() + mask
    return logits[..., :vocab_size]


def _chunk_sums(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """(sum of cross-entropies, sum of logsumexp^2) over the counted targets of one chunk of
    hidden states (n, d), through the output weight (V_padded, d), in fp32."""
    logits = F.linear(hidden, weight).float()[:, :vocab_size]
    lse = logits.logsumexp(dim=-1)
    counted = targets != IGNORE_INDEX
    picked = logits.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    ce = torch.where(counted, lse - picked, 0.0).sum()
    z = torch.where(counted, lse.square(), 0.0).sum()
    return torch.stack([ce, z])


def chunked_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    z_loss: float,
    chunk: int,
) -> LossTerms:
    """`lm_loss(real_vocab(hidden @ weight.T, vocab_size), targets, z_loss)` computed `chunk`
    tokens at a time; the (N, V) logits never exist at once (forward or backward).

    Each chunk runs under `checkpoint`: forward keeps only its inputs (views of `hidden`,
    the weight) and its two sums; backward recomputes its logits, one chunk at a time."""
    flat, targets = hidden.flatten(0, -2), targets.reshape(-1)
    sums = []
    for start in range(0, flat.size(0), chunk):
        args = (flat[start : start + chunk], weight, targets[start : start + chunk], vocab_size)
        if torch.is_grad_enabled():
            sums.append(
                checkpoint(_chunk_sums, *args, use_reentrant=False, preserve_rng_state=False)
            )
        else:
            sums.append(_chunk_sums(*args))
    ce_sum, z_sum = torch.stack(sums).sum(0)
    counted = (targets != IGNORE_INDEX).sum()
    ce = ce_sum / counted
    return LossTerms(ce, None if z_loss == 0 else z_sum / counted)
