"""Where documents come from: text / JSONL files (optionally gzipped) and Hugging Face datasets.

A corpus is cut into *chunks*, the unit of parallel work. A file chunk is a byte range of the
(uncompressed) file, so every chunk can be read on its own; a dataset chunk is a range of rows.
Chunk boundaries depend only on the inputs and `chunk_mb`, so chunk i is always the same text
and always becomes shard i.

A text chunk ends at the first document end (separator) after `chunk_mb`. When no document
ends within another `chunk_mb`, the document is longer than a chunk and is *cut*: at the first
line end after `chunk_mb`, else the first whitespace, else the first UTF-8 character boundary.
The chunk then records that it ends inside a document (and the next that it starts inside one),
so the document gets its end-of-text id only where it really ends. JSONL lines are never cut.

`hf:NAME` is streamed (`datasets.load_dataset(..., streaming=True)`): its chunks are runs of a
fixed number of rows, planned as the stream is read. `hf-disk:PATH` (`save_to_disk`) is read
with random access, its chunks planned ahead.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import itertools
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
WHITESPACE = re.compile(rb"\s")
SAMPLE_ROWS = 1000  # rows whose average size sets a dataset's rows per chunk


class DataError(UserError, ValueError):
    """Bad input data: names the file (and byte offset) and what was expected."""


@dataclass(frozen=True)
class Chunk:
    """One unit of work: rows [start, end) of a dataset, or bytes [start, end) of a file."""

    source: str  # a file path, or hf:NAME / hf-disk:PATH
    format: str  # text | jsonl | hf (hf-disk:, random access) | hf-stream (hf:, streamed)
    split: str  # train | val (val: every document goes to validation)
    start: int
    end: int
    starts_inside: bool = False  # begins inside a document that an earlier chunk began
    ends_inside: bool = False  # ends inside a document that the next chunk finishes
    val_by: str = "documents"  # validation held out by: documents | tokens | none | all (val)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Documents:
    """The documents of one chunk, and what was skipped (counted, never silent).

    The first text may continue a document of the previous chunk (`Chunk.starts_inside`);
    when `last_continues`, the last text is the head of a document the next chunk finishes.
    """

    texts: list[str]
    skipped: dict[str, int]
    last_continues: bool = False


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
    if source.startswith("hf:"):
        return "hf-stream"
    if source.startswith("hf-disk:"):
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


@dataclass(frozen=True)
class Bound:
    """One planned byte range of a file, and whether it ends inside a document."""

    start: int
    end: int
    ends_inside: bool


class _Stream:
    """A file's bytes from `offset` on, read forward in blocks as the planner needs them."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.buf, self.offset, self.eof = f, bytearray(), 0, False

    @property
    def end(self) -> int:
        """The stream offset just past what has been read."""
        return self.offset + len(self.buf)

    def read_to(self, position: int) -> None:
        """Read until the bytes before stream offset `position` are here (or the data ends)."""
        while not self.eof and self.end < position:
            self.read_more()

    def read_more(self) -> None:
        block = self.f.read(BLOCK)
        self.eof = not block
        self.buf += block

    def find(self, pattern: bytes, begin: int, stop: int | None = None) -> int:
        """Stream offset of the first `pattern` within [begin, stop), or -1."""
        stop = self.end if stop is None else stop
        i = self.buf.find(pattern, max(0, begin - self.offset), stop - self.offset)
        return -1 if i < 0 else self.offset + i

    def drop_before(self, position: int) -> None:
        del self.buf[: position - self.offset]
        self.offset = position


def next_document_end(s: _Stream, separator: bytes, target: int, limit: int | None) -> int:
    """Stream offset just past the first separator that ends after `target` and begins before
    `limit` (None: anywhere), or -1."""
    begin = target - len(separator) + 1
    if limit is not None:
        s.read_to(limit + len(separator) - 1)
        i = s.find(separator, begin, min(s.end, limit + len(separator) - 1))
        return -1 if i < 0 else i + len(separator)
    while (i := s.find(separator, begin)) < 0 and not s.eof:
        begin = max(begin, s.end - len(separator) + 1)  # a separator may straddle the blocks
        s.read_more()
    return -1 if i < 0 else i + len(separator)


def cut_point(s: _Stream, target: int, limit: int) -> int:
    """Where to cut a document longer than a chunk, at or after `target` (the bytes up to
    `limit` are read): just past the first line end before `limit`, else just past the first
    whitespace, else at the first UTF-8 character boundary."""
    if (i := s.find(b"\n", target, limit)) >= 0:
        return i + 1
    if match := WHITESPACE.search(s.buf, target - s.offset, limit - s.offset):
        return s.offset + match.end()
    s.read_to(target + 4)  # a UTF-8 character is at most 4 bytes
    i = target
    while i < s.end and s.buf[i - s.offset] & 0xC0 == 0x80:  # a continuation byte: not here
        i += 1
    return i


