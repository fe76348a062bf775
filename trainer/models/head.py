"""The output head every architecture shares: final norm -> output layer -> loss.

A model's forward ends in `head_loss` (with targets) or `head_logits` (without). Both see
only the real vocabulary (`model.vocab_size`) of a padded output layer
(`model.pad_vocab_to_multiple`): the loss never gives a padded id probability, and the
logits a forward returns (generation, evaluation, HellaSwag) have `vocab_size` columns.

`head_loss` is a plain function of (norm, output layer, hidden states, targets), so that
`train.compile_loss` can compile it as one graph (`fullgraph=True`, trainer/parallel/
compile.py): the norm, the matmul, the fp32 cast, the softmax and the loss fuse, and no eager
fp32 (N, V) intermediate is left between them. With `model.loss_chunk_size` it takes the
chunked path of trainer/models/loss.py instead of building all the logits.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from trainer.models.loss import (
    LossTerms,
    chunked_lm_loss,
    cross_entropy,
    lm_loss,
    real_vocab,
)


def head_logits(norm: nn.Module, output: nn.Module, x: torch.Tensor, vocab: int) -> torch.Tensor:
    """Logits (B, T, vocab) of hidden states `x`: the padded columns are not returned (logits
    sharded over a padded vocabulary, loss parallel's, are gathered first to cut them off)."""
    logits = output(norm(x))
    if isinstance(logits, DTensor) and logits.size(-1) != vocab:
        logits = logits.full_tensor()
    return logits[..., :vocab]


def head_loss(
    norm: nn.Module,
    output: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    z_loss: float | None,
    vocab: int,
    chunk: int,
) -> torch.Tensor | LossTerms:
    """The mean cross-entropy of hidden states `x` against `targets` (z_loss None:
    evaluation), or the training loss terms (trainer/models/loss.py); `chunk` > 0: computed
    `chunk` tokens at a time (model.loss_chunk_size)."""
    if chunk > 0:
        terms = chunked_lm_loss(norm(x), output.weight, targets, vocab, z_loss or 0.0, chunk)
        return terms.ce if z_loss is None else terms
    logits = real_vocab(output(norm(x)), vocab)
    return cross_entropy(logits, targets) if z_loss is None else lm_loss(logits, targets, z_loss)
