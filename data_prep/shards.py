"""The shard dataset format: `.npy` token shards plus `manifest.json`, written last.

    <dataset>/
      manifest.json            the dataset's table of contents; no manifest, no dataset
      plan.json                the chunk plan (inputs, settings, byte/row ranges)
      tokenizer.tiktoken       only for tokenizer=bpe: the trained merge ranks
      tokenizer.hf.json        only for tokenizer=hf: its tokenizer.json and end-of-text token
      chunks/00007.json        chunk 7 is done: its shards, token counts and sha256
      train/00007.npy          chunk 7's training tokens (1-D uint16/uint32)
      val/00007.npy            chunk 7's validation tokens, if it has any

Every file is written through `data_prep.files.atomic_output` (a temporary name, fsync,
rename), so a killed job leaves either a complete file or none. See docs/data.md for the
fields.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.errors import UserError
from data_prep.files import atomic_output

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


class DatasetError(UserError, ValueError):
    """A dataset folder that is missing, incomplete, corrupt or of an unknown format."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """An OSError inside the block (disk full, read-only folder, ...) becomes a one-line
    DatasetError naming `path`."""
    try:
        yield
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise DatasetError(
            f"{path}: cannot write it ({reason}); files already complete are kept: "
            "free space or make the folder writable, then run dlt-prep again"
        ) from None


def write_shard(path: Path, tokens: np.ndarray) -> dict[str, Any]:
    """Write a 1-D token array as `.npy` atomically; returns its manifest entry.

    A failed write (e.g. a full disk) leaves no file at `path` and is a DatasetError naming it.
    """
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp, open(tmp, "wb") as f:
            np.save(f, tokens, allow_pickle=False)
    return {
        "num_tokens": int(tokens.size),
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
    }


def shard_is_intact(path: Path, entry: dict[str, Any], check_sha256: bool = True) -> bool:
    """True when the shard file has the recorded size (and sha256)."""
    if not path.is_file() or path.stat().st_size != entry["bytes"]:
        return False
    return not check_sha256 or sha256_file(path) == entry["sha256"]


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a dataset folder, checked for a format this code understands."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DatasetError(
            f"{folder}: not a prepared dataset (no {MANIFEST}; run dlt-prep, or it did not finish)"
        )
    try:
        manifest = json.loads(path.read_text())
        version = manifest["format_version"]
    except (ValueError, KeyError) as err:
        raise DatasetError(f"{path}: unreadable manifest ({err})") from None
    if version > FORMAT_VERSION:
        raise DatasetError(
            f"{path}: format_version {version} is newer than this code reads ({FORMAT_VERSION}); "
            "update distributed-llm-trainer"
        )
    return manifest


def open_shards(folder: str | Path, split: str) -> list[np.ndarray]:
    """Memory maps of a split's shards, in order, checked against the manifest (size, count)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if split not in manifest["splits"]:
        raise DatasetError(f"{folder}: has no {split!r} split")
    arrays = []
    for entry in manifest["splits"][split]["shards"]:
        path = folder / entry["file"]
        if not shard_is_intact(path, entry, check_sha256=False):
            raise DatasetError(f"{path}: missing or not the size the manifest records")
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        if array.ndim != 1 or array.size != entry["num_tokens"]:
            raise DatasetError(
                f"{path}: expected {entry['num_tokens']} tokens, found {array.shape}"
            )
        arrays.append(array)
    return arrays
