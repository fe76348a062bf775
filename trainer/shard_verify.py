"""Every shard's sha256 checked against the manifest before its tokens reach the model.

A byte flipped on disk (a bad sector, a copy cut short and padded, a file edited by mistake)
still makes valid-looking token ids, so sizes and id ranges do not catch it: only the hash
recorded at prep time does. Hashing a 100 GB dataset takes a minute or more, so it must not
delay the first step:

- a background thread hashes the shards one after another from the first read on;
- a read of a shard that is not verified yet verifies it first, in the reading thread (the
  loader's prefetch thread), so the first batches wait only for the shards they touch;
- the first mismatch found, by either, fails every later read: the run stops at its next
  batch with a one-line error naming the file, before an optimizer step or a checkpoint is
  made from corrupted data.

hashlib releases the GIL while it hashes large blocks, so the training thread keeps running.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from pathlib import Path

from data_prep.shards import DatasetError

BLOCK = 8 << 20  # bytes per read while hashing


class ShardVerifier:
    """The sha256 of `files[i]` against `sha256[i]`, each at most once per process."""

    def __init__(self, files: Sequence[Path], sha256: Sequence[str], background: bool = True):
        self.files = list(files)
        self.expected = list(sha256)
        self._changed = threading.Condition()  # guards the three lists below
        self._hashing = [False] * len(self.files)
        self._verified = [False] * len(self.files)
        self.failure: str | None = None  # the first mismatch found
        self.bytes_hashed = 0
        self._stop = threading.Event()
        self._background = background and bool(self.files)
        self._thread: threading.Thread | None = None  # started by the first read

    @property
    def all_verified(self) -> bool:
        return all(self._verified) and self.failure is None

    def require(self, shard: int) -> None:
        """Return once shard `shard` is verified; raise :class:`DatasetError` if it, or any
        shard checked so far, does not match the manifest."""
        self._start_background()
        while not self._verified[shard] and self.failure is None:
            if self._claim(shard):
                self._verify(shard, stoppable=False)
            else:
                with self._changed:  # the background thread is hashing it now
                    self._changed.wait_for(lambda: not self._hashing[shard])
        if self.failure is not None:
            raise DatasetError(self.failure)

    def close(self) -> None:
        """Stop the background thread (at its next block) and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _start_background(self) -> None:
        """The background pass starts with the first read (a run that fails before it reads
        leaves no thread behind)."""
        with self._changed:
            if not self._background or self._thread is not None or self._stop.is_set():
                return
            self._thread = threading.Thread(target=self._verify_all, daemon=True, name="verify")
            self._thread.start()

    def _claim(self, shard: int) -> bool:
        with self._changed:
            if self._hashing[shard] or self._verified[shard]:
                return False
            self._hashing[shard] = True
            return True

    def _verify_all(self) -> None:
        for shard in range(len(self.files)):
            if self._stop.is_set() or self.failure is not None:
                return
            if self._claim(shard):
                self._verify(shard, stoppable=True)

    def _verify(self, shard: int, stoppable: bool) -> None:
        path, verified = self.files[shard], False
        try:
            digest = self._hash(path, stoppable)
            verified = digest is not None  # None: stopped, the shard stays unverified
            if verified and digest != self.expected[shard]:
                self.failure = (
                    f"{path}: sha256 {digest[:16]}... does not match the manifest's "
                    f"{self.expected[shard][:16]}...: the shard changed since dlt-prep wrote it "
                    "(stopped before training on it); run dlt-prep again to rebuild it"
                )
        except OSError as err:
            self.failure = f"{path}: cannot be read to verify it ({err.strerror or err})"
        finally:
            with self._changed:
                self._hashing[shard] = False
                self._verified[shard] = verified
                self._changed.notify_all()

    def _hash(self, path: Path, stoppable: bool) -> str | None:
        """The file's sha256, or None if stopped meanwhile."""
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(BLOCK):
                if stoppable and self._stop.is_set():
                    return None
                digest.update(block)
                self.bytes_hashed += len(block)
        return digest.hexdigest()
