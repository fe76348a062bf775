"""Training data: sample sources and the batch loader that walks them.

A *source* maps a global sample index to a window of `seq_len + 1` tokens (inputs plus the
next-token targets). The *loader* decides which indices each data-parallel rank reads: global
batch after global batch, rank `r` takes its own slice of every one. Its only state is how many
samples the whole job has consumed, so a resumed run continues with exactly the next batch,
whatever the number of data-parallel ranks is after the restart.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from data_prep.shards import DatasetError, open_shards, read_manifest
from trainer.config import Config
from trainer.shard_verify import ShardVerifier


class SampleSource(Protocol):
    seq_len: int

    def sample(self, index: int) -> torch.Tensor:
        """Tokens `(seq_len + 1,)` (int64) of global sample `index`."""
        ...

    def close(self) -> None:
        """Stop any background work (e.g. shard verification)."""
        ...


class DummyTokens:
    """Synthetic, learnable tokens that need no files.

    Each sample is a random walk over the vocabulary whose every step adds one of `branching`
    seeded offsets (modulo the vocabulary): from any token only `branching` successors are
    possible, each equally likely. A model can learn it (the loss falls from ln(vocab) towards
    ln(branching)), so a demo or a test on dummy data shows training working. The walk is a
    cumulative sum, so a sample costs a few vectorised ops instead of a Python loop per token
    (a throughput benchmark measures the model, not this). Sample `i` depends only on
    (seed, split, i): any process can produce any sample.
    """

    SPLITS = ("train", "val")

    def __init__(self, vocab_size: int, seq_len: int, branching: int, seed: int, split: str):
        self.seq_len = seq_len
        self.seed = seed
        self.split = self.SPLITS.index(split)
        self.vocab_size = vocab_size
        # Distinct offsets: exactly `branching` successors (at most the whole vocabulary).
        self.steps = np.random.default_rng(seed).permutation(vocab_size)[:branching]

    def sample(self, index: int) -> torch.Tensor:
        # A generator keyed by all three numbers (NumPy's SeedSequence keeps every bit: no two
        # (seed, split, index) share a stream, unlike a sum folded into a 32-bit seed).
        rng = np.random.default_rng([self.seed, self.split, index])
        walk = np.empty(self.seq_len + 1, dtype=np.int64)
        walk[0] = rng.integers(self.vocab_size)
        walk[1:] = self.steps[rng.integers(len(self.steps), size=self.seq_len)]
        return torch.from_numpy(np.cumsum(walk, out=walk) % self.vocab_size)  # int64: no overflow

    def close(self) -> None:
        pass


class ShardTokens:
    """Windows of a prepared dataset's split, in a seeded order that reshuffles every epoch.

    The split's shards form one token stream (memory-mapped, read on demand). Window `w` is
    tokens `[w * seq_len, w * seq_len + seq_len + 1)`: consecutive windows share one token (the
    last target of one is the first input of the next), no window runs past the end, and
    documents may span windows as in GPT-2's pre-training. Sample `i` is window
    `order(epoch)[i % num_windows]` with `epoch = i // num_windows`: within an epoch no window
    repeats. With `verify`, no token of a shard is returned before the shard's sha256 matched
    the manifest (:class:`~trainer.shard_verify.ShardVerifier`, hashing in the background).
    """

    def __init__(
        self, folder: str | Path, split: str, seq_len: int, seed: int, verify: bool = False
    ):
        self.seq_len = seq_len
        self.seed = seed
        self.shards = open_shards(folder, split)
        manifest = read_manifest(folder)
        entries = manifest["splits"][split]["shards"]
        self.files = [Path(folder) / e["file"] for e in entries]
        self.verifier = (
            ShardVerifier(self.files, [e["sha256"] for e in entries]) if verify else None
        )
        self.vocab_size = int(manifest["tokenizer"]["vocab_size"])
        sizes = np.array([s.size for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])  # stream offset of each shard
        self.num_windows = int((self.starts[-1] - 1) // seq_len)
        if self.num_windows < 1:
            raise DatasetError(
                f"{folder}: the {split} split has {self.starts[-1]} tokens, fewer than one "
                f"window of {seq_len + 1} (model.block_size + 1)"
            )
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        """The window order of `epoch` (a permutation; the latest two are cached)."""
        if epoch not in self._orders:
            rng = np.random.default_rng([self.seed, epoch])
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = rng.permutation(self.num_windows).astype(np.int64)
        return self._orders[epoch]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream, across shard boundaries."""
        pieces = []
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while length > 0:
            if self.verifier is not None:
                self.verifier.require(shard)
            offset = start - int(self.starts[shard])
            piece = self.shards[shard][offset : offset + length]
            self.check_ids(piece, shard, offset)
            pieces.append(piece)
            start, length, shard = start + piece.size, length - piece.size, shard + 1
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    def check_ids(self, piece: np.ndarray, shard: int, offset: int) -> None:
        """Ids at or above the vocabulary size mean a corrupt shard: a clear error here rather
        than an index error inside the embedding. One vectorised max per piece read."""
        if piece.size == 0 or int(piece.max()) < self.vocab_size:
            return
        at = offset + int(np.argmax(piece >= self.vocab_size))
        raise DatasetError(
            f"{self.files[shard]}: token id {int(self.shards[shard][at])} at token {at} (max id "
            f"{int(piece.max())} in this window) is out of range for the vocabulary of "
            f"{self.vocab_size} ids (manifest tokenizer.vocab_size): the shard is corrupt or "
            "from another tokenizer; run dlt-prep again"
        )

    def sample(self, index: int) -> torch.Tensor:
        epoch, position = divmod(index, self.num_windows)
        window = int(self.order(epoch)[position])
        tokens = self.read(window * self.seq_len, self.seq_len + 1)
        return torch.from_numpy(tokens.astype(np.int64))

    def close(self) -> None:
        if self.verifier is not None:
            self.verifier.close()


