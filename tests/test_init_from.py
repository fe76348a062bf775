"""`model.init_from=<Hugging Face folder>`: every unusable folder is one line from dlt-train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from jobs.train import main as train_main
from trainer.config import model_config
from trainer.hf import load_hf, save_hf
from trainer.models.gpt2.hf import hf_config, to_hf_state_dict
from trainer.models.gpt2.model import GPT
from trainer.run_dir import CHECKPOINTS

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "vocab_size": 257}


def hf_folder(path: Path, **shapes: int) -> Path:
    """A Hugging Face GPT-2 folder of a random model; `shapes` change the training shapes."""
    torch.manual_seed(0)
    return save_hf(GPT(model_config(**{**SHAPES, **shapes})), path)


def train_error(folder: Path, tmp_path: Path, capsys) -> str:
    """dlt-train's one error line for `model.init_from=folder` (exit status 2, nothing run)."""
    model = [f"model.{k}={v}" for k, v in SHAPES.items() if k != "vocab_size"]
    argv = ["data=dummy", *model, f"model.init_from={folder}", "train.max_steps=1"]
    with pytest.raises(SystemExit) as exc:
        train_main([*argv, "device=cpu", f"run.dir={tmp_path / 'run'}"])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dlt-train: error: "), lines
    assert not list(tmp_path.glob(f"run/{CHECKPOINTS}/step_*"))  # nothing was trained
    return lines[0]


class WritesMarker:
    """A pickled object that creates a file when unpickled (a stand-in for any code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_refused_in_one_line(tmp_path, capsys):
    folder = hf_folder(tmp_path / "hf")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "code_ran"
    weights = folder / "pytorch_model.bin"
    torch.save({"transformer.wte.weight": torch.zeros(1), "x": WritesMarker(marker)}, weights)
    torch.load(weights, weights_only=False)  # the payload is real: it does run when allowed
    assert marker.exists()
    marker.unlink()
    line = train_error(folder, tmp_path, capsys)
    assert not marker.exists()
    assert f"{weights}: refused to load, not a plain weights file" in line
    assert line.endswith("(it references io.open)")  # what it would have called


@pytest.mark.parametrize(
    ("shapes", "named"),
    [
        ({"n_layer": 3}, ["model.n_layer=2 vs n_layer=3"]),
        ({"n_head": 4}, ["model.n_head=2 vs n_head=4"]),
        ({"n_embd": 64, "n_head": 4}, ["model.n_embd=32 vs n_embd=64", "n_head"]),
        ({"block_size": 64}, ["model.block_size=32 vs n_positions=64"]),
        ({"vocab_size": 300}, ["model.vocab_size=257 vs vocab_size=300"]),
    ],
)
def test_other_shapes_in_config_json_are_named(tmp_path, capsys, shapes, named):
    folder = hf_folder(tmp_path / "hf", **shapes)
    line = train_error(folder, tmp_path, capsys)
    assert f"model.init_from={folder}: its config.json does not match" in line
    for text in named:
        assert text in line


def test_missing_folder(tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    assert f"{missing}: no such Hugging Face model folder" in train_error(missing, tmp_path, capsys)


def test_folder_without_config_json(tmp_path, capsys):
    folder = hf_folder(tmp_path / "hf")
    (folder / "config.json").unlink()
    assert f"{folder / 'config.json'}: not found" in train_error(folder, tmp_path, capsys)


def test_folder_without_weights(tmp_path, capsys):
    folder = hf_folder(tmp_path / "hf")
    (folder / "model.safetensors").unlink()
    line = train_error(folder, tmp_path, capsys)
    assert f"{folder}: expected model.safetensors or pytorch_model.bin" in line


def test_weight_shapes_that_differ_from_config_json(tmp_path, capsys):
    folder = hf_folder(tmp_path / "hf", n_embd=48)  # weights 48 wide ...
    (folder / "config.json").write_text(json.dumps(hf_config(model_config(**SHAPES))))  # ... "32"
    line = train_error(folder, tmp_path, capsys)
    assert f"{folder / 'model.safetensors'}: tensor shapes differ from the model's" in line
    assert "transformer.wte.weight" not in line and "tok_emb.weight (257, 48)" in line


def test_weights_with_other_layer_count_or_missing_tensor(tmp_path, capsys):
    folder = hf_folder(tmp_path / "hf", n_layer=3)
    (folder / "config.json").write_text(json.dumps(hf_config(model_config(**SHAPES))))
    weights = folder / "model.safetensors"
    line = train_error(folder, tmp_path, capsys)
    assert f"{weights}: holds 3 layers, the model has model.n_layer=2" in line
    state = {k: v for k, v in load_file(weights).items() if not k.startswith("transformer.h.2.")}
    del state["transformer.h.1.mlp.c_fc.bias"]
    save_file(state, weights)
    line = train_error(folder, tmp_path, capsys)
    assert f"{weights}: tensor h.1.mlp.c_fc.bias is missing" in line


def test_corrupt_safetensors(tmp_path, capsys):
    folder = hf_folder(tmp_path / "hf")
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    line = train_error(folder, tmp_path, capsys)
    assert f"{folder / 'model.safetensors'}: not a valid safetensors file" in line


def test_weights_only_bin_still_loads(tmp_path):
    torch.manual_seed(1)
    source = GPT(model_config(**SHAPES))
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config(source.cfg)))
    torch.save(to_hf_state_dict(source.state_dict(), source.cfg), folder / "pytorch_model.bin")
    loaded = load_hf(folder, model_config(**SHAPES))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
