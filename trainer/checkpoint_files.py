"""The files of a checkpoint: read without executing anything, checksummed while written.

Two promises a checkpoint loader must keep for files it did not write itself:

- **Nothing in it executes.** DCP keeps its index (`.metadata`: which tensor lives where) as a
  pickle, and `FileSystemReader.read_metadata()` reads it with a plain `pickle.load`: a crafted
  file runs any code it likes before a single tensor is read. `SafeFileSystemReader` reads it
  through :class:`MetadataUnpickler`, which admits only the few classes DCP metadata is made of
  (its dataclasses, `torch.Size`, dtypes, paths) and refuses everything else.
- **What is loaded is what was saved.** Every file's CRC-32 is computed by the writing rank
  *while* DCP writes it (`HashingFileSystemWriter` wraps each output stream, large writes are
  checksummed on a second thread beside the copy), so saving reads nothing back;
  `complete.json` records size and CRC-32 of every file, and a checkpoint is checked against
  it before it is loaded.

Why CRC-32 and not sha256: the checksum is there to catch accidental damage — a flipped bit,
a torn or truncated write, a file from another save — which CRC-32 detects (every burst of up
to 32 bits, all but 1 in 4 billion others) at ~7 GB/s a core: a gpt2_small save (1.83 GiB)
took 2.67 s with it and 2.67 s without; sha256 (~1.8 GB/s here) made it 3.10 s. Against someone who can write files, no unsigned checksum helps
(they rewrite `complete.json` too): that is what the restricted unpickler and the weights-only
loads are for.
"""

from __future__ import annotations

import io
import json
import pickle
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from data_prep.errors import UserError
from trainer import distributed

METADATA = ".metadata"
COMPLETE_MARK = "complete.json"
TRAINER_STATE = "trainer_state.json"
FORMAT_VERSION = 1  # of trainer_state.json; a checkpoint of another format is refused
HASH_CHUNK = 8 << 20


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or unsafe."""


class CheckpointRefused(CheckpointError):
    """A checkpoint that is not damaged but must not be loaded here (another format version,
    a pickle naming foreign code, a file that cannot be read now): `resume=auto` refuses it
    instead of skipping it for an older one."""


# (module, name) of every global that DCP metadata (torch 2.6 - 2.13) pickles.
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # maps a layout's name to torch.strided etc.
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib._local", "PosixPath"),  # Python 3.13+
    ("pathlib._local", "PurePosixPath"),
}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata and nothing else: any other global is refused, not imported."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        dtype = torch.__dict__.get(name) if module == "torch" else None  # no lazy imports
        if isinstance(dtype, torch.dtype):
            return dtype
        raise RefusedGlobal(f"it refers to {module}.{name}, which DCP metadata never does")


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle that names a class or function outside DCP metadata: crafted, or written by a
    newer torch whose metadata this reader does not know."""


