"""The prep job: plan chunks -> (train a BPE) -> tokenize each chunk into shards -> manifest.

    plan()           cut the corpus into chunks; written to plan.json (reused by re-runs)
    prepare_tokenizer()   for tokenizer=bpe, train it once on the training documents; for
                     tokenizer=hf, copy data.tokenizer_path's tokenizer.json next to the shards
    process_chunk(i) chunk i -> train/0000i.npy (+ val/0000i.npy) + chunks/0000i.json;
                     skipped when its shards are already intact (restartable; the unit of
                     work of a SLURM array task)
    finalize()       check every chunk's shards (sha256) and write manifest.json, last

`run_local` runs them all here, chunks in a process pool; a streamed dataset (hf:NAME) is
read here, one chunk of rows at a time, and its chunks are tokenized by the same pool.

The validation split (data.val_fraction of data.input) is held out either by *documents*
(whole documents, chosen by a CRC32 of their text: the same document always lands in the same
split) or by *tokens* (the last val_fraction of every chunk's tokens). data.val_split=auto
picks tokens when a document split would be unreliable: a document is longer than a chunk,
or fewer than MIN_VAL_DOCUMENTS validation documents are expected. The choice is made when
planning, from the inputs and settings only, and recorded in plan.json and the manifest.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
import zlib
from array import array
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_prep.config import DOC_SEPARATORS, INPUT_FORMATS, VAL_SPLITS, CorpusConfig
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
    Documents,
    Planned,
    all_inputs,
    input_signature,
    iter_documents,
    plan_chunks,
    read_chunk,
    row_documents,
    stream_rows,
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
# data.val_split=auto holds out whole documents only when at least this many are expected.
MIN_VAL_DOCUMENTS = 20
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
    "val_split",
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
    if cfg.val_split not in VAL_SPLITS:
        raise DataError(
            f"data.val_split={cfg.val_split!r}: expected one of {', '.join(VAL_SPLITS)}"
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
    """The chunks of the corpus known so far (see :func:`known_chunks`): from plan.json when
    inputs and settings are unchanged, else planned (and plan.json written)."""
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
            return known_chunks(saved)
        if (out / "chunks").is_dir() and any((out / "chunks").iterdir()):
            raise DataError(
                f"data.out={out} holds a dataset prepared from other inputs or settings: "
                "use another data.out, or delete it"
            )
    else:
        check_no_unplanned_outputs(out)
    planned = plan_chunks(inputs, cfg)
    if not planned.chunks and not planned.streams:
        names = ", ".join(s for s, _ in inputs)
        raise DataError(f"data.input: the inputs are empty (no documents): {names}")
    val_split = choose_val_split(cfg, planned, sum(split == "val" for _, split in inputs))
    chunks = [with_val_by(c, val_split["by"]) for c in planned.chunks]
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    # A tokenizer trained (or copied) for an earlier, abandoned plan must not be reused.
    for name in TOKENIZER_FILES.values():
        with writing(out / name):
            (out / name).unlink(missing_ok=True)
    streams = [{**stream, "rows": None} for stream in planned.streams]
    write_plan(
        out,
        {
            **signature,
            "format_version": FORMAT_VERSION,
            "val_split": val_split,
            "chunks": [c.to_dict() for c in chunks],
            "streams": streams,  # rows: null until the stream has been read to its end
        },
    )
    return chunks


def write_plan(out: Path, payload: dict[str, Any]) -> None:
    with writing(out / PLAN):
        write_json_atomic(out / PLAN, payload)


def with_val_by(chunk: Chunk, by: str) -> Chunk:
    """`chunk` holding out validation `by` documents | tokens | none (a val chunk: all)."""
    return dataclasses.replace(chunk, val_by="all" if chunk.split == "val" else by)


def choose_val_split(cfg: CorpusConfig, planned: Planned, val_inputs: int) -> dict[str, Any]:
    """How data.val_fraction of data.input is held out, and why (see the module docstring)."""
    fraction, documents = cfg.val_fraction, planned.train_documents
    expected = documents * fraction
    if fraction == 0:
        by, reason = "none", "data.val_fraction=0"
    elif cfg.val_split != "auto":
        by, reason = cfg.val_split, f"data.val_split={cfg.val_split}"
    elif any(c.ends_inside for c in planned.chunks if c.split == "train"):
        by = "tokens"
        reason = f"a document of data.input is longer than a chunk (data.chunk_mb={cfg.chunk_mb:g})"
    elif any(stream["split"] == "train" for stream in planned.streams):
        by, reason = "documents", "a streamed dataset (its documents are not counted ahead)"
    else:
        by = "tokens" if expected < MIN_VAL_DOCUMENTS else "documents"
        relation = "fewer than" if by == "tokens" else "at least"
        reason = (
            f"about {documents} documents x data.val_fraction={fraction:g} = {expected:.1f} "
            f"expected validation documents, {relation} {MIN_VAL_DOCUMENTS}"
        )
    return {"by": by, "val_fraction": fraction, "reason": reason, "val_input_files": val_inputs}


def known_chunks(saved: dict[str, Any]) -> list[Chunk]:
    """The planned chunks (files, hf-disk:), then those of the streams read to their end (a
    stream's chunks are numbered after those of the inputs before it)."""
    chunks = [Chunk(**c) for c in saved["chunks"]]
    by = saved.get("val_split", {}).get("by", "documents")
    for stream in saved.get("streams", []):
        if stream["rows"] is None:
            break
        chunks.extend(with_val_by(c, by) for c in stream_chunks(stream, stream["rows"]))
    return chunks


def stream_chunks(stream: dict[str, Any], rows: int) -> list[Chunk]:
    """Chunk k of a stream is always its rows [k*R, (k+1)*R), R = rows_per_chunk."""
    per = stream["rows_per_chunk"]
    return [
        Chunk(stream["source"], "hf-stream", stream["split"], start, min(rows, start + per))
        for start in range(0, rows, per)
    ]


def unread_streams(out: Path) -> list[str]:
    """The streamed inputs not yet read to their end (their chunks are not all known)."""
    return [st["source"] for st in read_plan(out).get("streams", []) if st["rows"] is None]


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
    for doc in training_documents(cfg, chunks):
        if used >= budget:
            break
        used += len(doc)
        yield doc
        if report and used - reported >= budget / 10:
            reported = used
            print(f"dlt-prep: BPE: read {used / 2**20:.1f} MB of text", flush=True)
    if report:
        print(f"dlt-prep: BPE: read {used / 2**20:.1f} MB in all; learning the merges", flush=True)


def training_documents(cfg: CorpusConfig, chunks: list[Chunk]) -> Iterator[str]:
    """The documents of data.input in order: the planned chunks', then the streamed ones'."""
    yield from iter_documents([c for c in chunks if c.split == "train"], cfg)
    known = {c.source for c in chunks}
    for stream in read_plan(Path(cfg.out)).get("streams", []):
        if stream["split"] == "train" and stream["source"] not in known:
            rows = stream_rows(stream["source"], cfg)
            yield from (t for t in rows if isinstance(t, str) and t.strip())


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


@dataclass
class Tokens:
    """A run of token ids and how many documents end in it (an end-of-text id each)."""

    ids: np.ndarray
    documents: int


def tokenize(docs: Documents, tokenizer: Tokenizer, dtype: np.dtype) -> Tokens:
    """Concatenated ids of the documents, each followed by the end-of-text id, except a last
    one that continues in the next chunk (its document has not ended yet)."""
    ids = array("I")
    ends = 0
    for i, doc in enumerate(docs.texts):
        ids.extend(tokenizer.encode_ordinary(doc))
        if not (docs.last_continues and i == len(docs.texts) - 1):
            ids.append(tokenizer.eot_id)
            ends += 1
    return Tokens(np.frombuffer(ids, dtype=np.uint32).astype(dtype), ends)


def split_by_documents(chunk: Chunk, docs: Documents, fraction: float) -> dict[str, Documents]:
    """Whole documents to validation by CRC32 of their text; a piece of a document cut by the
    chunk boundary stays in training (its other pieces are in the neighbouring chunks)."""
    parts = {"train": Documents([], {}), "val": Documents([], {})}
    last = len(docs.texts) - 1
    for i, doc in enumerate(docs.texts):
        piece = (i == 0 and chunk.starts_inside) or (i == last and docs.last_continues)
        held_out = chunk.split == "val" or (
            chunk.val_by == "documents" and not piece and is_validation(doc, fraction)
        )
        part = parts["val" if held_out else "train"]
        part.texts.append(doc)
        part.last_continues = i == last and docs.last_continues
    return parts


def split_tokens(
    chunk: Chunk, docs: Documents, tokenizer: Tokenizer, fraction: float
) -> dict[str, Tokens]:
    """The chunk's tokens per split (see the module docstring for the two ways)."""
    dtype = token_dtype(tokenizer.vocab_size)
    if chunk.val_by != "tokens":
        parts = split_by_documents(chunk, docs, fraction)
        return {split: tokenize(part, tokenizer, dtype) for split, part in parts.items()}
    # By tokens: the last val_fraction of the chunk's tokens (a cut inside a document).
    whole = tokenize(docs, tokenizer, dtype)
    keep = whole.ids.size - int(whole.ids.size * fraction)
    ends = np.flatnonzero(whole.ids == tokenizer.eot_id) + 1
    in_train = int(np.count_nonzero(ends <= keep)) if whole.documents else 0
    return {
        "train": Tokens(whole.ids[:keep], in_train),
        "val": Tokens(whole.ids[keep:], whole.documents - in_train),
    }


def process_chunk(
    cfg: CorpusConfig,
    chunk: Chunk,
    index: int,
    tokenizer: Tokenizer,
    docs: Documents | None = None,
) -> dict[str, Any]:
    """Tokenize chunk `index` into its shards (skipped if already intact); returns its record.
    `docs`: its documents when already read (a stream), else read here."""
    out = Path(cfg.out)
    if chunk_is_done(out, index):
        return {**json.loads(chunk_record_path(out, index).read_text()), "skipped": True}
    docs = read_chunk(chunk, cfg) if docs is None else docs
    shards: dict[str, dict[str, Any]] = {}
    try:
        for split, tokens in split_tokens(chunk, docs, tokenizer, cfg.val_fraction).items():
            if not tokens.ids.size:
                continue
            file = f"{split}/{index:05d}.npy"
            entry = write_shard(out / file, tokens.ids)
            shards[split] = {"file": file, "num_documents": tokens.documents, **entry}
        record = {
            "chunk": index,
            "input_bytes": chunk.end - chunk.start if chunk.format in ("text", "jsonl") else None,
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
    if unread := unread_streams(out):
        raise DatasetError(
            f"{out}: {', '.join(unread)} was not read to its end yet (a streamed input is "
            "prepared by one dlt-prep phase=all run): run dlt-prep again"
        )
    splits = {s: {"num_tokens": 0, "num_documents": 0, "shards": []} for s in SPLITS}
    input_bytes = 0
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
        input_bytes += record["input_bytes"] or 0
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
        "input_bytes": input_bytes,  # of the text / JSONL inputs (datasets: not counted)
        "val_split": read_plan(out).get("val_split"),
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


def summary_lines(manifest: dict[str, Any]) -> list[str]:
    """What a prep made, for its last lines: documents, tokens per split, chunks, and how
    the validation split was made (with a warning when it came out tiny)."""
    splits = manifest["splits"]
    documents = sum(v["num_documents"] for v in splits.values())
    parts = [
        f"{name} {v['num_tokens']:,} tokens in {len(v['shards'])} shards"
        for name, v in splits.items()
    ]
    text_files = f"{manifest['input_bytes'] / 2**20:.2f} MB of text files"
    if not manifest["input_bytes"]:
        text_files = "datasets only"
    lines = [
        f"dlt-prep: {documents:,} document{'s' * (documents != 1)}, "
        f"{manifest['num_chunks']} chunks, {text_files} -> {', '.join(parts)}"
    ]
    return [*lines, val_split_line(manifest)]


def val_split_line(manifest: dict[str, Any]) -> str:
    """One line on how the validation split was made; a warning when it came out tiny."""
    split = manifest.get("val_split")
    if not split or split["by"] == "none":
        if split and split["val_input_files"]:
            return "dlt-prep: validation split: the files of data.val_input"
        return "dlt-prep: no validation split (data.val_fraction=0, no data.val_input)"
    fraction = split["val_fraction"]
    how = {
        "documents": "whole documents chosen by CRC32 of their text",
        "tokens": "the last val_fraction of each chunk's tokens",
    }[split["by"]]
    line = (
        f"dlt-prep: validation split by {split['by']} ({how}), data.val_fraction={fraction:g}: "
        f"{split['reason']}"
    )
    share = held_out_share(manifest)
    if split["by"] == "documents" and share < fraction / 2:
        line += (
            f"; warning: only {share:.3%} of the tokens went to validation: "
            "data.val_split=tokens holds out the requested share"
        )
    return line


def held_out_share(manifest: dict[str, Any]) -> float:
    """The share of data.input's tokens in the validation split (data.val_input excluded)."""
    if manifest["val_split"]["val_input_files"]:
        return 1.0  # not separable from the validation files' tokens here: no warning
    val = manifest["splits"].get("val", {"num_tokens": 0})["num_tokens"]
    return val / max(1, val + manifest["splits"]["train"]["num_tokens"])


# --- running it all on this machine ---------------------------------------------------------


@cache
def _worker_state(cfg_items: tuple) -> tuple[CorpusConfig, Tokenizer]:
    cfg = CorpusConfig(**dict(cfg_items))
    return cfg, get_tokenizer(cfg.tokenizer, cfg.out)


def _run_one(args: tuple[tuple, int, dict, Documents | None]) -> dict[str, Any]:
    cfg_items, index, chunk, docs = args
    cfg, tokenizer = _worker_state(cfg_items)
    return process_chunk(cfg, Chunk(**chunk), index, tokenizer, docs)


def _frozen(cfg: CorpusConfig) -> tuple:
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in asdict(cfg).items())


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


Work = tuple[int, Chunk, Documents | None]  # chunk index, chunk, its documents if already read


class Progress:
    """Counts finished chunks: a progress bar on a terminal, a plain line per chunk in a log
    file (a SLURM log); bytes and tokens of the chunks done here give the rates."""

    def __init__(self, total: int | None) -> None:
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, unit="chunk", disable=not self.tty, dynamic_ncols=True)
        self.total, self.done = total, 0
        self.text_bytes, self.tokens = 0, 0
        self.start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)

    def rate(self) -> str:
        return (
            f"{self.text_bytes / self.elapsed / 2**20:.2f} MB/s, "
            f"{self.tokens / self.elapsed:,.0f} tok/s"
        )

    def add(self, record: dict[str, Any]) -> None:
        self.done += 1
        if not record["skipped"]:
            self.text_bytes += record["input_bytes"] or 0
            self.tokens += sum(e["num_tokens"] for e in record["shards"].values())
        self.bar.set_postfix_str(self.rate(), refresh=False)
        self.bar.update(1)
        if not self.tty:
            state = "skipped (intact)" if record["skipped"] else "done"
            of = f"/{self.total}" if self.total is not None else ""
            print(f"chunk {record['chunk']} {state} [{self.done}{of}] {self.rate()}", flush=True)

    def close(self) -> None:
        self.bar.close()


