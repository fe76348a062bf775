"""`dlt-prep`: tokenize a corpus into shards: `cluster=local`, a process pool on this machine;
`cluster=<profile>`, SLURM jobs plan -> array of chunk tasks -> finalize (`jobs/submit.py`)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from data_prep import prep
from data_prep.config import CorpusConfig, prep_keys
from jobs.cli import compose_config, errors_as_one_line, print_help, to_schema, wants_help
from jobs.profile import ClusterProfile, check_profile
from jobs.submit import submit_prep
from trainer.config import ConfigError

USAGE = (
    "data=<preset> [data.input=PATH ...] [tokenizer=gpt2|bpe|bytes|hf] "
    "[data.tokenizer_path=DIR] [data.out=DIR] "
    "[cluster=local|<profile>] [dry_run=true]"
)
PHASES = ("all", "plan", "chunks", "finalize")


@dataclass
class PrepConfig:
    """dlt-prep's keys but `cluster` and `dry_run`, types only: the values are in
    `cluster_configs/prep.yaml` and the `data=` preset it picks."""

    data: CorpusConfig
    tokenizer: str | None
    workers: int
    phase: str
    chunks: str | None


def parse(argv: list[str]) -> tuple[PrepConfig, ClusterProfile, bool]:
    """The prep config, the cluster profile and whether this is a dry run."""
    composed = compose_config("prep", argv)
    profile = to_schema(ClusterProfile, composed, "cluster")
    dry_run = bool(composed.get("dry_run", False))
    check_profile(profile, dry_run)
    keep = [k for k in composed if k not in ("cluster", "dry_run")]
    selected = OmegaConf.masked_copy(composed, keep)
    selected.data = prep_keys(selected.data)  # the trainer's keys of the shared section
    cfg = to_schema(PrepConfig, selected)
    if cfg.phase not in PHASES:
        raise ConfigError(f"phase={cfg.phase!r}: expected one of {', '.join(PHASES)}")
    if cfg.workers < 0:
        raise ConfigError(f"workers={cfg.workers}: must be >= 0 (0 = all cores)")
    if cfg.tokenizer:
        cfg.data.tokenizer = cfg.tokenizer
    return cfg, profile, dry_run


def chunk_range(spec: str | None, n: int) -> list[int]:
    """`chunks=START:END` (indices) or `chunks=I/N` (part I of N, as one array task takes)."""
    if spec is None:
        return list(range(n))
    try:
        if "/" in spec:
            part, _, parts = spec.partition("/")
            i, k = int(part), int(parts)
            if not 0 <= i < k:
                raise ValueError
            return list(range(i * n // k, (i + 1) * n // k))
        start, _, end = spec.partition(":")
        indices = range(int(start or 0), min(n, int(end or n)))
    except ValueError:
        raise ConfigError(
            f"chunks={spec!r}: expected START:END chunk indices or I/N (part I of N)"
        ) from None
    return list(indices)


def run(cfg: PrepConfig) -> None:
    data = cfg.data
    if cfg.phase == "all":
        manifest = prep.run_local(data, cfg.workers)
        train = manifest["splits"]["train"]
        print(
            f"dlt-prep: wrote {Path(data.out) / 'manifest.json'}: {train['num_tokens']:,} "
            f"training tokens in {len(train['shards'])} shards, tokenizer "
            f"{manifest['tokenizer']['name']} ({manifest['tokenizer']['vocab_size']} ids)"
        )
        return
    chunks = prep.plan(data)
    if streamed := prep.unread_streams(Path(data.out)):
        raise prep.DataError(
            f"data.input: {', '.join(streamed)} is streamed, so its chunks are planned as it is "
            f"read, by one run: use phase=all (one job), or save_to_disk and use hf-disk:DIR"
        )
    if cfg.phase == "plan":
        prep.prepare_tokenizer(data, chunks)
        print(f"dlt-prep: planned {len(chunks)} chunks in {data.out}")
    elif cfg.phase == "chunks":
        prep.prepare_tokenizer(data, chunks)
        prep.run_chunks(
            data, chunk_range(cfg.chunks, len(chunks)), cfg.workers or prep.default_workers()
        )
    else:
        manifest = prep.finalize(data, chunks, prep.prepare_tokenizer(data, chunks))
        print(f"dlt-prep: wrote {Path(data.out) / 'manifest.json'}")
        for line in prep.summary_lines(manifest):
            print(line)
        print("dlt-prep: the chunks were tokenized by the array tasks (their logs show MB/s)")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print_help("dlt-prep", "prep", USAGE)
        return
    with errors_as_one_line("dlt-prep"):
        cfg, profile, dry_run = parse(argv)
        if profile.is_local:
            run(cfg)
        else:
            submit_prep(profile, argv, dry_run)


if __name__ == "__main__":
    main()
