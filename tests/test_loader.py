"""The shard loader: windows of the token stream, per-epoch order across data-parallel ranks,
resuming at another world size, prefetching, and training on a prepared dataset."""

from __future__ import annotations

import json
import random
import shutil
import string
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from data_prep import prep
from data_prep.config import corpus_config
from data_prep.shards import MANIFEST, DatasetError
from data_prep.tokenizers import BPE_FILE
from jobs import generate as generate_cli
from trainer.config import ConfigError
from trainer.data import BatchLoader, ShardTokens
from trainer.run_dir import CHECKPOINTS, CONFIG
from trainer.train import run

EOT = "<|endoftext|>"
EOT_ID = 256  # the bytes tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


def docs_with_total(total_tokens: int, seed: int) -> list[str]:
    """Random ASCII documents that make exactly `total_tokens` byte tokens (text + EOT each)."""
    rng = random.Random(seed)
    docs, left = [], total_tokens
    while left:
        n = min(left, rng.randint(6, 70))
        if 0 < left - n < 2:  # leave room for one more document of >= 1 character
            n = left
        docs.append("".join(rng.choices(string.ascii_letters + string.digits, k=n - 1)))
        left -= n
    assert sum(len(d) + 1 for d in docs) == total_tokens
    return docs


def make_dataset(folder: Path, docs: list[str], tokenizer: str = "bytes", **kw) -> Path:
    """Prepare `docs` into a shard dataset at folder/ds (several small shards)."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text(EOT.join(docs), encoding="utf-8")
    out = folder / "ds"
    settings = dict(
        name="t",
        out=str(out),
        input=[str(corpus)],
        tokenizer=tokenizer,
        chunk_mb=0.0002,  # ~200 bytes per shard
        val_fraction=0.0,
        bpe_vocab_size=300,
    )
    settings.update(kw)
    prep.run_local(corpus_config(**settings), workers=1)
    return out


def stream_of(docs: list[str]) -> np.ndarray:
    """The token stream of the documents, computed without the library."""
    ids: list[int] = []
    for doc in docs:
        ids += list(doc.encode()) + [EOT_ID]
    return np.array(ids, dtype=np.int64)


def shard_stream(ds: Path) -> tuple[np.ndarray, list[int]]:
    """The train split's shards concatenated (numpy), and the stream offsets of shard starts."""
    manifest = json.loads((ds / MANIFEST).read_text())
    arrays = [np.load(ds / e["file"]) for e in manifest["splits"]["train"]["shards"]]
    starts = np.cumsum([0] + [a.size for a in arrays])[:-1].tolist()
    return np.concatenate(arrays).astype(np.int64), starts


# --- windows --------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [7, 10, 13, 64])
def test_windows_are_the_stream_in_order(tmp_path, seq_len):
    docs = docs_with_total(841, seed=seq_len)  # 840 = 7 * 10 * 12: some seq_lens fill exactly
    ds = make_dataset(tmp_path, docs)
    stream, shard_starts = shard_stream(ds)
    assert np.array_equal(stream, stream_of(docs))
    assert len(shard_starts) >= 3

    source = ShardTokens(ds, "train", seq_len, seed=0)
    assert source.num_windows == (stream.size - 1) // seq_len
    crossing = 0
    for w in range(source.num_windows):
        lo, hi = w * seq_len, w * seq_len + seq_len + 1
        assert hi <= stream.size  # no window runs past the end
        window = source.read(lo, seq_len + 1)
        assert np.array_equal(window, stream[lo:hi])
        crossing += any(lo < s < hi for s in shard_starts)
    assert crossing >= 2  # windows across shard boundaries were checked

    # samples 0..n-1 are every window exactly once, as int64 tensors
    seen = sorted(find_window(source.sample(i), stream, seq_len) for i in range(source.num_windows))
    assert seen == list(range(source.num_windows))
    assert source.sample(0).dtype == torch.int64 and source.sample(0).shape == (seq_len + 1,)


