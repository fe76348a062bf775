"""The `data` config section, as dlt-prep reads it: :class:`CorpusConfig`.

`data:` is shared by `dlt-prep` (which writes the shards) and the trainer (which reads them).
:class:`CorpusConfig` holds only what dlt-prep reads: the corpus and how to tokenize it. The
keys only the trainer reads are named in :data:`TRAINER_KEYS`; dlt-prep drops exactly those
before it merges the section onto :class:`CorpusConfig`, so a misspelt prep key is still an
error.

The dataclass declares types only: the values (and their comments) live in
`cluster_configs/data/base.yaml`, the base of every data preset, read here with plain
OmegaConf from the package (`data_prep` knows no Hydra, and imports nothing of the trainer).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_prep.errors import UserError

INPUT_FORMATS = ("auto", "text", "jsonl", "hf")
DOC_SEPARATORS = ("eot", "line", "blank_line")
VAL_SPLITS = ("auto", "documents", "tokens")
# The keys that take one path (or glob, or dataset) as well as a list of them.
INPUT_KEYS = ("input", "val_input")
# The keys of the shared `data:` section that only the trainer reads.
TRAINER_KEYS = ("kind", "path", "mix", "verify", "vocab_size", "tokenizer_hash", "dummy_branching")
# Where the values come from: the base preset of the `data` config group.
BASE_PRESET = ("cluster_configs", "data/base.yaml")


class CorpusConfigError(UserError, ValueError):
    """A `data.*` setting dlt-prep cannot take (unknown key, wrong type), in one line."""


@dataclass
class CorpusConfig:
    """What dlt-prep reads: the corpus and how to tokenize it (values: data/base.yaml)."""

    name: str
    tokenizer: str | None  # gpt2 | bpe | bytes | hf
    tokenizer_path: str | None  # tokenizer=hf: a folder holding a tokenizer.json
    eot_token: str | None  # tokenizer=hf: the end-of-text token; null: from the tokenizer
    out: str | None  # where dlt-prep writes the shards
    input: list[str]  # files, globs, hf:NAME, hf-disk:PATH, pkg://module/file (one or a list)
    val_input: list[str]  # a separate validation corpus (one or a list)
    val_fraction: float  # share of data.input held out for validation
    val_split: str  # how val_fraction is held out: auto | documents | tokens
    format: str  # auto (by extension) | text | jsonl | hf
    doc_separator: str  # text: eot (<|endoftext|>) | line | blank_line
    text_field: str  # jsonl / hf: the field that holds a document
    hf_split: str  # hf: which split of the dataset
    chunk_mb: float  # input MB per chunk (= per shard); the unit of parallel work
    bpe_vocab_size: int  # tokenizer=bpe: vocabulary size to train
    bpe_train_mb: float  # tokenizer=bpe: train on at most this much text


def base_section() -> DictConfig:
    """`cluster_configs/data/base.yaml` as written (interpolations unresolved)."""
    package, name = BASE_PRESET
    return OmegaConf.create((resources.files(package) / name).read_text())


def prep_keys(section: DictConfig) -> DictConfig:
    """A `data:` section without the keys only the trainer reads (exactly TRAINER_KEYS), its
    inputs as lists (see :func:`listed_inputs`)."""
    return listed_inputs(
        OmegaConf.masked_copy(section, [k for k in section if k not in TRAINER_KEYS])
    )


def listed_inputs(section: DictConfig) -> DictConfig:
    """`section` with a single `input` / `val_input` value (a path, a glob, hf:NAME) turned
    into a one-item list: `data.input=books.txt` means `data.input=[books.txt]`."""
    for key in INPUT_KEYS:
        value = section.get(key)
        if isinstance(value, str):
            section[key] = [value]
    return section


def corpus_config(**overrides: Any) -> CorpusConfig:
    """A CorpusConfig: the values of data/base.yaml with `overrides` merged in, interpolations
    (`out: data/${.name}`) resolved. An unknown key or a wrong type is a one-line
    CorpusConfigError naming the key."""
    try:
        values = listed_inputs(OmegaConf.merge(prep_keys(base_section()), overrides))
        merged = OmegaConf.merge(OmegaConf.structured(CorpusConfig), values)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or ""
        msg = str(getattr(err, "msg", None) or err).strip().splitlines()[0]
        raise CorpusConfigError(f"data.{key}: {msg}" if key else msg) from None
