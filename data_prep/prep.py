"""The prep job: plan chunks -> (train a BPE) -> tokenize each chunk into shards -> manifest.

    plan()           cut the corpus into chunks; written to plan.json (reused by re-runs)
    prepare_tokenizer()   for tokenizer=bpe, train it once on the training documents; for
                     tokenizer=hf, copy data.tokenizer_path's tokenizer.json next to the shards
    process_chunk(i) chunk i -> train/0000i.npy (+ val/0000i.npy) + chunks/0000i.json;
                     skipped when its shards are already intact (restartable; the unit of
                     work of a SLURM array task)
    finalize()       check every chunk's shards (sha256) and write manifest.json, last

`run_local` runs them all here, chunks in a process pool.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
import zlib
from array import array
from collections.abc import Iterator
from dataclasses import asdict
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_prep.config import DOC_SEPARATORS, INPUT_FORMATS, CorpusConfig
from data_prep.files import temporary_name, write_json_atomic, write_text_atomic
from data_prep.shards import (
    FORMAT_VERSION,
    MANIFEST,
    SPLITS,
    DatasetError,
    shard_is_intact,
    token_dtype,
    write_shard,
    writing,
)
from data_prep.sources import (
    Chunk,
    DataError,
    all_inputs,
    input_signature,
    iter_documents,
    plan_chunks,
    read_chunk,
)
from data_prep.tokenizers import (
    BPE_FILE,
    HF_FILE,
    NAMES,
    TOKENIZER_FILES,
    Tokenizer,
    get_tokenizer,
    hf_tokenizer_text,
    save_bpe,
    train_bpe,
)

PLAN = "plan.json"
# What prep writes (and deletes) in data.out, with `.tmp` names next to them while writing.
OUTPUTS = (MANIFEST, PLAN, BPE_FILE, HF_FILE, "chunks", *SPLITS)
# Settings that change what the shards contain: a re-run with other values must not mix in.
SHARD_SETTINGS = (
    "tokenizer",
    "format",
    "doc_separator",
    "text_field",
    "hf_split",
    "val_fraction",
    "chunk_mb",
    "bpe_vocab_size",
    "bpe_train_mb",
)


def check_prep_config(cfg: CorpusConfig) -> None:
    """One-line errors for settings dlt-prep cannot work with."""
    if not cfg.out:
        raise DataError("data.out: where to write the shards is not set")
    if not cfg.input:
        raise DataError("data.input: no input files given")
    if cfg.tokenizer not in NAMES:
        raise DataError(f"tokenizer={cfg.tokenizer!r}: expected one of {', '.join(NAMES)}")
    if cfg.format not in INPUT_FORMATS:
        raise DataError(f"data.format={cfg.format!r}: expected one of {', '.join(INPUT_FORMATS)}")
    if cfg.doc_separator not in DOC_SEPARATORS:
        raise DataError(
            f"data.doc_separator={cfg.doc_separator!r}: expected one of {', '.join(DOC_SEPARATORS)}"
        )
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise DataError(f"data.val_fraction={cfg.val_fraction}: must be in [0, 1)")
    if cfg.chunk_mb <= 0:
        raise DataError(f"data.chunk_mb={cfg.chunk_mb}: must be positive")
    if cfg.tokenizer == "bpe" and not 258 <= cfg.bpe_vocab_size <= 2**32:
        raise DataError(f"data.bpe_vocab_size={cfg.bpe_vocab_size}: must be at least 258")
    if cfg.tokenizer == "hf" and not cfg.tokenizer_path:
        raise DataError(
            "data.tokenizer_path: not set; tokenizer=hf reads the tokenizer.json in that folder"
        )


def settings_of(cfg: CorpusConfig) -> dict[str, Any]:
    return {key: getattr(cfg, key) for key in SHARD_SETTINGS}


def plan(cfg: CorpusConfig) -> list[Chunk]:
    """The chunks of the corpus: from plan.json when inputs and settings are unchanged."""
    check_prep_config(cfg)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise DataError(f"data.out={out}: is a file; expected a folder for the dataset")
    inputs = all_inputs(cfg)
    check_inputs_outside_outputs(inputs, out)
    signature = {"settings": settings_of(cfg), "inputs": input_signature([s for s, _ in inputs])}
    if cfg.tokenizer == "hf":  # its content (not its path): another tokenizer must not mix in
        signature["tokenizer_sha256"] = hashlib.sha256(hf_text(cfg).encode()).hexdigest()
    plan_path = out / PLAN
    if plan_path.is_file():
        saved = read_plan(out)
        if {k: saved.get(k) for k in signature} == signature:
            return [Chunk(**c) for c in saved["chunks"]]
        if (out / "chunks").is_dir() and any((out / "chunks").iterdir()):
            raise DataError(
                f"data.out={out} holds a dataset prepared from other inputs or settings: "
                "use another data.out, or delete it"
            )
    else:
        check_no_unplanned_outputs(out)
    chunks = plan_chunks(inputs, cfg)
    if not chunks:
        names = ", ".join(s for s, _ in inputs)
        raise DataError(f"data.input: the inputs are empty (no documents): {names}")
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    # A tokenizer trained (or copied) for an earlier, abandoned plan must not be reused.
    for name in TOKENIZER_FILES.values():
        with writing(out / name):
            (out / name).unlink(missing_ok=True)
    with writing(plan_path):
        write_json_atomic(
            plan_path,
            {
                **signature,
                "format_version": FORMAT_VERSION,
                "chunks": [c.to_dict() for c in chunks],
            },
        )
    return chunks


def check_inputs_outside_outputs(inputs: list[tuple[str, str]], out: Path) -> None:
    """Refuse an input that lies where prep writes or deletes files in data.out (a shard, a
    chunk record, the manifest, ...): prep would overwrite the file it reads."""
    targets = {name if "." in name else f"{name}/": (out / name).resolve() for name in OUTPUTS}
    for source, split in inputs:
        path = Path(source.removeprefix("hf-disk:").removeprefix("hf:"))
        if not path.exists():
            continue  # a dataset name on the hub
        path = path.resolve()
        if path.is_dir() and out.resolve().is_relative_to(path):
            raise DataError(
                f"data.out={out} lies inside the input folder {source}, which dlt-prep would "
                "then read its own files from: use a data.out outside it"
            )
        for name, target in targets.items():
            if path.is_relative_to(target) or path == temporary_name(target):
                key = "data.input" if split == "train" else "data.val_input"
                raise DataError(
                    f"{key}: {source} lies inside data.out={out}, in {name} where dlt-prep "
                    "writes: move the input out of it, or use another data.out"
                )


def check_no_unplanned_outputs(out: Path) -> None:
    """Without plan.json, data.out must hold nothing prep writes: such files belong to another
    corpus or a broken dataset, which a new plan would reuse (shards) or delete (tokenizer)."""
    found = [name for name in OUTPUTS if name != PLAN and (out / name).exists()]
    if found:
        raise DataError(
            f"data.out={out} holds {', '.join(found)} but no {PLAN}, so they cannot be checked "
            "against these inputs: remove the folder or use another data.out"
        )


def read_plan(out: Path) -> dict[str, Any]:
    path = out / PLAN
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise DataError(
            f"{path}: unreadable ({err}): remove the folder or use another data.out"
        ) from None


def hf_text(cfg: CorpusConfig) -> str:
    """tokenizer=hf: the HF_FILE for data.tokenizer_path and data.eot_token (checked)."""
    try:
        return hf_tokenizer_text(cfg.tokenizer_path, cfg.eot_token)
    except OSError as err:
        raise DataError(f"data.tokenizer_path={cfg.tokenizer_path}: {err}") from None


def prepare_tokenizer(cfg: CorpusConfig, chunks: list[Chunk]) -> Tokenizer:
    """The tokenizer; for `bpe`, trained here first (once) on up to bpe_train_mb of text; for
    `hf`, data.tokenizer_path's tokenizer stored next to the shards (HF_FILE) first."""
    out = Path(cfg.out)
    if cfg.tokenizer == "hf":
        text = hf_text(cfg)
        stored = out / HF_FILE
        if not stored.is_file() or stored.read_text(encoding="utf-8") != text:
            with writing(stored):
                write_text_atomic(stored, text)
            tokenizer = get_tokenizer("hf", out)
            print(
                f"dlt-prep: tokenizer=hf from data.tokenizer_path={cfg.tokenizer_path}: "
                f"{tokenizer.vocab_size} ids, end-of-text token {tokenizer.eot_token!r} "
                f"(id {tokenizer.eot_id})",
                flush=True,
            )
            return tokenizer
    if cfg.tokenizer == "bpe" and not (out / BPE_FILE).is_file():
        print(
            f"dlt-prep: training a BPE tokenizer (data.bpe_vocab_size={cfg.bpe_vocab_size}) on "
            f"up to {cfg.bpe_train_mb:g} MB of the training documents",
            flush=True,
        )
        start = time.perf_counter()
        tty = sys.stderr.isatty()  # a terminal shows the trainer's own progress bars
        texts = bpe_training_text(cfg, chunks, report=not tty)
        ranks = train_bpe(texts, cfg.bpe_vocab_size, show_progress=tty)
        with writing(out / BPE_FILE):
            save_bpe(ranks, out / BPE_FILE)
        print(
            f"dlt-prep: trained the BPE tokenizer in {time.perf_counter() - start:.1f} s",
            flush=True,
        )
    return get_tokenizer(cfg.tokenizer, out)


