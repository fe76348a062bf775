"""Data-prep throughput against a straightforward baseline, and loader windows/s.

    python -m benchmarks.prep_throughput --mb 50

Corpus: the embedded KJV sample, its chapters shuffled and repeated to `--mb` MB of plain text
with <|endoftext|> separators. Tokenizer: GPT-2 BPE.

- ours: `dlt-prep` (chunk plan, process pool over all cores, .npy shards + sha256 + manifest);
- baseline: `datasets.Dataset.from_dict` + `.map(tiktoken)` in one process + one `.bin` file;
- loader: random 1025-token windows/s from the shards (`gpt2_small`'s block size + 1);
- one document: the same text with blank lines instead of the separators (one `--mb` MB
  document, like a tutorial's input.txt), cut into 8 MB chunks: all workers vs 1 worker (the
  same shards, byte for byte), and what cutting costs in tokens (BPE merges across each cut
  differ from tokenizing the document whole).

Prints a table and appends it to benchmarks/results.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
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


def make_one_document(corpus: Path, path: Path) -> int:
    """The corpus as ONE document (no separators: blank lines between the chapters)."""
    path.write_text(corpus.read_text().replace("\n<|endoftext|>\n", "\n\n"))
    return path.stat().st_size


def run_one_document(path: Path, tmp: Path, workers: int) -> tuple[list[tuple], str]:
    """dlt-prep of one big document on `workers` and on 1 worker, alternating, best of 2
    each (the machine is shared: this halves the noise): (rows, cut-cost line)."""
    best: dict[int, tuple] = {}
    shards = []
    for attempt in range(2):
        for procs in dict.fromkeys((workers, 1)):
            out = tmp / f"one-document-{procs}-{attempt}"
            seconds, tokens, used = run_ours(path, out, procs)
            manifest = json.loads((out / "manifest.json").read_text())
            shards.append([e["sha256"] for e in manifest["splits"]["train"]["shards"]])
            if procs not in best or seconds < best[procs][2]:
                which = "1 worker" if procs == 1 else "all workers"
                label = (
                    f"dlt-prep: one document (no separators) in {manifest['num_chunks']} "
                    f"chunks, {which}, best of 2"
                )
                best[procs] = (label, used, seconds, tokens)
    assert all(s == shards[0] for s in shards)  # the same shards on any number of workers
    whole = len(get_tokenizer("gpt2").encode_ordinary(path.read_text().strip())) + 1
    cuts = manifest["num_chunks"] - 1
    note = (
        f"One document: {tokens:,} tokens in {cuts + 1} chunks vs {whole:,} tokenized whole: "
        f"{tokens - whole:+,} tokens over {cuts} cuts (BPE merges across a cut)."
    )
    return list(best.values()), note


def loader_windows_per_s(folder: Path, seconds: float = 3.0) -> float:
    from benchmarks.loader import windows_per_s
    from trainer.data import ShardTokens

    return windows_per_s(ShardTokens(folder, "train", seq_len=1024, seed=0), seconds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=50.0, help="corpus size in MB")
    parser.add_argument("--workers", type=int, default=0, help="0 = all cores")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    workers = args.workers or prep.default_workers()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    load = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        size = make_corpus(tmp / "corpus.txt", args.mb)
        mb = size / 2**20
        base_s, base_tokens = run_baseline(tmp / "corpus.txt", tmp)
        ours_s, ours_tokens, processes = run_ours(tmp / "corpus.txt", tmp / "shards", workers)
        assert ours_tokens == base_tokens, (ours_tokens, base_tokens)  # the same tokens
        windows = loader_windows_per_s(tmp / "shards")
        make_one_document(tmp / "corpus.txt", tmp / "one.txt")
        one_rows, cut_note = run_one_document(tmp / "one.txt", tmp, workers)

    rows = [
        ("baseline: datasets.map + tiktoken, 1 process, one .bin", 1, base_s, base_tokens),
        ("dlt-prep: chunked pool, .npy shards + sha256 + manifest", processes, ours_s, ours_tokens),
        *one_rows,
    ]
    lines = [
        "| pipeline | processes | seconds | MB/s | tokens/s | tokens/s per process | vs baseline |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, procs, secs, tokens in rows:
        lines.append(
            f"| {name} | {procs} | {secs:.1f} | {mb / secs:.2f} | "
            f"{tokens / secs:,.0f} | {tokens / secs / procs:,.0f} | "
            f"{base_s / secs:.2f}x |"
        )
    lines.append("")
    lines.append(
        f"Loader: {windows:,.0f} random 1025-token windows/s from the shards "
        f"(one thread, page cache warm) = {windows * 1024:,.0f} tokens/s."
    )
    lines.append("")
    lines.append(cut_note)
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        append_results(
            "Data prep throughput",
            f"python -m benchmarks.prep_throughput --mb {args.mb:g}",
            f"corpus: {mb:.1f} MB of KJV chapters (shuffled, repeated), GPT-2 BPE, "
            f"{ours_tokens:,} tokens; both pipelines produce the same tokens; chunk_mb=8; "
            f"threads: one per process (tiktoken), OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; load average before the run "
            f"{load:.1f}" + (" (other jobs on the machine)" if load > 1 else " (a quiet machine)"),
            table,
        )
    print(f"appended to {RESULTS}" if not args.no_write else "")


if __name__ == "__main__":
    main()
