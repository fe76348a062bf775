"""What reading shards costs the trainer: sha256 verification and mixtures.

- hashing: sha256 of the shard files, GB/s in one thread (what the background check runs at);
- delay to the first batch: a fresh source's first micro-batch with `data.verify` off and on
  (on: the shards the batch touches are hashed first, the rest in the background);
- verification beside reading: how long the background pass takes while the loader reads;
- windows/s from one dataset and from a 3:1 mixture of two (the mixture's lookup cost).

The dataset is synthetic (random token ids in `.npy` shards with a real manifest), written to
a temporary folder; the page cache is warm after writing, so the hashing rate is CPU-bound
(a cold network filesystem reads slower). Run: `dlt-bench suite=loader [size=full]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import append_results
from data_prep.shards import MANIFEST, write_shard
from trainer.data import BatchLoader, ShardTokens
from trainer.mixture import MixtureSource

SEQ_LEN = 1024  # gpt2_small's block size


def make_dataset(folder: Path, megabytes: float, shard_mb: float, seed: int) -> int:
    """Random uint16 tokens in shards of `shard_mb`, with a manifest the trainer accepts;
    returns the bytes written."""
    rng = np.random.default_rng(seed)
    per_shard = int(shard_mb * 1e6 / 2)
    shards, written = [], 0
    for i in range(max(1, int(megabytes / shard_mb))):
        entry = write_shard(
            folder / "train" / f"{i:05d}.npy", rng.integers(0, 50257, per_shard, dtype=np.uint16)
        )
        shards.append({"file": f"train/{i:05d}.npy", **entry})
        written += entry["bytes"]
    manifest = {
        "format_version": 1,
        "name": folder.name,
        "tokenizer": {
            "name": "gpt2",
            "hash": "bench",
            "vocab_size": 50257,
            "eot_id": 50256,
            "file": None,
        },
        "splits": {"train": {"shards": shards, "num_tokens": per_shard * len(shards)}},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return written


def hash_rate(folder: Path) -> float:
    """GB/s of hashlib's sha256 over every shard, one thread."""
    files = sorted((folder / "train").glob("*.npy"))
    start, total = time.perf_counter(), 0
    for path in files:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(8 << 20):
                digest.update(block)
                total += len(block)
    return total / 1e9 / (time.perf_counter() - start)


def first_batch_s(folder: Path, verify: bool, micro_batch: int) -> tuple[float, float]:
    """(seconds to a fresh source's first micro-batch, seconds until every shard was
    verified while the loader kept reading; 0 without verification)."""
    start = time.perf_counter()
    source = ShardTokens(folder, "train", SEQ_LEN, seed=0, verify=verify)
    loader = BatchLoader(source, micro_batch)
    loader.next_batch()
    first = time.perf_counter() - start
    while verify and not source.verifier.all_verified:
        loader.next_batch()
    done = time.perf_counter() - start if verify else 0.0
    source.close()
    return first, done


def windows_per_s(source, seconds: float) -> float:
    """Random-order samples/s read from `source` for about `seconds`."""
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        source.sample(n)
        n += 1
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=1000.0, help="dataset size in MB")
    parser.add_argument("--shard-mb", type=float, default=50.0)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0, help="per windows/s figure")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "a", Path(tmp) / "b"
        size = make_dataset(a, args.mb, args.shard_mb, seed=0)
        make_dataset(b, args.mb / 3, args.shard_mb, seed=1)
        gbps = hash_rate(a)
        off, _ = first_batch_s(a, verify=False, micro_batch=args.micro_batch)
        on, all_done = first_batch_s(a, verify=True, micro_batch=args.micro_batch)
        one = windows_per_s(ShardTokens(a, "train", SEQ_LEN, seed=0), args.seconds)
        mix = MixtureSource(
            [ShardTokens(a, "train", SEQ_LEN, 0), ShardTokens(b, "train", SEQ_LEN, 1)],
            [3, 1],
            ["a", "b"],
        )
        mixed = windows_per_s(mix, args.seconds)

    shards = max(1, int(args.mb / args.shard_mb))
    lines = [
        "| measure | value |",
        "|---|---|",
        f"| sha256, one thread | {gbps:.2f} GB/s |",
        f"| first micro-batch ({args.micro_batch} x {SEQ_LEN + 1} tokens), data.verify=false "
        f"| {off * 1e3:.1f} ms |",
        f"| first micro-batch, data.verify=true (hashes the shards it touches) | {on:.2f} s |",
        f"| every shard verified, background thread beside the loader | {all_done:.2f} s |",
        f"| random windows/s, one dataset | {one:,.0f} |",
        f"| random windows/s, 3:1 mixture of two | {mixed:,.0f} ({mixed / one:.2f}x) |",
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        append_results(
            "Loader: shard verification and mixtures",
            "dlt-bench suite=loader size=full write=true",
            f"dataset: {size / 1e6:,.0f} MB of random gpt2 ids in {shards} shards of "
            f"{args.shard_mb:g} MB (page cache warm); 1 torch thread",
            table,
        )


if __name__ == "__main__":
    main()
