"""Data-prep throughput against a straightforward baseline, and loader windows/s.

    python -m benchmarks.prep_throughput --mb 50

Corpus: the embedded KJV sample, its chapters shuffled and repeated to `--mb` MB of plain text
with <|endoftext|> separators. Tokenizer: GPT-2 BPE.

- ours: `dlt-prep` (chunk plan, process pool over all cores, .npy shards + sha256 + manifest);
- baseline: `datasets.Dataset.from_dict` + `.map(tiktoken)` in one process + one `.bin` file;
- loader: random 1025-token windows/s from the shards (`gpt2_small`'s block size + 1).

Prints a table and appends it to benchmarks/results.md.
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, append_results
from data_prep import prep
from data_prep.config import corpus_config
from data_prep.tokenizers import get_tokenizer


def make_corpus(path: Path, megabytes: float) -> int:
    """Shuffled, repeated KJV chapters until `megabytes` MB; returns the byte count."""
    source = resources.files("data_prep.corpora") / "kjv.txt.gz"
    chapters = [
        c.strip() for c in gzip.decompress(source.read_bytes()).decode().split("<|endoftext|>")
    ]
    rng = random.Random(0)
    target = int(megabytes * 2**20)
    written = 0
    with open(path, "w") as f:
        while written < target:
            rng.shuffle(chapters)
            for chapter in chapters:
                piece = chapter + "\n<|endoftext|>\n"
                f.write(piece)
                written += len(piece.encode())
                if written >= target:
                    break
    return written


def run_ours(corpus: Path, out: Path, workers: int) -> tuple[float, int, int]:
    cfg = corpus_config(
        name="bench",
        out=str(out),
        input=[str(corpus)],
        tokenizer="gpt2",
        chunk_mb=8.0,
    )
    start = time.perf_counter()
    manifest = prep.run_local(cfg, workers)
    processes = min(workers, manifest["num_chunks"])
    return time.perf_counter() - start, manifest["splits"]["train"]["num_tokens"], processes


def run_baseline(corpus: Path, out: Path) -> tuple[float, int]:
    """What one would write first: a datasets.map over tiktoken, one process, one .bin."""
    import datasets

    start = time.perf_counter()
    docs = [d.strip() for d in corpus.read_text().split("<|endoftext|>") if d.strip()]
    enc = get_tokenizer("gpt2")
    ds = datasets.Dataset.from_dict({"text": docs})
    ds = ds.map(
        lambda batch: {
            "ids": [enc.encoding.encode_ordinary(t) + [enc.eot_id] for t in batch["text"]]
        },
        batched=True,
        remove_columns=["text"],
    )
    tokens = np.concatenate([np.asarray(ids, dtype=np.uint16) for ids in ds["ids"]])
    tokens.tofile(out / "train.bin")
    return time.perf_counter() - start, int(tokens.size)


def loader_windows_per_s(folder: Path, seconds: float = 3.0) -> float:
    from trainer.data import ShardTokens

    source = ShardTokens(folder, "train", seq_len=1024, seed=0)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        source.sample(n)
        n += 1
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=50.0, help="corpus size in MB")
    parser.add_argument("--workers", type=int, default=0, help="0 = all cores")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    workers = args.workers or prep.default_workers()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        size = make_corpus(tmp / "corpus.txt", args.mb)
        mb = size / 2**20
        base_s, base_tokens = run_baseline(tmp / "corpus.txt", tmp)
        ours_s, ours_tokens, processes = run_ours(tmp / "corpus.txt", tmp / "shards", workers)
        assert ours_tokens == base_tokens, (ours_tokens, base_tokens)  # the same tokens
        windows = loader_windows_per_s(tmp / "shards")

    rows = [
        ("baseline: datasets.map + tiktoken, 1 process, one .bin", 1, base_s),
        ("dlt-prep: chunked pool, .npy shards + sha256 + manifest", workers, ours_s),
    ]
    lines = [
        "| pipeline | processes | seconds | MB/s | tokens/s | tokens/s per process | vs baseline |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, procs, secs in rows:
        lines.append(
            f"| {name} | {procs} | {secs:.1f} | {mb / secs:.2f} | "
            f"{ours_tokens / secs:,.0f} | {ours_tokens / secs / procs:,.0f} | "
            f"{base_s / secs:.2f}x |"
        )
    lines.append("")
    lines.append(
        f"Loader: {windows:,.0f} random 1025-token windows/s from the shards "
        f"(one thread, page cache warm) = {windows * 1024:,.0f} tokens/s."
    )
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        append_results(
            "Data prep throughput",
            f"python -m benchmarks.prep_throughput --mb {args.mb:g}",
            f"corpus: {mb:.1f} MB of KJV chapters (shuffled, repeated), GPT-2 BPE, "
            f"{ours_tokens:,} tokens; both pipelines produce the same tokens",
            table,
        )
    print(f"appended to {RESULTS}" if not args.no_write else "")


if __name__ == "__main__":
    main()