def find_window(tokens: torch.Tensor, stream: np.ndarray, seq_len: int) -> int:
    """The window index whose tokens these are (windows are unique in these random streams)."""
    matches = [
        w
        for w in range((stream.size - 1) // seq_len)
        if np.array_equal(stream[w * seq_len : w * seq_len + seq_len + 1], tokens.numpy())
    ]
    assert len(matches) == 1
    return matches[0]


def test_too_short_split_is_a_clear_error(tmp_path):
    ds = make_dataset(tmp_path, ["abc"])
    with pytest.raises(DatasetError, match="fewer than one window"):
        ShardTokens(ds, "train", 8, seed=0)


# --- epoch order across data-parallel ranks -------------------------------------------------

SEQ = 16


@pytest.fixture(scope="module")
def dataset_24(tmp_path_factory):
    """A dataset of exactly 24 windows of 16 tokens (plus a remainder that no window uses)."""
    docs = docs_with_total(24 * SEQ + 1 + 9, seed=24)
    ds = make_dataset(tmp_path_factory.mktemp("d24"), docs)
    stream = stream_of(docs)
    windows = {
        stream[w * SEQ : w * SEQ + SEQ + 1].tobytes(): w for w in range((stream.size - 1) // SEQ)
    }
    assert len(windows) == 24  # unique contents: a sample can be mapped back to its window
    return ds, windows


def window_ids(batch: tuple[torch.Tensor, torch.Tensor], windows: dict[bytes, int]) -> list[int]:
    x, y = batch
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    tokens = torch.cat([x, y[:, -1:]], dim=1).numpy().astype(np.int64)
    return [windows[row.tobytes()] for row in tokens]


@pytest.mark.parametrize("dp_size", [1, 2, 3, 4])
def test_each_epoch_reads_every_window_once_across_ranks(dataset_24, dp_size):
    ds, windows = dataset_24
    mbs = 2
    loaders = [
        BatchLoader(ShardTokens(ds, "train", SEQ, seed=5), mbs, dp_rank=r, dp_size=dp_size)
        for r in range(dp_size)
    ]
    steps = 24 // (mbs * dp_size)
    epochs = []
    for _ in range(3):
        order = []
        for _ in range(steps):
            for loader in loaders:  # the global batch is rank 0's block, then rank 1's ...
                order += window_ids(loader.next_batch(), windows)
        assert sorted(order) == list(range(24))  # every window exactly once
        epochs.append(order)
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled every epoch
    assert epochs[0] != list(range(24))  # shuffled at all
    # the global order does not depend on the number of ranks
    single = BatchLoader(ShardTokens(ds, "train", SEQ, seed=5), 24)
    assert [window_ids(single.next_batch(), windows) for _ in range(3)] == epochs


def test_the_seed_changes_the_order(dataset_24):
    ds, windows = dataset_24
    a = window_ids(BatchLoader(ShardTokens(ds, "train", SEQ, seed=1), 24).next_batch(), windows)
    b = window_ids(BatchLoader(ShardTokens(ds, "train", SEQ, seed=2), 24).next_batch(), windows)
    assert sorted(a) == sorted(b) and a != b


# --- resuming with another world size -------------------------------------------------------


def global_batch(loaders: list[BatchLoader]) -> torch.Tensor:
    """The next global batch: every rank's windows, in rank order."""
    batches = [loader.next_batch() for loader in loaders]
    return torch.cat([torch.cat([x, y[:, -1:]], dim=1) for x, y in batches])


@pytest.mark.parametrize("steps_done", [0, 3, 4])
def test_resume_with_another_world_size(tmp_path, steps_done):
    ds = make_dataset(tmp_path, docs_with_total(30 * SEQ + 1, seed=7))  # 30 windows
    source = ShardTokens(ds, "train", SEQ, seed=3)
    assert source.num_windows == 30
    before = [BatchLoader(source, 4, dp_rank=r, dp_size=2) for r in range(2)]
    uninterrupted = [BatchLoader(source, 4, dp_rank=r, dp_size=2) for r in range(2)]
    single = BatchLoader(ShardTokens(ds, "train", SEQ, seed=3), 8)
    for _ in range(steps_done):
        global_batch(before)
        global_batch(uninterrupted)
        single.next_batch()
    state = before[0].state_dict()
    assert state["samples_consumed"] == before[1].state_dict()["samples_consumed"] == 8 * steps_done
    state = json.loads(json.dumps(state))  # as saved in a checkpoint

    after = []
    for r in range(4):
        loader = BatchLoader(ShardTokens(ds, "train", SEQ, seed=3), 2, dp_rank=r, dp_size=4)
        loader.load_state_dict(state)
        after.append(loader)
    # three more global batches (steps 3-4 cross the epoch boundary at sample 30)
    for _ in range(3):
        expected = global_batch(uninterrupted)
        x, y = single.next_batch()
        assert torch.equal(torch.cat([x, y[:, -1:]], dim=1), expected)
        assert torch.equal(global_batch(after), expected)


# --- prefetching ----------------------------------------------------------------------------


@pytest.mark.parametrize(("dp_rank", "dp_size"), [(0, 1), (1, 2)])
def test_prefetch_reads_exactly_what_no_prefetch_reads(tmp_path, dp_rank, dp_size):
    ds = make_dataset(tmp_path, docs_with_total(20 * SEQ + 1, seed=8))
    plain = BatchLoader(ShardTokens(ds, "train", SEQ, 4), 3, dp_rank, dp_size, prefetch=0)
    ahead = BatchLoader(ShardTokens(ds, "train", SEQ, 4), 3, dp_rank, dp_size, prefetch=3)
    reference = [plain.next_batch() for _ in range(14)]  # > 2 epochs
    try:
        got = [ahead.next_batch() for _ in range(6)]
        ahead.load_state_dict({"samples_consumed": 2 * 3 * dp_size})  # back to step 2
        got += [ahead.next_batch() for _ in range(12)]
        saved = ahead.state_dict()
    finally:
        ahead.close()
    expected = reference[:6] + reference[2:14]
    assert len(got) == len(expected)
    for (gx, gy), (ex, ey) in zip(got, expected, strict=True):
        assert torch.equal(gx, ex) and torch.equal(gy, ey)
    assert saved["samples_consumed"] == 14 * 3 * dp_size


class FailingSource:
    """Sample i is [i, i+1, ...]; sample `bad` raises (once, when `once`)."""

    seq_len = 4

    def __init__(self, bad: int, once: bool = False):
        self.bad, self.once = bad, once

    def sample(self, index: int) -> torch.Tensor:
        if index == self.bad:
            if self.once:
                self.bad = -1
            raise RuntimeError(f"cannot read sample {index}")
        return torch.arange(index, index + self.seq_len + 1)


@pytest.mark.parametrize("prefetch", [0, 3])
def test_a_source_error_surfaces_in_next_batch(prefetch):
    loader = BatchLoader(FailingSource(bad=7), 2, prefetch=prefetch)
    for step in range(3):
        x, _ = loader.next_batch()
        assert x[:, 0].tolist() == [2 * step, 2 * step + 1]
    with pytest.raises(RuntimeError, match="cannot read sample 7"):
        loader.next_batch()
    assert loader.samples_consumed == 6  # the failed batch was not consumed
    loader.close()


@pytest.mark.parametrize("prefetch", [0, 3])
def test_next_batch_after_a_source_error_does_not_hang(prefetch):
    """After an error surfaced, asking again retries (as without prefetch); it must never block
    forever on a queue whose producer thread has already exited."""
    loader = BatchLoader(FailingSource(bad=7, once=True), 2, prefetch=prefetch)
    for _ in range(3):
        loader.next_batch()
    with pytest.raises(RuntimeError):
        loader.next_batch()
    result: list = []
    thread = threading.Thread(target=lambda: result.append(loader.next_batch()), daemon=True)
    thread.start()
    thread.join(timeout=2)
    loader.close()
    assert not thread.is_alive(), "next_batch blocked after the prefetch thread died"
    assert result[0][0][:, 0].tolist() == [6, 7]


# --- the trainer on shard datasets ----------------------------------------------------------


@pytest.fixture(scope="module")
def text_dataset(tmp_path_factory):
    rng = random.Random(9)
    words = ["once", "upon", "a", "time", "there", "was", "a", "little", "cat", "café", "🙂"]
    docs = [" ".join(rng.choices(words, k=rng.randint(5, 60))) for _ in range(120)]
    return make_dataset(tmp_path_factory.mktemp("text"), docs, chunk_mb=0.002)


def shard_data(ds: Path, **extra) -> dict:
    return {"kind": "shards", "path": str(ds), "tokenizer": None, "vocab_size": None, **extra}


def test_trainer_reads_the_shards_with_vocab_from_manifest(tiny, text_dataset, monkeypatch):
    read = []
    original = ShardTokens.sample

    def spy(self, index):
        read.append(index)
        return original(self, index)

    monkeypatch.setattr(ShardTokens, "sample", spy)
    cfg = tiny(data=shard_data(text_dataset), model={"vocab_size": None})
    result = run(cfg)
    assert result.step == 6
    assert set(range(6 * 2)) <= set(read)  # 6 steps of 2 samples came from the shards
    saved = OmegaConf.load(Path(cfg["run"]["dir"]) / CONFIG)
    assert saved.model.vocab_size == 257
    assert saved.data.tokenizer == "bytes" and saved.data.vocab_size == 257


def test_resume_on_shards_is_bitwise_exact(tiny, text_dataset):
    sections = {"data": shard_data(text_dataset), "model": {"vocab_size": None}}
    whole = run(tiny("whole", **sections))
    cfg = tiny("split", **sections)
    first = run(cfg, stop_requested=lambda step: step == 3)
    assert first.step == 3
    second = run(cfg)
    assert second.resumed_from is not None
    assert len(whole.losses) == 6
    assert {**first.losses, **second.losses} == whole.losses  # float equality: bitwise


@pytest.mark.parametrize(
    ("data", "model", "key"),
    [
        ({"tokenizer": "gpt2"}, {}, "data.tokenizer"),
        ({"vocab_size": 50257}, {}, "data.vocab_size"),
        ({}, {"vocab_size": 200}, "model.vocab_size"),
    ],
)
def test_config_mismatch_with_the_dataset(tiny, text_dataset, data, model, key):
    cfg = tiny(data=shard_data(text_dataset, **data), model={"vocab_size": None, **model})
    with pytest.raises(ConfigError, match=key):
        run(cfg)
    assert not (Path(cfg["run"]["dir"]) / CHECKPOINTS).exists()


def broken_copy(src: Path, dst: Path, how: str) -> str:
    """A copy of the dataset, broken; returns a regex the error must match."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / MANIFEST).read_text())
    if how == "future_version":
        manifest["format_version"] = 99
        (dst / MANIFEST).write_text(json.dumps(manifest))
        return "format_version 99"
    if how == "no_manifest":
        (dst / MANIFEST).unlink()
        return "dlt-prep"
    shard = dst / manifest["splits"]["train"]["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:-4])
    return str(shard)


@pytest.mark.parametrize("how", ["future_version", "no_manifest", "truncated_shard"])
def test_broken_dataset_is_a_clear_error(tiny, text_dataset, tmp_path, how):
    ds = tmp_path / "broken"
    pattern = broken_copy(text_dataset, ds, how)
    with pytest.raises(DatasetError) as err:
        run(tiny(data=shard_data(ds), model={"vocab_size": None}))
    assert pattern in str(err.value)
    with pytest.raises(DatasetError):
        ShardTokens(ds, "train", 8, seed=0)


def with_ids_beyond_the_vocabulary(src: Path, dst: Path, shards: slice) -> list[Path]:
    """A copy of the dataset whose selected train shards hold id 300 (>= 257) at every 8th
    token, file sizes unchanged (only the token values are wrong); returns those shards."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / MANIFEST).read_text())
    paths = [dst / e["file"] for e in manifest["splits"]["train"]["shards"][shards]]
    for path in paths:
        tokens = np.load(path)
        tokens[::8] = 300
        np.save(path, tokens)
    return paths


def test_ids_beyond_the_vocabulary_name_the_shard(text_dataset, tmp_path):
    (bad,) = with_ids_beyond_the_vocabulary(text_dataset, tmp_path / "bad", slice(1, 2))
    source = ShardTokens(tmp_path / "bad", "train", 8, seed=0)
    with pytest.raises(DatasetError) as err:
        for i in range(source.num_windows):
            source.sample(i)
    message = str(err.value)
    assert message.startswith(f"{bad}: token id 300 at token ")
    assert "max id 300" in message and "vocabulary of 257 ids" in message
    assert "\n" not in message


def test_training_on_ids_beyond_the_vocabulary_is_a_clear_error(tiny, text_dataset, tmp_path):
    """Not an index error inside the embedding: a DatasetError (one line at the CLI)."""
    bad = with_ids_beyond_the_vocabulary(text_dataset, tmp_path / "bad", slice(None))
    with pytest.raises(DatasetError) as err:
        run(tiny(data=shard_data(tmp_path / "bad"), model={"vocab_size": None}))
    assert str(err.value).split(":")[0] in {str(p) for p in bad}


def test_checkpoint_carries_the_trained_tokenizer(tiny, tmp_path, capsys):
    rng = random.Random(10)
    words = ["Hi", "there", "hello", "world", "a", "story", "about", "cats", "naïve"]
    docs = [" ".join(rng.choices(words, k=rng.randint(5, 40))) for _ in range(150)]
    ds = make_dataset(tmp_path / "bpe", docs, tokenizer="bpe", chunk_mb=0.002)
    tokenizer_bytes = (ds / BPE_FILE).read_bytes()
    cfg = tiny(data=shard_data(ds), model={"vocab_size": None}, train={"max_steps": 2})
    result = run(cfg)
    assert (result.last_checkpoint / BPE_FILE).read_bytes() == tokenizer_bytes
    saved = OmegaConf.load(Path(cfg["run"]["dir"]) / CONFIG)
    manifest = json.loads((ds / MANIFEST).read_text())
    assert manifest["tokenizer"]["name"] == "bpe"
    assert saved.data.tokenizer == "bpe"
    assert saved.model.vocab_size == manifest["tokenizer"]["vocab_size"]

    shutil.rmtree(ds)  # generation needs nothing but the checkpoint
    capsys.readouterr()
    generate_cli.main(
        [
            f"checkpoint={cfg['run']['dir']}",
            "prompt=Hi",
            "max_new_tokens=5",
            "temperature=0",
            "device=cpu",
        ]
    )
    out = capsys.readouterr().out
    assert out.startswith("Hi") and len(out.strip()) > len("Hi")
