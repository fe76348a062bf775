"""A weighted mixture of datasets as one sample source (`data.mix`).

The global sample order is a pure function of the sample index, like every source's: the
weights become integer counts per *period* (3:1 -> 3 and 1 in every 4 samples; 0.7:0.3 -> 7
and 3 in every 10), and inside a period the sources take turns by smooth weighted round-robin,
so every prefix of a period is as close to the weights as whole samples allow:

    weights 3:1, period 4:   web web books web | web web books web | ...

Sample `i` is sample `j` of source `k`, where `k` comes from `i`'s slot in its period and `j`
counts the earlier samples of `k`. A source walks its own seeded order and reshuffles on its
own epochs, so a small source repeats more often than a large one (its weight is what the
mixture asks of it). Nothing here has state: the loader's `samples_consumed` is the position in
every source at once, so a resume is exact at any data-parallel size, and the tokens seen per
source follow from it (`tokens_per_source`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import torch

from trainer.data import SampleSource

MAX_PERIOD = 10_000  # weights needing a longer period are rounded to parts in MAX_PERIOD


def period_counts(weights: Sequence[float]) -> list[int]:
    """Integer samples per period in the ratio of `weights` (all positive), smallest period
    first: [3, 1] -> [3, 1]; [0.7, 0.3] -> [7, 3]; [1, 1, 2] -> [1, 1, 2]."""
    fractions = [Fraction(w).limit_denominator(1000) for w in weights]
    scale = math.lcm(*(f.denominator for f in fractions))
    counts = [int(f * scale) for f in fractions]
    if sum(counts) > MAX_PERIOD or min(counts) < 1:
        total = sum(weights)
        counts = [max(1, round(MAX_PERIOD * w / total)) for w in weights]
    divisor = math.gcd(*counts)
    return [c // divisor for c in counts]


def interleave(counts: Sequence[int]) -> np.ndarray:
    """The source of each slot of one period: smooth weighted round-robin (each turn every
    source gains its count, the richest takes the slot and pays the period; ties go to the
    first source). Source `k` takes exactly `counts[k]` slots, spread evenly."""
    period = sum(counts)
    credit = [0] * len(counts)
    slots = np.empty(period, dtype=np.int64)
    for slot in range(period):
        credit = [c + n for c, n in zip(credit, counts, strict=True)]
        best = max(range(len(counts)), key=lambda k: credit[k])
        credit[best] -= period
        slots[slot] = best
    return slots


class MixtureSource:
    """Samples of several sources in the ratio of their weights (see the module docstring)."""

    def __init__(self, sources: Sequence[SampleSource], weights: Sequence[float], names: list[str]):
        self.sources = list(sources)
        self.names = names
        self.seq_len = self.sources[0].seq_len
        self.counts = period_counts(weights)
        self.period = sum(self.counts)
        slots = interleave(self.counts)
        self.slot_source = slots
        # taken[s, k]: samples of source k in the first s slots of a period (s = 0..period)
        one_hot = np.eye(len(self.sources), dtype=np.int64)[slots]
        self.taken = np.concatenate([np.zeros((1, len(self.sources)), np.int64), one_hot.cumsum(0)])

    def locate(self, index: int) -> tuple[int, int]:
        """(source, that source's sample index) of global sample `index`."""
        period, slot = divmod(index, self.period)
        source = int(self.slot_source[slot])
        return source, period * self.counts[source] + int(self.taken[slot, source])

    def sample(self, index: int) -> torch.Tensor:
        source, local = self.locate(index)
        return self.sources[source].sample(local)

    def samples_per_source(self, consumed: int) -> list[int]:
        """How many of the first `consumed` global samples each source gave."""
        periods, slot = divmod(consumed, self.period)
        return [periods * c + int(t) for c, t in zip(self.counts, self.taken[slot], strict=True)]

    def tokens_per_source(self, consumed: int) -> dict[str, int]:
        """Tokens trained on (targets: `seq_len` per sample) from each source after `consumed`
        samples."""
        counts = self.samples_per_source(consumed)
        return {name: n * self.seq_len for name, n in zip(self.names, counts, strict=True)}

    def close(self) -> None:
        for source in self.sources:
            source.close()