def chunk_bounds(
    f: BinaryIO, separator: bytes, chunk_bytes: int, cut: bool = True
) -> tuple[list[Bound], int, int]:
    """The chunks of a stream, its length and its number of separators.

    Each chunk ends just past the first separator that ends after start + `chunk_bytes`. With
    `cut`, when no separator begins within another `chunk_bytes`, the document is cut there
    (:func:`cut_point`) instead; without, the chunk runs to the next separator however far.
    """
    s = _Stream(f)
    bounds: list[Bound] = []
    separators = 0
    start = 0
    while True:
        target = start + chunk_bytes
        limit = target + chunk_bytes if cut else None
        end = next_document_end(s, separator, target, limit)
        inside = False
        if end < 0 and cut:
            s.read_to(limit + 1)
        if end < 0 and cut and s.end > limit:  # no document ends within the window: cut
            end = cut_point(s, target, limit)
            s.read_to(end + 1)
            # No cut at the very end of the data, nor just past a separator (one that ends
            # exactly at `target` is not "after" it, and cut_point may land there).
            before = s.buf[max(0, end - len(separator) - s.offset) : end - s.offset]
            inside = end < s.end and before != separator
        if end < 0:  # the data ends before the next separator: the rest is the last chunk
            s.read_to(1 << 62)
            end = s.end
        separators += s.buf.count(separator, 0, end - s.offset)
        if end > start:
            bounds.append(Bound(start, end, inside))
        s.drop_before(end)
        start = end
        if s.eof and start >= s.end:
            return bounds, start, separators


def plan_file(path: str, fmt: str, split: str, cfg: CorpusConfig) -> tuple[list[Chunk], int]:
    """The chunks of a text / JSONL file and its (approximate) number of documents."""
    separator = b"\n" if fmt == "jsonl" else SEPARATORS[cfg.doc_separator]
    chunk_bytes = max(1, int(cfg.chunk_mb * 2**20))
    with reading(path), open_binary(path) as f:
        bounds, _, separators = chunk_bounds(f, separator, chunk_bytes, cut=fmt != "jsonl")
    chunks = []
    for i, b in enumerate(bounds):
        inside = i > 0 and bounds[i - 1].ends_inside
        chunks.append(Chunk(path, fmt, split, b.start, b.end, inside, b.ends_inside))
    return chunks, separators + 1


def hub_offline_error(spec: str, err: Exception) -> DataError:
    """The one line for a hub dataset that cannot be reached (offline, unknown name)."""
    name = spec.removeprefix("hf:")
    reason = " ".join(str(err).split())[:200] or type(err).__name__
    return DataError(
        f"data.input: {spec}: cannot stream it from the Hugging Face hub ({reason}); offline? "
        f"On a connected machine run datasets.load_dataset({name!r}, split=...)"
        ".save_to_disk(DIR), copy DIR here and use hf-disk:DIR"
    )


def load_hf_dataset(spec: str, split: str):
    """A `datasets.Dataset` from hf-disk:PATH (save_to_disk), random access."""
    import datasets  # imported lazily: it is slow to import and only this source needs it

    try:
        ds = datasets.load_from_disk(spec.removeprefix("hf-disk:"))
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    except Exception as err:  # missing folder, bad split, ...: one clear line
        message = " ".join(str(err).split()) or type(err).__name__
        raise DataError(f"{spec}: cannot load the dataset ({message})") from None


def stream_rows(spec: str, cfg: CorpusConfig, start: int = 0) -> Iterator[object]:
    """The `data.text_field` values of hf:NAME (a hub name or a local folder / builder), read
    as a stream from row `start` on: nothing is downloaded ahead."""
    import datasets

    name = spec.removeprefix("hf:")
    try:
        ds = datasets.load_dataset(name, split=cfg.hf_split, streaming=True)
        if start:
            ds = ds.skip(start)
        rows = iter(ds)
        first = next(rows, None)
    except Exception as err:
        if os.path.exists(name):
            message = " ".join(str(err).split()) or type(err).__name__
            raise DataError(f"{spec}: cannot load the dataset ({message})") from None
        raise hub_offline_error(spec, err) from None
    if first is None:
        return
    index = start
    try:
        for row in itertools.chain([first], rows):
            if cfg.text_field not in row:
                raise DataError(
                    f"{spec}: no column {cfg.text_field!r} (data.text_field); "
                    f"columns are {', '.join(row)}"
                )
            yield row[cfg.text_field]
            index += 1
    except DataError:
        raise
    except Exception as err:  # e.g. the connection dropped: the chunks written are kept
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise DataError(
            f"{spec}: reading the stream failed after row {index} ({reason}); run dlt-prep "
            "again: the chunks already written are kept"
        ) from None


def rows_per_chunk(texts: list[object], chunk_mb: float) -> int:
    """Rows per chunk: chunk_mb over the average size of the first rows."""
    size = sum(len(str(t or "").encode()) for t in texts) / max(1, len(texts))
    return max(1, int(chunk_mb * 2**20 / max(1.0, size)))


