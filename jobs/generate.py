"""`dlt-generate`: sample text from a checkpoint (a run directory or one checkpoint folder)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from data_prep.tokenizers import NAMES
from jobs.cli import compose_config, errors_as_one_line, print_help, to_schema, wants_help
from trainer.config import DEVICES, ConfigError
from trainer.distributed import pick_device
from trainer.generate import generate
from trainer.trained import checkpoint_tokenizer, load_model

USAGE = 'checkpoint=PATH prompt="..." max_new_tokens=N temperature=T top_k=K top_p=P seed=S'


@dataclass
class GenerateConfig:
    """dlt-generate's keys, types only: the values are in `cluster_configs/generate.yaml`."""

    checkpoint: str
    prompt: str
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    num_samples: int
    tokenizer: str | None
    device: str
    use_cache: bool


def check(cfg: GenerateConfig) -> None:
    """Every value in range, before the checkpoint is read; each error names its key."""
    if cfg.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={cfg.max_new_tokens}: must be >= 1")
    if not (math.isfinite(cfg.temperature) and cfg.temperature >= 0):
        raise ConfigError(
            f"temperature={cfg.temperature}: must be a finite number >= 0 (0 = greedy)"
        )
    if cfg.top_k < 0:
        raise ConfigError(f"top_k={cfg.top_k}: must be >= 0 (0 = off)")
    if not 0.0 < cfg.top_p <= 1.0:
        raise ConfigError(f"top_p={cfg.top_p}: must be in (0, 1]")
    if cfg.num_samples < 1:
        raise ConfigError(f"num_samples={cfg.num_samples}: must be >= 1")
    if cfg.device not in DEVICES:
        raise ConfigError(f"device={cfg.device!r}: expected one of {', '.join(DEVICES)}")
    if cfg.tokenizer is not None and cfg.tokenizer not in NAMES:
        raise ConfigError(
            f"tokenizer={cfg.tokenizer!r}: expected one of {', '.join(NAMES)} "
            "(or null: the one the run was trained with)"
        )


def parse(argv: list[str]) -> GenerateConfig:
    composed = compose_config("generate", argv, literal_keys=("prompt",))
    cfg = to_schema(GenerateConfig, composed)
    check(cfg)
    return cfg


def sample_texts(cfg: GenerateConfig) -> list[str]:
    """The generated texts (prompt included), one per sample."""
    device = pick_device(cfg.device)
    model, state = load_model(cfg.checkpoint, device)
    tokenizer = checkpoint_tokenizer(state, cfg.tokenizer)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ConfigError(
            f"tokenizer={tokenizer.name} has {tokenizer.vocab_size} ids but the model only "
            f"{model.cfg.vocab_size}"
        )
    ids = tokenizer.encode(cfg.prompt) or [tokenizer.eot_id]
    prompt = torch.tensor([ids] * cfg.num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    out = generate(
        model,
        prompt,
        cfg.max_new_tokens,
        cfg.temperature,
        cfg.top_k,
        cfg.top_p,
        generator=generator,
        use_cache=cfg.use_cache,
        vocab_limit=tokenizer.vocab_size,
    )
    return [tokenizer.decode(row.tolist()) for row in out]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print_help("dlt-generate", "generate", USAGE)
        return
    with errors_as_one_line("dlt-generate"):
        texts = sample_texts(parse(argv))
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1} ---")
        print(text, flush=True)


if __name__ == "__main__":
    main()
