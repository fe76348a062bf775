"""The trainer's side of real datasets: a dataset names its own tokenizer, a missing
validation split turns validation off, shards are verified against their sha256 before use,
and weighted mixtures of datasets (order, proportions, exact resume at any data-parallel
size)."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from test_loader import docs_with_total, make_dataset

from data_prep.shards import MANIFEST, DatasetError
from jobs.cli import compose_config, given_keys, training_dict
from jobs.train import main as train_main
from trainer.config import ConfigError, resolve_config
from trainer.data import BatchLoader, ShardTokens
from trainer.mixture import MixtureSource, interleave, period_counts
from trainer.run_dir import CHECKPOINTS, METRICS, TRAIN_LOG, read_jsonl
from trainer.shard_verify import ShardVerifier
from trainer.train import run

pytestmark = pytest.mark.usefixtures("one_thread")


def shard_data(ds: Path, **extra) -> dict:
    return {"kind": "shards", "path": str(ds), "tokenizer": None, "vocab_size": None, **extra}


@pytest.fixture(scope="module")
def bytes_dataset(tmp_path_factory) -> Path:
    """~6000 byte tokens in ~30 shards, with a validation split."""
    folder = tmp_path_factory.mktemp("bytes")
    return make_dataset(folder, docs_with_total(6000, seed=3), val_fraction=0.2)


@pytest.fixture(scope="module")
def other_dataset(tmp_path_factory) -> Path:
    """A second dataset of the same tokenizer: upper-case letters only, no validation split."""
    rng = random.Random(5)
    docs = ["".join(rng.choices(string.ascii_uppercase, k=rng.randint(20, 60))) for _ in range(80)]
    return make_dataset(tmp_path_factory.mktemp("other"), docs)


# --- the dataset speaks for itself ---------------------------------------------------------


def cli_config(argv: list[str]):
    return resolve_config(training_dict(compose_config("train", argv)), given=given_keys(argv))


def test_a_named_dataset_brings_its_tokenizer(bytes_dataset, tmp_path):
    # The default data preset (sample) says tokenizer=bpe; the dataset was made with bytes.
    argv = [f"data.path={bytes_dataset}", f"run.dir={tmp_path / 'r'}"]
    cfg = cli_config(argv)
    assert (cfg.data.tokenizer, cfg.data.vocab_size, cfg.model.vocab_size) == ("bytes", 257, 257)
    with pytest.raises(ConfigError, match="data.tokenizer=bpe but dataset .* bytes"):
        cli_config([*argv, "data.tokenizer=bpe"])
    # the preset's own dataset is still held to the preset's word
    with pytest.raises(ConfigError, match="data.tokenizer=bpe but dataset"):
        cli_config([f"data.out={bytes_dataset}", f"run.dir={tmp_path / 'r'}"])


def test_dlt_train_on_a_named_dataset_without_validation(other_dataset, tmp_path, capsys):
    """The first-hour failure of issue 15: `dlt-train data.path=X` on a dataset prepared with
    another tokenizer than the preset's and without a validation split trains."""
    run_dir = tmp_path / "run"
    train_main(
        [
            f"data.path={other_dataset}",
            f"run.dir={run_dir}",
            "model=tiny",
            "model.n_layer=1",
            "model.n_embd=32",
            "model.n_head=2",
            "model.block_size=16",
            "train.max_steps=2",
            "train.micro_batch_size=2",
            "eval.interval=1",
            "log.progress=false",
            "device=cpu",
        ]
    )
    log = (run_dir / TRAIN_LOG).read_text()
    assert f"validation off: dataset {other_dataset} has no validation split" in log
    records = read_jsonl(run_dir / METRICS)
    assert [r["step"] for r in records] == [1, 2] and not any("val_loss" in r for r in records)


# --- shard verification --------------------------------------------------------------------


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    # The low byte of the last-but-one uint16 token (a letter or digit; the last is the EOT):
    # inside the token data, not the .npy header, and the id stays in range.
    data[-4] ^= 0x01
    path.write_bytes(bytes(data))