def bpe_training_text(cfg: CorpusConfig, chunks: list[Chunk], report: bool) -> Iterator[str]:
    """Training documents up to data.bpe_train_mb; `report`: a plain progress line every 10%
    of that (for log files) and one when all is read."""
    budget = int(cfg.bpe_train_mb * 2**20)
    used, reported = 0, 0
    for doc in iter_documents([c for c in chunks if c.split == "train"], cfg):
        if used >= budget:
            break
        used += len(doc)
        yield doc
        if report and used - reported >= budget / 10:
            reported = used
            print(f"dlt-prep: BPE: read {used / 2**20:.1f} MB of text", flush=True)
    if report:
        print(f"dlt-prep: BPE: read {used / 2**20:.1f} MB in all; learning the merges", flush=True)


def chunk_record_path(out: Path, index: int) -> Path:
    return out / "chunks" / f"{index:05d}.json"


def chunk_is_done(out: Path, index: int) -> bool:
    """Chunk `index` has a record and every shard it lists is intact (size and sha256)."""
    path = chunk_record_path(out, index)
    if not path.is_file():
        return False
    try:
        record = json.loads(path.read_text())
    except ValueError:
        return False
    return all(shard_is_intact(out / e["file"], e) for e in record["shards"].values())


def is_validation(doc: str, fraction: float) -> bool:
    """A stable, content-based choice: the same document always lands in the same split."""
    return fraction > 0 and zlib.crc32(doc.encode()) % 100_000 < fraction * 100_000