def stream_rows_per_chunk(spec: str, cfg: CorpusConfig) -> int:
    """A streamed dataset's rows per chunk, from its first SAMPLE_ROWS rows."""
    return rows_per_chunk(list(itertools.islice(stream_rows(spec, cfg), SAMPLE_ROWS)), cfg.chunk_mb)


def plan_hf(spec: str, split: str, cfg: CorpusConfig) -> tuple[list[Chunk], int]:
    """The chunks of an hf-disk: dataset (row ranges) and its number of rows."""
    ds = load_hf_dataset(spec, cfg.hf_split)
    if cfg.text_field not in ds.column_names:
        raise DataError(
            f"{spec}: no column {cfg.text_field!r} (data.text_field); "
            f"columns are {', '.join(ds.column_names)}"
        )
    n = len(ds)
    rows = rows_per_chunk(ds.select(range(min(n, SAMPLE_ROWS)))[cfg.text_field], cfg.chunk_mb)
    return [Chunk(spec, "hf", split, s, min(n, s + rows)) for s in range(0, n, rows)], n


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


@dataclass
class Planned:
    """The planned chunks, the documents counted while planning (an estimate: separators,
    lines, rows) and the streamed inputs, whose chunks are planned as they are read."""

    chunks: list[Chunk]
    train_documents: int
    streams: list[dict]


def plan_chunks(inputs: list[tuple[str, str]], cfg: CorpusConfig) -> Planned:
    """Every chunk of the file and hf-disk: inputs, in a fixed order; the streamed ones."""
    planned = Planned([], 0, [])
    for source, split in inputs:
        fmt = input_format(source, cfg.format)
        if fmt == "hf-stream":
            rows = stream_rows_per_chunk(source, cfg)
            planned.streams.append({"source": source, "split": split, "rows_per_chunk": rows})
            continue
        if fmt == "hf":
            chunks, documents = plan_hf(source, split, cfg)
        else:
            chunks, documents = plan_file(source, fmt, split, cfg)
        planned.chunks.extend(chunks)
        if split == "train":
            planned.train_documents += documents
    return planned


def _decode(data: bytes, chunk: Chunk) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{chunk.source}: invalid UTF-8 at byte {chunk.start + err.start} (expected UTF-8 text)"
        ) from None


def split_text(text: str, separator: str, chunk: Chunk | None = None) -> Documents:
    """Documents of a text chunk: whitespace around each trimmed, empty ones dropped. Where
    `chunk` starts or ends inside a document, that side of the piece is kept as it is (the
    text continues across the cut), and a continued piece is kept even when empty: it carries
    its document's end."""
    if separator == "eot":
        parts = text.split(ENDOFTEXT)
    elif separator == "line":
        parts = text.split("\n")
    else:
        parts = re.split(r"\n[ \t\r]*\n", text)
    head_open = chunk is not None and chunk.starts_inside
    tail_open = chunk is not None and chunk.ends_inside
    texts, last, last_continues = [], len(parts) - 1, False
    for i, part in enumerate(parts):
        continued, continues = head_open and i == 0, tail_open and i == last
        piece = part if continued else part.lstrip()
        piece = piece if continues else piece.rstrip()
        if piece or (continued and not continues):
            texts.append(piece)
            last_continues = continues
    return Documents(texts, {}, last_continues)


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
    if chunk.format in ("hf", "hf-stream"):
        return row_documents(chunk_rows(chunk, cfg))
    with reading(chunk.source), open_binary(chunk.source) as f:
        f.seek(chunk.start)
        data = f.read(chunk.end - chunk.start)
    if len(data) != chunk.end - chunk.start:
        raise DataError(f"{chunk.source}: shorter than planned (changed since planning?)")
    if chunk.format == "jsonl":
        _decode(data, chunk)  # reports the offset of bad UTF-8 precisely
        return _jsonl_documents(data, chunk, cfg.text_field)
    return split_text(_decode(data, chunk), cfg.doc_separator, chunk)


def chunk_rows(chunk: Chunk, cfg: CorpusConfig) -> list[object]:
    """The text-field values of a dataset chunk's rows (a stream is read from its start)."""
    if chunk.format == "hf":
        ds = load_hf_dataset(chunk.source, cfg.hf_split)
        return ds.select(range(chunk.start, chunk.end))[cfg.text_field]
    rows = stream_rows(chunk.source, cfg, chunk.start)
    return list(itertools.islice(rows, chunk.end - chunk.start))


def row_documents(rows: list[object]) -> Documents:
    """The documents of dataset rows: the non-empty strings (other values are counted)."""
    texts = [t for t in rows if isinstance(t, str) and t.strip()]
    return Documents(texts, {"missing_field": sum(not isinstance(t, str) for t in rows)})


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