def copy_dataset(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_verifier_finds_a_changed_shard_and_fails_every_later_read(bytes_dataset, tmp_path):
    ds = copy_dataset(bytes_dataset, tmp_path / "ds")
    entries = json.loads((ds / MANIFEST).read_text())["splits"]["train"]["shards"]
    files = [ds / e["file"] for e in entries]
    hashes = [e["sha256"] for e in entries]
    intact = ShardVerifier(files, hashes)
    intact.require(len(files) - 1)
    intact._thread.join(timeout=30)  # the background pass, started by that read
    assert intact.all_verified
    intact.close()
    flip_a_byte(files[2])
    broken = ShardVerifier(files, hashes, background=False)
    broken.require(0)  # an intact shard, before the damage is found
    with pytest.raises(DatasetError, match=f"{files[2]}: sha256 .* does not match the manifest"):
        broken.require(2)
    with pytest.raises(DatasetError, match=str(files[2])):
        broken.require(0)  # the dataset is damaged: nothing more is read from it


def test_background_verification_covers_every_shard(bytes_dataset):
    entries = json.loads((bytes_dataset / MANIFEST).read_text())["splits"]["train"]["shards"]
    files = [bytes_dataset / e["file"] for e in entries]
    verifier = ShardVerifier(files, [e["sha256"] for e in entries])
    assert verifier._thread is None  # nothing runs before the first read
    verifier.require(0)
    verifier._thread.join(timeout=30)
    assert verifier.all_verified
    assert verifier.bytes_hashed == sum(f.stat().st_size for f in files)


def shards_read(source: ShardTokens, samples: range) -> set[int]:
    """The shards the windows of these samples (epoch 0) touch."""
    touched = set()
    for i in samples:
        start = int(source.order(0)[i]) * source.seq_len
        first, last = (
            int(np.searchsorted(source.starts, t, "right")) - 1
            for t in (start, start + source.seq_len)
        )
        touched |= set(range(first, last + 1))
    return touched


def test_a_flipped_byte_stops_training_before_it_is_trained_on(tiny, bytes_dataset, tmp_path):
    ds = copy_dataset(bytes_dataset, tmp_path / "ds")
    manifest = json.loads((ds / MANIFEST).read_text())
    source = ShardTokens(ds, "train", 32, seed=1337)
    # a shard that step 4 reads first (steps 1-3 read samples 0-5, two per step)
    new_at_step_4 = sorted(shards_read(source, range(6, 8)) - shards_read(source, range(6)))
    assert new_at_step_4, "the fixture's order lets no shard first appear at step 4"
    damaged = ds / manifest["splits"]["train"]["shards"][new_at_step_4[0]]["file"]
    flip_a_byte(damaged)
    cfg = tiny(data=shard_data(ds), model={"vocab_size": None}, checkpoint={"interval": 1})
    with pytest.raises(DatasetError, match=f"{damaged}: sha256 .* does not match"):
        run(cfg)
    # The background pass may find the damage before step 4 needs it: the run then stops
    # sooner. Either way no step reads the shard, so no checkpoint comes from its tokens.
    run_dir = Path(cfg["run"]["dir"])
    steps = [r["step"] for r in read_jsonl(run_dir / METRICS)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) <= 3
    saved = {p.name for p in (run_dir / CHECKPOINTS).iterdir()} if steps else set()
    assert saved <= {"step_1", "step_2", "step_3"}


def test_an_intact_dataset_says_it_was_verified(tiny, bytes_dataset):
    cfg = tiny(data=shard_data(bytes_dataset), model={"vocab_size": None})
    run(cfg)
    log = (Path(cfg["run"]["dir"]) / TRAIN_LOG).read_text()
    assert "data verified: " in log and "match their sha256" in log


def test_verification_can_be_turned_off(tiny, bytes_dataset, tmp_path):
    ds = copy_dataset(bytes_dataset, tmp_path / "ds")
    manifest = json.loads((ds / MANIFEST).read_text())
    flip_a_byte(ds / manifest["splits"]["train"]["shards"][0]["file"])
    cfg = tiny(data=shard_data(ds, verify=False), model={"vocab_size": None})
    assert run(cfg).step == 6  # the user's choice: no hashing, the flip goes unseen


# --- mixtures ------------------------------------------------------------------------------


def test_period_counts_and_interleave():
    assert period_counts([3, 1]) == [3, 1]
    assert period_counts([0.75, 0.25]) == [3, 1]
    assert period_counts([0.7, 0.3]) == [7, 3]
    assert period_counts([2, 2, 4]) == [1, 1, 2]
    assert interleave([3, 1]).tolist() == [0, 0, 1, 0]
    slots = interleave([7, 3])
    assert np.bincount(slots).tolist() == [7, 3]
    for n in range(1, 11):  # every prefix within one sample of its share
        assert abs(int((slots[:n] == 1).sum()) - n * 0.3) < 1


class Numbered:
    """A source whose sample j of source k is [k, j, ...]: where every sample came from."""

    def __init__(self, k: int, seq_len: int = 3):
        self.k, self.seq_len = k, seq_len

    def sample(self, index: int) -> torch.Tensor:
        return torch.tensor([self.k, index] + [0] * (self.seq_len - 1))

    def close(self) -> None:
        pass


def test_mixture_walks_each_source_in_its_own_order():
    mix = MixtureSource([Numbered(0), Numbered(1)], [3, 1], ["a", "b"])
    picked = [mix.sample(i)[:2].tolist() for i in range(12)]
    assert [k for k, _ in picked] == [0, 0, 1, 0] * 3
    assert [j for k, j in picked if k == 0] == list(range(9))  # each source in order, no gaps
    assert [j for k, j in picked if k == 1] == list(range(3))
    for n in range(13):
        assert mix.samples_per_source(n) == [
            sum(k == 0 for k, _ in picked[:n]),
            sum(k == 1 for k, _ in picked[:n]),
        ]
    assert mix.tokens_per_source(8) == {"a": 6 * 3, "b": 2 * 3}


@pytest.mark.parametrize("steps_done", [1, 3])
def test_mixture_resumes_exactly_at_another_data_parallel_size(steps_done):
    """Global batches after a resume are the uninterrupted run's, whatever the dp size."""
    mix = MixtureSource([Numbered(0), Numbered(1), Numbered(2)], [0.5, 0.3, 0.2], ["a", "b", "c"])

    def global_batches(dp_size: int, start: int, steps: int) -> list[list]:
        loaders = [BatchLoader(mix, 4 // dp_size, r, dp_size) for r in range(dp_size)]
        out = []
        for loader in loaders:
            loader.load_state_dict({"samples_consumed": start})
        for _ in range(steps):
            out.append(torch.cat([ld.next_batch()[0] for ld in loaders]).tolist())
        return out

    whole = global_batches(1, 0, 6)
    resumed = global_batches(1, 0, steps_done) + global_batches(2, steps_done * 4, 6 - steps_done)
    assert resumed == whole
    assert global_batches(4, steps_done * 4, 6 - steps_done) == whole[steps_done:]


def mix_config(tiny, name: str, a: Path, b: Path, **sections):
    mix = [{"path": str(a), "weight": 3, "name": "web"}, {"path": str(b), "weight": 1}]
    return tiny(name, data=shard_data(a, mix=mix), model={"vocab_size": None}, **sections)


def test_a_3_to_1_mixture_delivers_3_to_1_tokens_and_resumes(tiny, bytes_dataset, other_dataset):
    cfg = mix_config(tiny, "whole", bytes_dataset, other_dataset, train={"max_steps": 8})
    whole = run(cfg)
    records = read_jsonl(Path(cfg["run"]["dir"]) / METRICS)
    step_tokens = 2 * 32  # micro_batch 2 x 32 tokens, one data-parallel rank
    for r in records:
        seen = r["tokens_per_source"]
        assert set(seen) == {"web", str(other_dataset)}
        total = seen["web"] + seen[str(other_dataset)]
        assert total == r["step"] * step_tokens
        assert abs(seen["web"] - 0.75 * total) <= step_tokens  # +- one batch at every step
    assert records[-1]["tokens_per_source"] == {"web": 12 * 32, str(other_dataset): 4 * 32}
    split = mix_config(tiny, "split", bytes_dataset, other_dataset, train={"max_steps": 8})
    first = run(split, stop_requested=lambda step: step == 3)
    second = run(split)
    assert second.resumed_from is not None
    assert {**first.losses, **second.losses} == whole.losses  # bitwise
    resumed = read_jsonl(Path(split["run"]["dir"]) / METRICS)
    assert [r["tokens_per_source"] for r in resumed] == [r["tokens_per_source"] for r in records]


def test_a_mixture_needs_one_tokenizer(tiny, bytes_dataset, tmp_path):
    gpt_like = make_dataset(tmp_path / "bpe", docs_with_total(3000, seed=8), tokenizer="bpe")
    mix = [{"path": str(bytes_dataset), "weight": 1}, {"path": str(gpt_like), "weight": 1}]
    cfg = tiny(data=shard_data(bytes_dataset, mix=mix), model={"vocab_size": None})
    with pytest.raises(ConfigError, match=r"data.mix: .*bpe.* need one tokenizer"):
        run(cfg)


@pytest.mark.parametrize(
    ("mix", "message"),
    [
        ([{"path": "A", "weight": 0}], r"data.mix\[0\].weight=0.0: must be a positive number"),
        (
            [{"path": "A", "weight": 1}, {"path": "A", "weight": 2}],
            r"data.mix\[1\]: 'A' also names data.mix\[0\]",
        ),
        ([{"path": "A"}], r"data.mix.*weight"),
    ],
)
def test_bad_mixtures_are_one_line_errors(tiny, mix, message):
    cfg = tiny(data=shard_data(Path("A"), mix=mix), model={"vocab_size": None})
    with pytest.raises(ConfigError, match=message):
        resolve_config(cfg)


@pytest.mark.multiproc
def test_a_mixture_run_stopped_on_one_rank_resumes_on_two(tiny, bytes_dataset, other_dataset):
    """Stopped after step 3 as one process, resumed as DDP on 2 ranks (micro-batch halved,
    same global batch): tokens per source continue exactly, losses as uninterrupted."""
    from multiproc import spawn, train_worker

    whole_cfg = mix_config(tiny, "whole", bytes_dataset, other_dataset, train={"max_steps": 6})
    run(whole_cfg)
    whole = {r["step"]: r for r in read_jsonl(Path(whole_cfg["run"]["dir"]) / METRICS)}
    cfg = mix_config(tiny, "hop", bytes_dataset, other_dataset, train={"max_steps": 6})
    run(cfg, stop_requested=lambda step: step == 3)
    two = {**cfg, "train": {**cfg["train"], "micro_batch_size": 1}, "parallel": {"dp_replicate": 2}}
    spawn(2, train_worker, two)
    hopped = {r["step"]: r for r in read_jsonl(Path(cfg["run"]["dir"]) / METRICS)}
    assert sorted(hopped) == sorted(whole) == [1, 2, 3, 4, 5, 6]
    for step, record in hopped.items():
        assert record["tokens_per_source"] == whole[step]["tokens_per_source"]
        assert record["loss"] == pytest.approx(whole[step]["loss"], abs=1e-5)


def test_another_mixture_is_other_data_for_a_resume(tiny, bytes_dataset, other_dataset):
    cfg = mix_config(tiny, "mixed", bytes_dataset, other_dataset, train={"max_steps": 2})
    run(cfg)
    reweighted = {**cfg, "train": {**cfg["train"], "max_steps": 4}}
    reweighted["data"] = {**cfg["data"], "mix": [dict(s, weight=1) for s in cfg["data"]["mix"]]}
    with pytest.raises(ConfigError, match=r"data.mix=.* but run.dir=.* was trained on"):
        run(reweighted)
    same = {**cfg, "train": {**cfg["train"], "max_steps": 3}}
    same["data"] = {**cfg["data"], "path": "elsewhere"}  # not read: the mixture's paths are
    assert run(same).step == 3