def run_work(
    cfg: CorpusConfig, work: Iterator[Work], workers: int, progress: Progress
) -> list[dict[str, Any]]:
    """Process chunks in a pool of `workers` processes, at most 2 per worker in flight (a
    stream is read only as fast as its chunks are tokenized)."""
    frozen = _frozen(cfg)
    items = ((frozen, i, chunk.to_dict(), docs) for i, chunk, docs in work)
    records: list[dict[str, Any]] = []
    # fork: workers inherit the loaded tokenizer instead of importing and building it again
    context = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    with context.Pool(workers) if workers > 1 else _InProcess() as pool:
        for record in bounded_imap(pool, _run_one, items, 2 * workers):
            records.append(record)
            progress.add(record)
    return records


def bounded_imap(pool: Any, fn: Any, items: Iterator[Any], window: int) -> Iterator[Any]:
    """pool.imap in order, with at most `window` items submitted and not yet returned."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def rate_line(records: list[dict[str, Any]], workers: int, elapsed: float) -> str:
    """How fast the chunks tokenized here went (chunks found intact are not counted)."""
    done = [r for r in records if not r["skipped"]]
    text_bytes = sum(r["input_bytes"] or 0 for r in done)
    tokens = sum(e["num_tokens"] for r in done for e in r["shards"].values())
    elapsed = max(elapsed, 1e-9)
    return (
        f"dlt-prep: {len(done)} chunks tokenized here ({len(records) - len(done)} found intact) "
        f"on {workers} workers in {elapsed:.1f} s: "
        + (f"{text_bytes / elapsed / 2**20:.2f} MB/s, " if text_bytes else "")
        + f"{tokens / elapsed:,.0f} tok/s"
    )


def run_chunks(cfg: CorpusConfig, indices: list[int], workers: int) -> list[dict[str, Any]]:
    """Process the planned chunks `indices` in a pool of `workers` processes, with a progress
    display."""
    chunks = known_chunks(read_plan(Path(cfg.out)))
    progress = Progress(len(indices))
    records = run_work(cfg, ((i, chunks[i], None) for i in indices), workers, progress)
    progress.close()
    return records


def stream_work(cfg: CorpusConfig, first_index: int, stream: dict[str, Any]) -> Iterator[Work]:
    """The chunks of a streamed input, read here one run of rows at a time; `stream["rows"]`
    is set when the stream has been read to its end."""
    per, index, start = stream["rows_per_chunk"], first_index, 0
    rows = stream_rows(stream["source"], cfg)
    while batch := list(itertools.islice(rows, per)):
        chunk = Chunk(stream["source"], "hf-stream", stream["split"], start, start + len(batch))
        yield index, chunk, row_documents(batch)
        index, start = index + 1, start + len(batch)
    stream["rows"] = start


def run_streams(cfg: CorpusConfig, workers: int) -> list[dict[str, Any]]:
    """Read the streamed inputs not yet read to their end and tokenize their chunks; record
    each one's row count in plan.json when it ends (its chunks are then known)."""
    out = Path(cfg.out)
    saved = read_plan(out)
    by = saved.get("val_split", {}).get("by", "documents")
    index = len(saved["chunks"])
    records = []
    for stream in saved.get("streams", []):
        if stream["rows"] is None:
            progress = Progress(None)
            work = stream_work(cfg, index, stream)
            work = ((i, with_val_by(chunk, by), docs) for i, chunk, docs in work)
            records += run_work(cfg, work, workers, progress)
            progress.close()
            write_plan(out, saved)
        index += -(-stream["rows"] // stream["rows_per_chunk"])
    return records


class _InProcess:
    """A stand-in for a pool with one worker: no subprocess, easier to debug."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def apply_async(self, fn, args):
        return _Done(fn(*args))


@dataclass
class _Done:
    value: Any

    def get(self) -> Any:
        return self.value


def run_local(cfg: CorpusConfig, workers: int = 0) -> dict[str, Any]:
    """Prepare the dataset at `cfg.out` on this machine; returns the manifest."""
    chunks = plan(cfg)
    out = Path(cfg.out)
    tokenizer = prepare_tokenizer(cfg, chunks)
    todo = [i for i in range(len(chunks)) if not chunk_is_done(out, i)]
    streams = unread_streams(out)
    if (todo or streams) and (out / MANIFEST).exists():
        with writing(out / MANIFEST):
            (out / MANIFEST).unlink()  # being repaired: must not look complete meanwhile
    workers = workers or default_workers()
    used = min(workers, max(1, len(todo))) if not streams else workers
    print(
        f"dlt-prep: {len(chunks)} chunks, {len(chunks) - len(todo)} already done, "
        f"{len(todo)} to do with {used} workers"
        + (f", then the streamed {', '.join(streams)}" if streams else ""),
        flush=True,
    )
    start = time.perf_counter()
    records = run_chunks(cfg, todo, used) if todo else []
    records += run_streams(cfg, used)
    elapsed = time.perf_counter() - start
    manifest = finalize(cfg, plan(cfg), tokenizer)
    for line in [*summary_lines(manifest), rate_line(records, used, elapsed)]:
        print(line, flush=True)
    return manifest
