"""Training data: sample sources and the batch loader that walks them.

A *source* maps a global sample index to a window of `seq_len + 1` tokens (inputs plus the
next-token targets). The *loader* decides which indices each data-parallel rank reads: global
batch after global batch, rank `r` takes its own slice of every one. Its only state is how many
samples the whole job has consumed, so a resumed run continues with exactly the next batch,
whatever the number of data-parallel ranks is after the restart.
"""

from __future__ import annotations

from typing import Protocol

import torch

from trainer.config import Config


class SampleSource(Protocol):
    seq_len: int

    def sample(self, index: int) -> torch.Tensor:
        """Tokens `(seq_len + 1,)` (int64) of global sample `index`."""
        ...


class DummyTokens:
    """Synthetic, learnable tokens that need no files.

    A seeded table gives every token `branching` possible successors; each sample is a random
    walk through that table. A model can learn it (the loss falls from ln(vocab) towards
    ln(branching)), so a demo or a test on dummy data shows training working. Sample `i` depends
    only on (seed, split, i): any process can produce any sample.
    """

    SPLIT_OFFSET = {"train": 0, "val": 1 << 40}

    def __init__(self, vocab_size: int, seq_len: int, branching: int, seed: int, split: str):
        self.seq_len = seq_len
        self.seed = seed
        self.offset = self.SPLIT_OFFSET[split]
        table_gen = torch.Generator().manual_seed(seed)
        successors = torch.randint(vocab_size, (vocab_size, branching), generator=table_gen)
        self.successors: list[list[int]] = successors.tolist()
        self.vocab_size = vocab_size

    def sample(self, index: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.offset + index)
        branching = len(self.successors[0])
        token = int(torch.randint(self.vocab_size, (1,), generator=gen))
        tokens = [token]
        for choice in torch.randint(branching, (self.seq_len,), generator=gen).tolist():
            token = self.successors[token][choice]
            tokens.append(token)
        return torch.tensor(tokens, dtype=torch.long)


def build_source(cfg: Config, split: str) -> SampleSource:
    """The sample source named by `cfg.data` (shard datasets plug in here)."""
    if cfg.data.kind == "dummy":
        return DummyTokens(
            cfg.data.vocab_size,
            cfg.model.block_size,
            cfg.data.dummy_branching,
            cfg.train.seed,
            split,
        )
    raise ValueError(f"data.kind={cfg.data.kind!r} is not supported")


class BatchLoader:
    """Micro-batches `(inputs, targets)` for one data-parallel rank.

    Global sample order: micro-step after micro-step, `micro_batch_size * dp_size` samples each;
    rank `r` reads the `r`-th block of `micro_batch_size` of them.
    """

    def __init__(
        self, source: SampleSource, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1
    ):
        self.source = source
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.samples_consumed = 0  # by all ranks together

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.samples_consumed + self.dp_rank * self.micro_batch_size
        tokens = torch.stack([self.source.sample(first + i) for i in range(self.micro_batch_size)])
        self.samples_consumed += self.micro_batch_size * self.dp_size
        return tokens[:, :-1], tokens[:, 1:]

    def state_dict(self) -> dict[str, int]:
        # dp_size is informational: the position is global, so any dp size can resume it.
        return {"version": 1, "samples_consumed": self.samples_consumed, "dp_size": self.dp_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.samples_consumed = int(state["samples_consumed"])