def tokenize(docs: list[str], tokenizer: Tokenizer, dtype: np.dtype) -> np.ndarray:
    """Concatenated ids of the documents, each followed by the end-of-text id."""
    ids = array("I")
    for doc in docs:
        ids.extend(tokenizer.encode_ordinary(doc))
        ids.append(tokenizer.eot_id)
    return np.frombuffer(ids, dtype=np.uint32).astype(dtype)


def process_chunk(
    cfg: CorpusConfig, chunks: list[Chunk], index: int, tokenizer: Tokenizer
) -> dict[str, Any]:
    """Tokenize chunk `index` into its shards (skipped if already intact); returns its record."""
    out = Path(cfg.out)
    if chunk_is_done(out, index):
        return {**json.loads(chunk_record_path(out, index).read_text()), "skipped": True}
    chunk = chunks[index]
    docs = read_chunk(chunk, cfg)
    by_split: dict[str, list[str]] = {"train": [], "val": []}
    for doc in docs.texts:
        val = chunk.split == "val" or is_validation(doc, cfg.val_fraction)
        by_split["val" if val else "train"].append(doc)
    dtype = token_dtype(tokenizer.vocab_size)
    shards: dict[str, dict[str, Any]] = {}
    try:
        for split, split_docs in by_split.items():
            if not split_docs:
                continue
            file = f"{split}/{index:05d}.npy"
            entry = write_shard(out / file, tokenize(split_docs, tokenizer, dtype))
            shards[split] = {"file": file, "num_documents": len(split_docs), **entry}
        record = {
            "chunk": index,
            "input_bytes": chunk.end - chunk.start if chunk.format != "hf" else None,
            "shards": shards,
            "skipped_documents": docs.skipped,
        }
        path = chunk_record_path(out, index)
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, record)
    except DatasetError:  # e.g. the disk is full: this chunk is discarded, others are kept
        for entry in shards.values():
            with contextlib.suppress(OSError):
                (out / entry["file"]).unlink()
        raise
    return {**record, "skipped": False}


def finalize(cfg: CorpusConfig, chunks: list[Chunk], tokenizer: Tokenizer) -> dict[str, Any]:
    """Check every chunk's shards and write manifest.json (atomically, last)."""
    out = Path(cfg.out)
    splits = {s: {"num_tokens": 0, "num_documents": 0, "shards": []} for s in SPLITS}
    skipped: dict[str, int] = {}
    held_out = 0  # documents of data.input that data.val_fraction sent to validation
    for index in range(len(chunks)):
        if not chunk_is_done(out, index):
            raise DatasetError(f"{out}: chunk {index} is missing or corrupt; run dlt-prep again")
        record = json.loads(chunk_record_path(out, index).read_text())
        for split, entry in record["shards"].items():
            splits[split]["shards"].append(entry)
            splits[split]["num_tokens"] += entry["num_tokens"]
            splits[split]["num_documents"] += entry["num_documents"]
        for reason, count in record["skipped_documents"].items():
            skipped[reason] = skipped.get(reason, 0) + count
        if chunks[index].split == "train" and "val" in record["shards"]:
            held_out += record["shards"]["val"]["num_documents"]
    if splits["train"]["num_tokens"] == 0:
        raise DataError(no_training_documents(cfg, chunks, held_out, splits["val"], skipped))
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": cfg.name,
        "tokenizer": {
            "name": tokenizer.name,
            "hash": tokenizer.hash,
            "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id,
            "file": TOKENIZER_FILES.get(tokenizer.name),
        },
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "splits": {s: v for s, v in splits.items() if v["shards"]},
        "skipped_documents": skipped,
        "num_chunks": len(chunks),
        "settings": settings_of(cfg),
    }
    with writing(out / MANIFEST):
        write_json_atomic(out / MANIFEST, manifest)
    return manifest


