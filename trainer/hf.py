"""Hugging Face `transformers` folders: read (`model.init_from`) and write (`dlt-export`).

A folder holds `config.json` and `model.safetensors` (or a weights-only `pytorch_model.bin`).
Its `model_type` picks the architecture; the conversion of names and layouts is the
architecture's (`trainer/models/<arch>/hf.py`, through its spec). Weights are read with
safetensors or `torch.load(weights_only=True)`: a file that carries code is refused.

A padded vocabulary (`model.pad_vocab_to_multiple`) is ours only: an exported model has the
tokenizer's `model.vocab_size` rows (the padded ones dropped), and an imported one gets its
padded rows added (zeros: they are never looked up, and the loss and logits ignore them).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from trainer.config import ConfigError, ModelConfig, model_config
from trainer.models import build_on_meta, spec_for_hf, spec_of
from trainer.models.init import Values, materialize

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_hf_config(folder: Path) -> dict:
    """The `config.json` of a Hugging Face folder, checked to describe a model we can build."""
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such Hugging Face model folder")
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found (a Hugging Face model folder has a config.json)")
    try:
        hf_cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(hf_cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    fmt = spec_for_hf(hf_cfg.get("model_type", "gpt2"), str(path)).hf
    missing = [k for k in fmt.shape_keys.values() if not isinstance(hf_cfg.get(k), int)]
    if missing:
        raise ConfigError(f"{path}: expected integer {', '.join(missing)}")
    if reason := fmt.unsupported(hf_cfg):
        raise ConfigError(f"{path}: {reason}")
    return hf_cfg


def model_config_from_hf(hf_cfg: dict) -> ModelConfig:
    """Our ModelConfig with the architecture and shapes of a (checked) `config.json`."""
    return model_config(
        spec_for_hf(hf_cfg.get("model_type", "gpt2"), "config.json").hf.model_keys(hf_cfg)
    )


def check_same_shapes(hf_cfg: dict, cfg: ModelConfig, folder: Path) -> None:
    """A one-line error naming every shape key where `config.json` and `cfg` differ."""
    fmt = spec_for_hf(hf_cfg.get("model_type", "gpt2"), str(folder / "config.json")).hf
    if fmt.model_type != spec_of(cfg).hf.model_type:
        raise ConfigError(
            f"model.init_from={folder}: a {fmt.model_type} model, but model.arch={cfg.arch}"
        )
    differ = [
        f"model.{ours}={getattr(cfg, ours)} vs {theirs}={hf_cfg[theirs]}"
        for ours, theirs in fmt.shape_keys.items()
        if getattr(cfg, ours) != hf_cfg[theirs]
    ]
    theirs = fmt.model_keys(hf_cfg)
    for key in fmt.behaviour_keys:  # same shapes, but another function (tying, RoPE, eps)
        ours = getattr(cfg, key)
        ours = dataclasses.asdict(ours) if dataclasses.is_dataclass(ours) else ours
        if not _same(ours, theirs[key]):
            differ.append(f"model.{key}={ours} vs {theirs[key]} in config.json")
    if differ:
        raise ConfigError(
            f"model.init_from={folder}: its config.json does not match the model config: "
            + ", ".join(differ)
        )


def _same(a: Any, b: Any) -> bool:
    """Equal, floats within a relative 1e-9 (JSON round trips); mappings key by key."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.get("factor") is None and b.get("factor") is None:  # scaling off: the rest unused
            return True
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9)
    return a == b


def save_hf(model: nn.Module, out_dir: str | Path, eot_id: int | None = 50256) -> Path:
    """Write `config.json` + `model.safetensors` that `AutoModelForCausalLM.from_pretrained`
    loads (a tied output weight is left out: transformers ties it again on load)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = spec_of(model.cfg)
    state = spec.hf.to_hf(
        vocab_rows(model.state_dict(), model.cfg, model.cfg.vocab_size), model.cfg
    )
    hf_cfg = spec.hf.hf_config(model.cfg, eot_id)
    state = first_of_each_tensor(state)
    save_file(
        {k: v.float().cpu() for k, v in state.items()},
        out / "model.safetensors",
        metadata={"format": "pt"},
    )
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    return out


def vocab_rows(
    state: dict[str, torch.Tensor], cfg: ModelConfig, rows: int
) -> dict[str, torch.Tensor]:
    """`state` with the token embedding and output weight cut to (or zero-padded up to)
    `rows` rows: `cfg.vocab_size` for export, `cfg.padded_vocab_size` for import. A tied pair
    stays one tensor (slices of one tensor share its storage)."""
    spec = spec_of(cfg)
    out = dict(state)
    for name in (f"{spec.embedding}.weight", f"{spec.output}.weight"):
        if name not in out or out[name].size(0) == rows:
            continue
        weight = out[name]
        if weight.size(0) > rows:
            out[name] = weight[:rows]
        else:
            extra = weight.new_zeros(rows - weight.size(0), *weight.shape[1:])
            out[name] = torch.cat([weight, extra])
    return out


def first_of_each_tensor(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` without the later names of a tensor stored under several (a tied output
    weight): safetensors stores each tensor once, and transformers ties it again on load."""
    seen: set[int] = set()
    kept = {}
    for name, tensor in state.items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            kept[name] = tensor
    return kept