def read_metadata(path: str | Path) -> Metadata:
    """DCP's index of the checkpoint folder `path`, read without executing anything."""
    file = Path(path) / METADATA
    try:
        with open(file, "rb") as f:
            metadata = MetadataUnpickler(f).load()
    except OSError:
        raise
    except RefusedGlobal as err:
        raise CheckpointRefused(f"{file}: not valid DCP metadata ({err})") from None
    except Exception as err:  # whatever a damaged pickle makes the unpickler raise
        raise CheckpointError(f"{file}: not valid DCP metadata ({err})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{file}: not valid DCP metadata (a {type(metadata).__name__})")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with `.metadata` read by :class:`MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# --- checksums computed while writing ----------------------------------------------------


CHECKSUM = "crc32"  # the key of each file's checksum in complete.json


class Crc32:
    """zlib's CRC-32 with hashlib's interface; zlib releases the GIL on large buffers."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: Any) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


def checksum_file(path: str | Path) -> str:
    digest = Crc32()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# Checksumming a large write on a second thread while this one copies it into the page cache:
# both release the GIL, so the checksum costs little more than the write itself.
PARALLEL_HASH_BYTES = 1 << 20
_HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-checksum")


class _HashingStream(io.RawIOBase):
    """A write-only file that hashes what passes through it (sequential writes only: a seek
    makes the digest unknown, and the file is then hashed from disk afterwards)."""

    def __init__(self, raw: io.BufferedWriter):
        super().__init__()
        self.raw = raw
        self.digest: Any = Crc32()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        if self.digest is None:
            return self.raw.write(b)
        if memoryview(b).nbytes < PARALLEL_HASH_BYTES:
            written = self.raw.write(b)
            self.digest.update(b)
            return written
        # `b` is only valid during this call (DCP may reuse the memory): hash it now, beside
        # the write, and wait for both.
        hashing = _HASHER.submit(self.digest.update, b)
        try:
            return self.raw.write(b)
        finally:
            hashing.result()

    def tell(self) -> int:
        return self.raw.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        self.digest = None
        return self.raw.seek(offset, whence)

    def fileno(self) -> int:
        return self.raw.fileno()

    def flush(self) -> None:
        self.raw.flush()

    def close(self) -> None:
        if not self.closed:
            super().close()  # flushes
            self.raw.close()


class _HashingFileSystem(FileSystem):
    """DCP's local file system, recording the checksum of every file it writes, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.digests: dict[str, str | None] = {}
        self._lock = threading.Lock()  # DCP may write several files from threads

    @contextmanager
    def create_stream(self, path: str | Path, mode: str) -> Iterator[io.IOBase]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with Path(path).open(mode) as raw:
            stream = _HashingStream(raw)
            try:
                yield stream
            finally:
                with self._lock:
                    self.digests[Path(path).name] = (
                        stream.digest.hexdigest() if stream.digest is not None else None
                    )

    def rename(self, path: str | Path, new_path: str | Path) -> None:
        super().rename(path, new_path)  # DCP writes .metadata.tmp, then renames it
        with self._lock:
            self.digests[Path(new_path).name] = self.digests.pop(Path(path).name, None)


class HashingFileSystemWriter(FileSystemWriter):
    """`FileSystemWriter` whose `digests` hold the checksum of every file this rank wrote."""

    def __init__(self, path: str | Path, **kwargs: Any):
        super().__init__(path, **kwargs)
        self.fs = _HashingFileSystem()

    @property
    def digests(self) -> dict[str, str | None]:
        return dict(self.fs.digests)


# --- verification ----------------------------------------------------------------------


def _files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def list_files(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in _files_in(folder)
        if p.name != COMPLETE_MARK
    }


def read_mark(path: Path) -> dict[str, dict[str, Any]]:
    """`complete.json` as {file: {"size": bytes, "crc32": hex}}; checks every size."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    mark = path / COMPLETE_MARK
    if not mark.is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no {COMPLETE_MARK})")
    try:
        listed = json.loads(mark.read_text())["files"]
        # older checkpoints recorded sizes only
        files = {n: e if isinstance(e, dict) else {"size": e} for n, e in listed.items()}
        sizes = {name: int(entry["size"]) for name, entry in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{mark}: unreadable completion mark ({err!r})") from None
    actual = list_files(path)
    for name, size in sizes.items():
        if name not in actual:
            raise CheckpointError(f"{path}: file {name} is missing")
        if actual[name] != size:
            raise CheckpointError(
                f"{path}: file {name} has {actual[name]} bytes, expected {size} (truncated?)"
            )
    return files


def verify(path: str | Path) -> None:
    """Raise :class:`CheckpointError` unless `path` is complete and untruncated (sizes only;
    :func:`check` also compares the content)."""
    read_mark(Path(path))


def is_complete(path: Path) -> bool:
    try:
        verify(path)
    except CheckpointError:
        return False
    return True


def _problem(path: Path, share: tuple[int, int]) -> tuple[str, bool] | None:
    """Why `path` cannot be loaded, checking the checksums of this rank's `share` of its files
    (rank, world), and whether that is a refusal rather than damage; None when it can."""
    rank, world = share
    try:
        files = read_mark(path)
        for name in sorted(files)[rank::world]:
            expected = files[name].get(CHECKSUM)
            if expected is not None and checksum_file(path / name) != expected:
                return (
                    f"{path}: file {name} does not match its {CHECKSUM} checksum (corrupt)",
                    False,
                )
        read_trainer_state(path)
        read_metadata(path)
    except CheckpointRefused as err:
        return str(err), True
    except CheckpointError as err:
        return str(err), False
    except FileNotFoundError as err:
        return f"{path}: {err.filename or err}: missing", False
    except OSError as err:  # EIO, ESTALE, EACCES...: the files may be fine, the reading is not
        return f"{err.filename or path}: {err.strerror or err} (cannot be read now)", True
    return None


# Folders a single process has checked, keyed by every file's identity, size and times: a
# checkpoint that dlt-generate just resolved is not read twice by its load. (Not used with
# several ranks: whether to skip the check would have to be agreed.)
_CHECKED: set[tuple] = set()


def _identity(path: Path) -> tuple:
    stats = [(p.name, p.stat()) for p in _files_in(path)]
    return (path, *((n, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns) for n, s in stats))


def check(path: str | Path) -> str | None:
    """Why checkpoint `path` cannot be loaded (damage: a wrong size or checksum, a missing or
    unparseable file), or None (collective: every rank calls it and hashes its share of the
    files; all ranks get the same answer). Raises :class:`CheckpointRefused` for a checkpoint
    that is not damaged but must not be loaded here."""
    path = Path(path).absolute()
    single = not dist.is_initialized()
    try:
        key = _identity(path) if single else None
    except OSError:
        key = None
    if key is not None and key in _CHECKED:
        return None
    share = (0, 1) if single else (dist.get_rank(), dist.get_world_size())
    problems = [p for p in distributed.all_gather_objects(_problem(path, share)) if p]
    refused = [message for message, is_refusal in problems if is_refusal]
    if refused:
        raise CheckpointRefused(refused[0])
    if problems:
        return problems[0][0]
    if key is not None:
        _CHECKED.add(key)
    return None


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    file = Path(path) / TRAINER_STATE
    try:
        state = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{file}: unreadable ({err})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{file}: not a trainer state (no step)")
    version = state.get("format_version", 1)
    if version != FORMAT_VERSION:
        raise CheckpointRefused(
            f"{file}: format_version {version}, but this trainer reads version "
            f"{FORMAT_VERSION}: use the version of the code that wrote it"
        )
    return state