def no_training_documents(
    cfg: CorpusConfig, chunks: list[Chunk], held_out: int, val: dict, skipped: dict[str, int]
) -> str:
    """Why the training split is empty, in one line."""
    if held_out:
        return (
            f"data.val_fraction={cfg.val_fraction}: all {held_out} documents of data.input "
            "went to the validation split, none is left for training: lower "
            "data.val_fraction or add documents, and use another data.out (or delete this one)"
        )
    if val["num_documents"]:
        return (
            "data.input: no training documents in the inputs, only the "
            f"{val['num_documents']} validation documents of data.val_input"
        )
    names = ", ".join(sorted({c.source for c in chunks}))
    reason = ""
    if skipped.get("missing_field"):
        reason = (
            f"; {skipped['missing_field']} lines have no string field {cfg.text_field!r} "
            "(data.text_field)"
        )
    return f"data.input: no documents found in the inputs (empty corpus){reason}: {names}"


# --- running it all on this machine ---------------------------------------------------------


@cache
def _worker_state(cfg_items: tuple) -> tuple[CorpusConfig, list[Chunk], Tokenizer]:
    cfg = CorpusConfig(**dict(cfg_items))
    chunks = [Chunk(**c) for c in read_plan(Path(cfg.out))["chunks"]]
    return cfg, chunks, get_tokenizer(cfg.tokenizer, cfg.out)


def _run_one(args: tuple[tuple, int]) -> dict[str, Any]:
    cfg_items, index = args
    cfg, chunks, tokenizer = _worker_state(cfg_items)
    return process_chunk(cfg, chunks, index, tokenizer)


def _frozen(cfg: CorpusConfig) -> tuple:
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in asdict(cfg).items())


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_chunks(cfg: CorpusConfig, indices: list[int], workers: int) -> list[dict[str, Any]]:
    """Process chunks in a pool of `workers` processes, with a progress display."""
    items = [(_frozen(cfg), i) for i in indices]
    tty = sys.stderr.isatty()
    bar = tqdm(total=len(items), unit="chunk", disable=not tty, dynamic_ncols=True)
    records, text_bytes, tokens = [], 0, 0
    start = time.perf_counter()
    # fork: workers inherit the loaded tokenizer instead of importing and building it again
    context = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    with context.Pool(workers) if workers > 1 else _InProcess() as pool:
        for record in pool.imap_unordered(_run_one, items):
            records.append(record)
            if not record["skipped"]:
                text_bytes += record["input_bytes"] or 0
                tokens += sum(e["num_tokens"] for e in record["shards"].values())
            elapsed = max(time.perf_counter() - start, 1e-9)
            rate = f"{text_bytes / elapsed / 2**20:.1f} MB/s, {tokens / elapsed:,.0f} tok/s"
            bar.set_postfix_str(rate, refresh=False)
            bar.update(1)
            if not tty:  # a plain line per chunk reads well in a SLURM log file
                state = "skipped (intact)" if record["skipped"] else "done"
                print(
                    f"chunk {record['chunk']} {state} [{len(records)}/{len(items)}] {rate}",
                    flush=True,
                )
    bar.close()
    return records


class _InProcess:
    """A stand-in for a pool with one worker: no subprocess, easier to debug."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap_unordered(self, fn, items):
        return map(fn, items)


def run_local(cfg: CorpusConfig, workers: int = 0) -> dict[str, Any]:
    """Prepare the dataset at `cfg.out` on this machine; returns the manifest."""
    chunks = plan(cfg)
    out = Path(cfg.out)
    tokenizer = prepare_tokenizer(cfg, chunks)
    todo = [i for i in range(len(chunks)) if not chunk_is_done(out, i)]
    if todo and (out / MANIFEST).exists():
        with writing(out / MANIFEST):
            (out / MANIFEST).unlink()  # being repaired: must not look complete meanwhile
    workers = workers or default_workers()
    print(
        f"dlt-prep: {len(chunks)} chunks, {len(chunks) - len(todo)} already done, "
        f"{len(todo)} to do with {min(workers, max(1, len(todo)))} workers",
        flush=True,
    )
    run_chunks(cfg, todo, min(workers, max(1, len(todo))))
    return finalize(cfg, chunks, tokenizer)
