"""Where documents come from: text / JSONL files (optionally gzipped) and Hugging Face datasets.

A corpus is cut into *chunks*, the unit of parallel work. A file chunk is a byte range of the
(uncompressed) file that starts right after a document separator, so every chunk can be read
on its own; a dataset chunk is a range of rows. Chunk boundaries depend only on the inputs and
`chunk_mb`, so chunk i is always the same text and always becomes shard i.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import json
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib import resources
from typing import BinaryIO

from data_prep.config import CorpusConfig
from data_prep.errors import UserError

ENDOFTEXT = "<|endoftext|>"
SEPARATORS = {"eot": ENDOFTEXT.encode(), "line": b"\n", "blank_line": b"\n\n"}
BLOCK = 1 << 22  # bytes read at a time while scanning for chunk boundaries
GZIP_MAGIC = b"\x1f\x8b"


class DataError(UserError, ValueError):
    """Bad input data: names the file (and byte offset) and what was expected."""


@dataclass(frozen=True)
class Chunk:
    """One unit of work: rows [start, end) of a dataset, or bytes [start, end) of a file."""

    source: str  # a file path, or hf:NAME / hf-disk:PATH
    format: str  # text | jsonl | hf
    split: str  # train | val (val: every document goes to validation)
    start: int
    end: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Documents:
    """The documents of one chunk, and what was skipped (counted, never silent)."""

    texts: list[str]
    skipped: dict[str, int]


def resolve_inputs(patterns: list[str], key: str) -> list[str]:
    """Expand globs and pkg://package/file names; dataset specs (hf:, hf-disk:) pass through."""
    found: list[str] = []
    for pattern in patterns:
        if pattern.startswith(("hf:", "hf-disk:")):
            found.append(pattern)
        elif pattern.startswith("pkg://"):
            found.append(package_file(pattern, key))
        else:
            matches = [
                m for m in sorted(glob.glob(os.path.expanduser(pattern))) if os.path.isfile(m)
            ]
            if not matches:
                raise DataError(f"{key}: no file matches {pattern!r}")
            found.extend(matches)
    return found


def package_file(pattern: str, key: str) -> str:
    """The path of pkg://package/file: a file shipped inside an installed Python package."""
    package, _, name = pattern.removeprefix("pkg://").partition("/")
    try:
        path = resources.files(package) / name
    except (ImportError, TypeError, ValueError):
        raise DataError(
            f"{key}: {pattern}: no installed Python package {package!r} "
            "(expected pkg://PACKAGE/FILE, e.g. pkg://data_prep.corpora/kjv.txt.gz)"
        ) from None
    if not path.is_file():
        raise DataError(f"{key}: {pattern} is not a file shipped with package {package}")
    return str(path)


def input_format(source: str, configured: str) -> str:
    if source.startswith(("hf:", "hf-disk:")):
        return "hf"
    if configured != "auto":
        return configured
    name = source.removesuffix(".gz")
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    return "text"


def open_binary(path: str) -> BinaryIO:
    """The file's uncompressed bytes (.gz is decompressed on the fly; seeking forward works).
    Read it inside `reading(path)` for one-line errors."""
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


@contextlib.contextmanager
def reading(path: str) -> Iterator[None]:
    """Errors while reading input `path` (bad or truncated gzip data, unreadable file) become
    one-line DataErrors naming it."""
    try:
        yield
    except EOFError:
        raise DataError(
            f"{path}: truncated gzip stream (the file ends inside the compressed data; "
            "download or compress it again)"
        ) from None
    except (gzip.BadGzipFile, zlib.error) as err:
        raise DataError(f"{path}: {_gzip_problem(path, err)}") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read it ({err.strerror or err})") from None


def _gzip_problem(path: str, err: Exception) -> str:
    with open(path, "rb") as f:
        if f.read(2) != GZIP_MAGIC:
            return "not a gzip file (a .gz input must be gzip-compressed; rename a plain file)"
    return f"corrupt gzip stream ({err})"


def chunk_starts(f: BinaryIO, separator: bytes, chunk_bytes: int) -> tuple[list[int], int]:
    """Chunk start offsets (0, then just past the first separator at or after each multiple of
    `chunk_bytes` from the previous start) and the total length of the stream."""
    starts = [0]
    target = chunk_bytes
    offset = 0  # stream offset of buf[0]
    buf = b""
    while block := f.read(BLOCK):
        buf += block
        while True:
            i = buf.find(separator, max(0, target - offset))
            if i < 0:
                break
            starts.append(offset + i + len(separator))
            target = starts[-1] + chunk_bytes
        # Keep only what a later search can still need: from `target` on, and enough of the
        # tail to catch a separator split across two blocks.
        cut = max(0, min(len(buf), max(target - offset, len(buf) - len(separator) + 1)))
        buf, offset = buf[cut:], offset + cut
    total = offset + len(buf)
    if starts[-1] >= total and len(starts) > 1:
        starts.pop()  # the data ended exactly on a separator
    return starts, total


def plan_file(path: str, fmt: str, split: str, cfg: CorpusConfig) -> list[Chunk]:
    separator = b"\n" if fmt == "jsonl" else SEPARATORS[cfg.doc_separator]
    with reading(path), open_binary(path) as f:
        starts, total = chunk_starts(f, separator, max(1, int(cfg.chunk_mb * 2**20)))
    ends = [*starts[1:], total]
    return [Chunk(path, fmt, split, s, e) for s, e in zip(starts, ends, strict=True) if e > s]


