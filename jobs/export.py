"""`dlt-export`: a checkpoint as a Hugging Face GPT-2 folder or one plain state-dict file."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from data_prep.tokenizers import get_tokenizer
from jobs.cli import compose_config, errors_as_one_line, print_help, to_schema, wants_help
from trainer.config import ConfigError
from trainer.generate import load_model
from trainer.hf import save_hf

USAGE = "checkpoint=PATH format=hf|torch out=DIR"
FORMATS = ("hf", "torch")


@dataclass
class ExportConfig:
    checkpoint: str
    out: str
    format: str = "hf"


def parse(argv: list[str]) -> ExportConfig:
    composed = compose_config("export", argv)
    cfg = to_schema(ExportConfig, composed)
    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format!r}: expected one of {', '.join(FORMATS)}")
    return cfg


def export(cfg: ExportConfig) -> Path:
    """Write the export; returns the folder (hf) or file (torch) written."""
    model, state = load_model(cfg.checkpoint)
    out = Path(cfg.out)
    if cfg.format == "hf":
        tokenizer_name = state["config"]["data"]["tokenizer"]
        eot_id = get_tokenizer(tokenizer_name, state["checkpoint_dir"]).eot_id
        return save_hf(model, out, eot_id=eot_id)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.pt"
    # Plain tensors only (tied lm_head dropped): torch.load(path, weights_only=True) reads it.
    weights = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    torch.save({"model": weights, "config": state["config"]["model"]}, path)
    return path


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print_help("dlt-export", "export", USAGE)
        return
    with errors_as_one_line("dlt-export"):
        path = export(parse(argv))
    print(f"exported {path}")


if __name__ == "__main__":
    main()
