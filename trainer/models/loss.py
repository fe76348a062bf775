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
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

IGNORE_INDEX = -100  # targets with this id count in neither term


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
