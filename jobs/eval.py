"""`dlt-eval`: score a checkpoint (a run directory or one checkpoint folder) on HellaSwag."""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass

import torch

from jobs.cli import compose_config, errors_as_one_line, print_help, to_schema, wants_help
from trainer.config import DEVICES, PRECISIONS, ConfigError
from trainer.distributed import pick_device
from trainer.evals import hellaswag
from trainer.train import AUTOCAST_DTYPES
from trainer.trained import checkpoint_tokenizer, load_model

USAGE = "checkpoint=PATH eval.hellaswag=FILE.jsonl [eval.hellaswag_examples=N] [device=cpu]"


@dataclass
class EvalSection:
    """The `eval:` keys, named as in dlt-train's config."""

    hellaswag: str
    hellaswag_examples: int | None


@dataclass
class EvalJobConfig:
    """dlt-eval's keys, types only: the values are in `cluster_configs/eval.yaml`."""

    checkpoint: str
    eval: EvalSection
    batch_size: int
    device: str
    precision: str


def check(cfg: EvalJobConfig) -> None:
    """Every value in range and the file readable, before the checkpoint is read."""
    n = cfg.eval.hellaswag_examples
    if n is not None and n < 1:
        raise ConfigError(f"eval.hellaswag_examples={n}: must be a positive number (null: all)")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size}: must be a positive number")
    if cfg.device not in DEVICES:
        raise ConfigError(f"device={cfg.device!r}: expected one of {', '.join(DEVICES)}")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"precision={cfg.precision!r}: expected one of {', '.join(PRECISIONS)}")
    hellaswag.check_file(cfg.eval.hellaswag, cfg.eval.hellaswag_examples)


def parse(argv: list[str]) -> EvalJobConfig:
    cfg = to_schema(EvalJobConfig, compose_config("eval", argv))
    check(cfg)
    return cfg


def score(cfg: EvalJobConfig) -> tuple[hellaswag.Scores, dict]:
    """The checkpoint's HellaSwag scores and its trainer state (step, checkpoint_dir)."""
    device = pick_device(cfg.device)
    model, state = load_model(cfg.checkpoint, device)
    tokenizer = checkpoint_tokenizer(state)
    examples = hellaswag.load_examples(
        cfg.eval.hellaswag, tokenizer, model.cfg.block_size, cfg.eval.hellaswag_examples
    )
    dtype = AUTOCAST_DTYPES.get(cfg.precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    scores = hellaswag.evaluate(
        model, examples, device, autocast=autocast, rows_per_forward=cfg.batch_size
    )
    return scores, state


def result_line(scores: hellaswag.Scores, state: dict, seconds: float) -> str:
    n = scores.total
    return (
        f"hellaswag acc {scores.acc:.4f} ({scores.correct}/{n}) | acc_sum {scores.acc_sum:.4f} "
        f"({scores.correct_sum}/{n}) | {n} examples | {seconds:.1f} s | step {state['step']} "
        f"| {state['checkpoint_dir']}"
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print_help("dlt-eval", "eval", USAGE)
        return
    with errors_as_one_line("dlt-eval"):
        cfg = parse(argv)
        started = time.perf_counter()
        scores, state = score(cfg)
    print(result_line(scores, state, time.perf_counter() - started), flush=True)


if __name__ == "__main__":
    main()