def weights_file(folder: str | Path) -> Path:
    """The weights file of a Hugging Face folder (safetensors preferred)."""
    for name in WEIGHT_FILES:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise ConfigError(f"{folder}: expected {' or '.join(WEIGHT_FILES)} of a model")


def _weights_only_reason(err: Exception) -> str:
    """What `torch.load(weights_only=True)` refused, from its long multi-line message."""
    text = str(err)
    if found := re.search(r"GLOBAL ([\w.]*\w)", text):
        return f"it references {found.group(1)}"
    if found := re.search(r"Unsupported operand \d+", text):
        return f"pickle: {found.group(0)}"
    return "torch.load(weights_only=True) rejected it"


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one weights file; a corrupt or code-carrying file is a ConfigError."""
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except SafetensorError as err:
        raise ConfigError(f"{path}: not a valid safetensors file ({err})") from None
    except pickle.UnpicklingError as err:
        reason = _weights_only_reason(err)
        raise ConfigError(f"{path}: refused to load, not a plain weights file ({reason})") from None
    except (RuntimeError, EOFError) as err:
        raise ConfigError(f"{path}: not a readable PyTorch weights file ({err})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path}: expected a flat dict of tensor names to tensors")
    return state


def load_hf_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local Hugging Face folder (safetensors, or a weights-only .bin)."""
    return read_weights(weights_file(folder))


def layer_count(hf: dict[str, torch.Tensor], pattern: str) -> int:
    """How many transformer blocks (keys matching `pattern`) a Hugging Face state dict holds."""
    prefix = re.compile(pattern)
    found = {int(m.group(1)) for k in hf if (m := prefix.match(k))}
    return max(found, default=-1) + 1


def convert_checked(
    hf: dict[str, torch.Tensor], model: nn.Module, path: Path
) -> dict[str, torch.Tensor]:
    """`hf` as our state dict, after checking it has exactly `model`'s tensors and shapes."""
    fmt = spec_of(model.cfg).hf
    layers = layer_count(hf, fmt.layer_pattern) if fmt.layer_pattern else model.cfg.n_layer
    if layers != model.cfg.n_layer:
        raise ConfigError(
            f"{path}: holds {layers} layers, the model has model.n_layer={model.cfg.n_layer}"
        )
    try:
        state = fmt.from_hf(hf, model.cfg)
    except KeyError as err:
        raise ConfigError(f"{path}: tensor {err.args[0]} is missing") from None
    if state[f"{spec_of(model.cfg).embedding}.weight"].size(0) == model.cfg.vocab_size:
        state = vocab_rows(state, model.cfg, model.cfg.padded_vocab_size)
    expected = model.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} (model: {tuple(expected[k].shape)})"
        for k, v in state.items()
        if v.shape != expected[k].shape
    ]
    if wrong:
        raise ConfigError(f"{path}: tensor shapes differ from the model's: {', '.join(wrong[:3])}")
    return state


def check_hf_folder(folder: str | Path, cfg: ModelConfig) -> None:
    """What `load_hf(folder, cfg)` checks without reading the weights (cheap, for before a
    run starts): a `config.json` of `cfg`'s architecture and shapes, a weights file beside it."""
    check_same_shapes(read_hf_config(Path(folder)), cfg, Path(folder))
    weights_file(folder)


def hf_values(folder: str | Path, cfg: ModelConfig, model: nn.Module) -> Values:
    """The weights of a local Hugging Face folder as initial `values` for `model` (built
    from `cfg`, e.g. on the meta device: only its names and shapes are read), after checking
    the folder's config and tensors against it. The file is read once, whole, on the CPU;
    each rank then copies its part of each tensor (trainer/models/init.py)."""
    folder = Path(folder)
    check_same_shapes(read_hf_config(folder), cfg, folder)
    path = weights_file(folder)
    state = convert_checked(read_weights(path), model, path)
    if missing := sorted(set(model.state_dict()) - set(state)):
        raise ConfigError(f"{path}: no tensor for {', '.join(missing[:3])} of the model")
    return lambda name, shape: state[name]


def load_hf(folder: str | Path, cfg: ModelConfig | None = None) -> nn.Module:
    """A model built from a local Hugging Face folder (e.g. a downloaded `gpt2`, or a Llama),
    on the CPU.

    With `cfg`, the folder's `config.json` must have the same architecture and shapes;
    without, the model takes them from it. The model is built on the meta device and its
    storage filled from the file: no random initialisation first.
    """
    if cfg is None:
        cfg = model_config_from_hf(read_hf_config(Path(folder)))
    model = build_on_meta(cfg)
    values = hf_values(folder, cfg, model)
    materialize(model, torch.device("cpu"), values, spec_of(cfg).tied(cfg))
    return model
