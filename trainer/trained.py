"""A trained model read back from a checkpoint: for generation, export and evaluation.

`path` may be a run directory (its newest complete checkpoint) or one checkpoint folder; the
checkpoint is checked against its checksums before anything is loaded (`trainer.checkpoint`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from data_prep.tokenizers import TOKENIZER_FILES, Tokenizer, get_tokenizer
from trainer import checkpoint, resume
from trainer.config import model_config
from trainer.models import build_on_meta, spec_of
from trainer.models.init import materialize


def load_model(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, dict]:
    """The model of a checkpoint (a run directory's newest, or one folder) and its trainer
    state, with `checkpoint_dir` added (where files such as a trained tokenizer are)."""
    folder = resume.resolve(path)
    state = {**checkpoint.read_trainer_state(folder), "checkpoint_dir": str(folder)}
    # The saved model section on today's defaults (a key added since is filled in). The
    # attention kernel is not part of the weights: the one this machine and precision can run.
    cfg = model_config(state["config"]["model"], dropout=0.0, attention="auto")
    model = build_on_meta(cfg)  # no initialisation: the checkpoint fills every parameter
    materialize(model, torch.device("cpu"), None, spec_of(cfg).tied(cfg))
    checkpoint.load(folder, model)
    return model.to(device).eval(), state


def checkpoint_tokenizer(state: dict, name: str | None = None) -> Tokenizer:
    """Tokenizer `name` for a checkpoint (default: the run's own, `data.tokenizer`); a trained
    BPE or a Hugging Face tokenizer (tokenizer=hf) is read from the checkpoint folder, where
    training copied it (`state` as returned by `load_model`)."""
    trained = state["config"]["data"]["tokenizer"]
    name = name or trained
    folder = Path(state["checkpoint_dir"])
    file = TOKENIZER_FILES.get(name)
    if file and not (folder / file).is_file():
        if trained == name:
            instead = f"the run was trained with it: copy the dataset's {file} into it"
        else:
            instead = f"use tokenizer={trained}, the one the run was trained with"
        what = "trained BPE tokenizer" if name == "bpe" else "Hugging Face tokenizer"
        raise checkpoint.CheckpointError(
            f"tokenizer={name}: checkpoint {folder} carries no {what} ({file}); {instead}"
        )
    return get_tokenizer(name, folder)