def has_split(cfg: Config, split: str) -> bool:
    """Whether the run's data has `split` (dummy data has every split; a mixture has it when
    one of its datasets has)."""
    if cfg.data.kind == "dummy":
        return True
    folders = [source.path for source in cfg.data.mix] or [cfg.data.path]
    return any(split in read_manifest(folder)["splits"] for folder in folders)


def tokenizer_folder(cfg: Config) -> str:
    """The dataset folder whose manifest (and tokenizer file) the run's tokens follow: a
    mixture's datasets share one tokenizer, so its first one."""
    return cfg.data.mix[0].path if cfg.data.mix else cfg.data.path


def build_source(cfg: Config, split: str, verify: bool = False) -> SampleSource:
    """The sample source named by `cfg.data` (`verify`: every shard checked against its
    sha256 before it is read, unless `data.verify=false`)."""
    d, seq_len, seed = cfg.data, cfg.model.block_size, cfg.train.seed
    if d.kind == "dummy":
        return DummyTokens(d.vocab_size, seq_len, d.dummy_branching, seed, split)
    verify = verify and d.verify
    if not d.mix:
        return ShardTokens(d.path, split, seq_len, seed, verify)
    from trainer.mixture import MixtureSource  # it builds on this module

    # Validation mixes the datasets that have a validation split, with the same weights.
    splits = {s.path: read_manifest(s.path)["splits"] for s in d.mix}
    mix = [(k, s) for k, s in enumerate(d.mix) if split == "train" or split in splits[s.path]]
    # Each dataset its own seed: two copies of one dataset do not walk in lockstep.
    sources = [ShardTokens(s.path, split, seq_len, seed + k, verify) for k, s in mix]
    return MixtureSource(sources, [s.weight for _, s in mix], [s.name or s.path for _, s in mix])


class BatchLoader:
    """Micro-batches `(inputs, targets)` for one data-parallel rank.

    Global sample order: micro-step after micro-step, `micro_batch_size * dp_size` samples each;
    rank `r` reads the `r`-th block of `micro_batch_size` of them. With `prefetch > 0` a
    background thread assembles the next batches while the model computes; since a batch is a
    pure function of its position, prefetching never changes what is read.
    """

    def __init__(
        self,
        source: SampleSource,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        prefetch: int = 0,
        pin_memory: bool = False,
    ):
        self.source = source
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.prefetch = prefetch
        self.pin_memory = pin_memory
        self.samples_consumed = 0  # by all ranks together
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def step_samples(self) -> int:
        return self.micro_batch_size * self.dp_size

    def batch_at(self, consumed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's micro-batch when `consumed` samples have been consumed before it."""
        first = consumed + self.dp_rank * self.micro_batch_size
        tokens = torch.stack([self.source.sample(first + i) for i in range(self.micro_batch_size)])
        if self.pin_memory:
            tokens = tokens.pin_memory()
        return tokens[:, :-1], tokens[:, 1:]

    def _produce(self, consumed: int, out: queue.Queue, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                item = self.batch_at(consumed)
            except Exception as err:  # delivered to the training thread, raised there
                item = err
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, Exception):
                return
            consumed += self.step_samples

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prefetch <= 0:
            batch = self.batch_at(self.samples_consumed)
        else:
            if self._queue is None:
                self._queue = queue.Queue(maxsize=self.prefetch)
                self._stop = threading.Event()
                self._thread = threading.Thread(
                    target=self._produce,
                    args=(self.samples_consumed, self._queue, self._stop),
                    daemon=True,
                    name="batch-prefetch",
                )
                self._thread.start()
            batch = self._queue.get()
            if isinstance(batch, Exception):
                self.close()  # the producer has stopped; a retry starts a fresh one
                raise batch
        self.samples_consumed += self.step_samples
        return batch

    def close(self) -> None:
        """Stop the prefetch thread (a later next_batch starts a new one where this stopped)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()  # never leave it running into interpreter shutdown
        self._thread = None
        self._queue = None

    def state_dict(self) -> dict[str, int]:
        # dp_size is informational: the position is global, so any dp size can resume it.
        return {"version": 1, "samples_consumed": self.samples_consumed, "dp_size": self.dp_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.close()
        self.samples_consumed = int(state["samples_consumed"])