def load_hf_dataset(spec: str, split: str):
    """A `datasets.Dataset` from hf:NAME (hub or local builder/folder) or hf-disk:PATH."""
    import datasets  # imported lazily: it is slow to import and only this source needs it

    try:
        if spec.startswith("hf-disk:"):
            ds = datasets.load_from_disk(spec.removeprefix("hf-disk:"))
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        return datasets.load_dataset(spec.removeprefix("hf:"), split=split)
    except Exception as err:  # missing folder, offline hub, bad split, ...: one clear line
        message = " ".join(str(err).split()) or type(err).__name__
        raise DataError(f"{spec}: cannot load the dataset ({message})") from None


def plan_hf(spec: str, split: str, cfg: CorpusConfig) -> list[Chunk]:
    ds = load_hf_dataset(spec, cfg.hf_split)
    if cfg.text_field not in ds.column_names:
        raise DataError(
            f"{spec}: no column {cfg.text_field!r} (data.text_field); "
            f"columns are {', '.join(ds.column_names)}"
        )
    n = len(ds)
    sample = ds.select(range(min(n, 1000)))[cfg.text_field]
    avg_bytes = max(1.0, sum(len(str(t or "").encode()) for t in sample) / max(1, len(sample)))
    rows = max(1, int(cfg.chunk_mb * 2**20 / avg_bytes))
    return [Chunk(spec, "hf", split, s, min(n, s + rows)) for s in range(0, n, rows)]


def all_inputs(cfg: CorpusConfig) -> list[tuple[str, str]]:
    """(source, split) of every input: training inputs first, then validation inputs."""
    return [
        (source, split)
        for key, patterns, split in (
            ("data.input", cfg.input, "train"),
            ("data.val_input", cfg.val_input, "val"),
        )
        for source in resolve_inputs(patterns, key)
    ]


def plan_chunks(inputs: list[tuple[str, str]], cfg: CorpusConfig) -> list[Chunk]:
    """Every chunk of the corpus, in a fixed order."""
    chunks: list[Chunk] = []
    for source, split in inputs:
        fmt = input_format(source, cfg.format)
        if fmt == "hf":
            chunks.extend(plan_hf(source, split, cfg))
        else:
            chunks.extend(plan_file(source, fmt, split, cfg))
    return chunks


def _decode(data: bytes, chunk: Chunk) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{chunk.source}: invalid UTF-8 at byte {chunk.start + err.start} (expected UTF-8 text)"
        ) from None


def split_text(text: str, separator: str) -> list[str]:
    """Documents of a text chunk (whitespace around each trimmed, empty ones dropped)."""
    if separator == "eot":
        parts = text.split(ENDOFTEXT)
    elif separator == "line":
        parts = text.split("\n")
    else:
        parts = re.split(r"\n[ \t\r]*\n", text)
    return [p.strip() for p in parts if p.strip()]


def _jsonl_documents(data: bytes, chunk: Chunk, field: str) -> Documents:
    texts: list[str] = []
    skipped = {"missing_field": 0}
    offset = chunk.start
    for raw in data.split(b"\n"):
        line_at, offset = offset, offset + len(raw) + 1
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as err:
            line = line_number(chunk.source, line_at)
            raise DataError(
                f"{chunk.source}:{line}: invalid JSON in the line at byte {line_at} "
                f"({err.msg}, column {err.colno}); expected one JSON object per line"
            ) from None
        value = obj.get(field) if isinstance(obj, dict) else None
        if not isinstance(value, str):
            skipped["missing_field"] += 1  # counted in the manifest, documented
            continue
        if value.strip():
            texts.append(value)
    return Documents(texts, skipped)


def line_number(path: str, offset: int) -> int:
    """The 1-based number of the line that starts at byte `offset` (for error messages)."""
    newlines = 0
    with reading(path), open_binary(path) as f:
        while offset > 0 and (block := f.read(min(BLOCK, offset))):
            newlines += block.count(b"\n")
            offset -= len(block)
    return newlines + 1


def read_chunk(chunk: Chunk, cfg: CorpusConfig) -> Documents:
    """The documents of `chunk`."""
    if chunk.format == "hf":
        ds = load_hf_dataset(chunk.source, cfg.hf_split)
        rows = ds.select(range(chunk.start, chunk.end))[cfg.text_field]
        texts = [t for t in rows if isinstance(t, str) and t.strip()]
        return Documents(texts, {"missing_field": sum(not isinstance(t, str) for t in rows)})
    with reading(chunk.source), open_binary(chunk.source) as f:
        f.seek(chunk.start)
        data = f.read(chunk.end - chunk.start)
    if len(data) != chunk.end - chunk.start:
        raise DataError(f"{chunk.source}: shorter than planned (changed since planning?)")
    if chunk.format == "jsonl":
        _decode(data, chunk)  # reports the offset of bad UTF-8 precisely
        return _jsonl_documents(data, chunk, cfg.text_field)
    return Documents(split_text(_decode(data, chunk), cfg.doc_separator), {})


def iter_documents(chunks: list[Chunk], cfg: CorpusConfig) -> Iterator[str]:
    for chunk in chunks:
        yield from read_chunk(chunk, cfg).texts


def input_signature(sources: list[str]) -> list[dict]:
    """Each input with its size and a hash of its first and last MiB, to notice inputs that
    changed (a `touch` alone does not count as a change)."""
    signature = []
    for source in sources:
        if source.startswith(("hf:", "hf-disk:")):
            signature.append({"path": source})
            continue
        digest = hashlib.sha256()
        with reading(source), open(source, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            digest.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read(1 << 20))
        signature.append({"path": source, "bytes": size, "ends_sha256": digest.hexdigest()})
    return signature
