"""`dlt-export`: a checkpoint as a Hugging Face model folder or one plain state-dict file."""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from data_prep.files import fsync_file, fsync_folder
from data_prep.tokenizers import save_tokenizer
from jobs.cli import compose_config, errors_as_one_line, print_help, to_schema, wants_help
from trainer.config import ConfigError
from trainer.hf import save_hf
from trainer.models import spec_of
from trainer.trained import checkpoint_tokenizer, load_model

USAGE = "checkpoint=PATH format=hf|torch out=DIR [overwrite=true]"
FORMATS = ("hf", "torch")
TORCH_FILE = "model.pt"


@dataclass
class ExportConfig:
    """dlt-export's keys, types only: the values are in `cluster_configs/export.yaml`."""

    checkpoint: str
    out: str
    format: str
    overwrite: bool  # replace the export files in a non-empty `out` folder


def parse(argv: list[str]) -> ExportConfig:
    composed = compose_config("export", argv)
    cfg = to_schema(ExportConfig, composed)
    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format!r}: expected one of {', '.join(FORMATS)}")
    return cfg


def check_target(out: Path, overwrite: bool) -> None:
    """`out` must be a new or empty folder, or any folder with `overwrite=true`."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out}: is an existing file, expected a folder to export into")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"out={out}: folder is not empty; use overwrite=true to replace the export in it"
        )


def write_export(model: torch.nn.Module, state: dict, fmt: str, folder: Path) -> None:
    """Write the export files of `model` (trainer `state` from its checkpoint) into `folder`."""
    if fmt == "hf":
        save_hf(model, folder, eot_id=checkpoint_tokenizer(state).eot_id)
        save_tokenizer(checkpoint_tokenizer(state), folder, model.cfg.block_size)
        return
    # Plain tensors only (a tied output weight once): torch.load(weights_only=True) reads it.
    again = {output for _, output in spec_of(model.cfg).tied(model.cfg)}
    weights = {k: v for k, v in model.state_dict().items() if k not in again}
    torch.save({"model": weights, "config": state["config"]["model"]}, folder / TORCH_FILE)


def publish(staging: Path, out: Path) -> None:
    """Move the finished files of `staging` into `out`, each with one atomic rename.

    A new or empty `out` is replaced by `staging` as a whole; into a non-empty one
    (`overwrite=true`) every file is renamed over its old version, other files are kept.
    The files are on disk (fsync) before they are renamed, the renames after.
    """
    for path in staging.iterdir():
        fsync_file(path)
    fsync_folder(staging)
    if not out.is_dir() or not any(out.iterdir()):
        os.replace(staging, out)
        fsync_folder(out.parent)
        return
    for path in sorted(staging.iterdir()):
        os.replace(path, out / path.name)
    fsync_folder(out)
    staging.rmdir()


def export(cfg: ExportConfig) -> Path:
    """Write the export; returns the folder (hf) or file (torch) written.

    The files are written into a temporary folder next to `out` and renamed into place only
    when complete: a crash never leaves a half-written export behind.
    """
    out = Path(cfg.out)
    check_target(out, cfg.overwrite)
    model, state = load_model(cfg.checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name[:64]}.{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir()
    try:
        write_export(model, state, cfg.format, staging)
        publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / TORCH_FILE if cfg.format == "torch" else out


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
