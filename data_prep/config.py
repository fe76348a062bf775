"""The `data` config section: what a dataset is made of and where its shards live.

Shared by `dlt-prep` (which writes the shards) and the trainer (which reads them): the trainer
imports this schema, `data_prep` never imports the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DATA_KINDS = ("dummy", "shards")
INPUT_FORMATS = ("auto", "text", "jsonl", "hf")
DOC_SEPARATORS = ("eot", "line", "blank_line")


@dataclass
class DataConfig:
    name: str = "dummy"
    kind: str = "dummy"  # dummy: synthetic tokens | shards: a prepared dataset at `path`
    path: str | None = None  # the shard dataset the trainer reads
    tokenizer: str | None = "bytes"  # gpt2 | bpe | bytes; null: whatever the dataset used
    vocab_size: int | None = 257  # ids in the data are below this; null: from the dataset
    tokenizer_hash: str | None = None  # filled from the dataset's manifest by the trainer
    dummy_branching: int = 4  # dummy: each token has this many possible successors

    # --- dlt-prep: how the dataset at `out` is made ---
    out: str | None = None  # where dlt-prep writes the shards (usually the same as `path`)
    input: list[str] = field(default_factory=list)  # files, globs, hf:NAME, pkg://module/file
    val_input: list[str] = field(default_factory=list)  # a separate validation corpus
    val_fraction: float = 0.0  # without val_input: share of documents held out for validation
    format: str = "auto"  # auto (by extension) | text | jsonl | hf
    doc_separator: str = "eot"  # text: eot (<|endoftext|>) | line | blank_line
    text_field: str = "text"  # jsonl / hf: the field that holds a document
    hf_split: str = "train"  # hf: which split of the dataset
    chunk_mb: float = 32.0  # input MB per chunk (= per shard); the unit of parallel work
    bpe_vocab_size: int = 8192  # tokenizer=bpe: vocabulary size to train
    bpe_train_mb: float = 200.0  # tokenizer=bpe: train on at most this much text
