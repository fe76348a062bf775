"""Weight conversion between this GPT and Hugging Face `transformers`' GPT-2.

Hugging Face stores GPT-2's linear layers as `Conv1D`, whose weight is the transpose of an
`nn.Linear` weight, and fuses query/key/value into one `c_attn`. Import splits and transposes;
export fuses and transposes back. No `transformers` import is needed for either direction.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trainer.config import ConfigError, ModelConfig, model_config
from trainer.model import GPT

_LINEARS = {  # ours (inside blocks.<i>.) -> Hugging Face (inside transformer.h.<i>.)
    "attn.o_proj": "attn.c_proj",
    "mlp.fc": "mlp.c_fc",
    "mlp.proj": "mlp.c_proj",
}
_NORMS = {"ln_1": "ln_1", "ln_2": "ln_2"}


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> `GPT2LMHeadModel` state dict (contiguous tensors, lm_head tied)."""
    out = {
        "transformer.wte.weight": state["tok_emb.weight"],
        "transformer.wpe.weight": state["pos_emb.weight"],
        "transformer.ln_f.weight": state["ln_f.weight"],
        "transformer.ln_f.bias": state["ln_f.bias"],
        "lm_head.weight": state["tok_emb.weight"],
    }
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        qkv = ("q_proj", "k_proj", "v_proj")
        out[theirs + "attn.c_attn.weight"] = torch.cat(
            [state[f"{ours}attn.{n}.weight"] for n in qkv], dim=0
        ).t()
        out[theirs + "attn.c_attn.bias"] = torch.cat([state[f"{ours}attn.{n}.bias"] for n in qkv])
        for src, dst in _LINEARS.items():
            out[f"{theirs}{dst}.weight"] = state[f"{ours}{src}.weight"].t()
            out[f"{theirs}{dst}.bias"] = state[f"{ours}{src}.bias"]
        for src, dst in _NORMS.items():
            for p in ("weight", "bias"):
                out[f"{theirs}{dst}.{p}"] = state[f"{ours}{src}.{p}"]
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """`GPT2LMHeadModel` (or `GPT2Model`) state dict -> our state dict."""
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
    out = {
        "tok_emb.weight": hf["wte.weight"],
        "pos_emb.weight": hf["wpe.weight"],
        "ln_f.weight": hf["ln_f.weight"],
        "ln_f.bias": hf["ln_f.bias"],
    }
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"h.{i}."
        w = hf[theirs + "attn.c_attn.weight"].t()
        b = hf[theirs + "attn.c_attn.bias"]
        for n, wi, bi in zip(("q_proj", "k_proj", "v_proj"), w.chunk(3), b.chunk(3), strict=True):
            out[f"{ours}attn.{n}.weight"], out[f"{ours}attn.{n}.bias"] = wi, bi
        for dst, src in _LINEARS.items():
            out[f"{ours}{dst}.weight"] = hf[f"{theirs}{src}.weight"].t()
            out[f"{ours}{dst}.bias"] = hf[f"{theirs}{src}.bias"]
        for dst, src in _NORMS.items():
            for p in ("weight", "bias"):
                out[f"{ours}{dst}.{p}"] = hf[f"{theirs}{src}.{p}"]
    out["lm_head.weight"] = out["tok_emb.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def hf_config(cfg: ModelConfig, eot_id: int | None = 50256) -> dict:
    """The `config.json` of a `GPT2LMHeadModel` with our shapes."""
    if eot_id is not None and not 0 <= eot_id < cfg.vocab_size:
        eot_id = None
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "torch_dtype": "float32",
    }


# Our ModelConfig field -> its key in a Hugging Face GPT-2 `config.json`.
SHAPE_KEYS = {
    "n_layer": "n_layer",
    "n_head": "n_head",
    "n_embd": "n_embd",
    "block_size": "n_positions",
    "vocab_size": "vocab_size",
}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_hf_config(folder: Path) -> dict:
    """The `config.json` of a Hugging Face GPT-2 folder, checked to describe a GPT-2."""
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such Hugging Face model folder")
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found (a Hugging Face GPT-2 folder has a config.json)")
    try:
        hf_cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(hf_cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    if hf_cfg.get("model_type", "gpt2") != "gpt2":
        raise ConfigError(f"{path}: model_type={hf_cfg['model_type']!r}, expected 'gpt2'")
    missing = [k for k in SHAPE_KEYS.values() if not isinstance(hf_cfg.get(k), int)]
    if missing:
        raise ConfigError(f"{path}: expected integer {', '.join(missing)}")
    if hf_cfg.get("n_inner") not in (None, 4 * hf_cfg["n_embd"]):
        raise ConfigError(f"{path}: n_inner={hf_cfg['n_inner']} is not supported (4*n_embd)")
    return hf_cfg


def model_config_from_hf(hf_cfg: dict) -> ModelConfig:
    """Our ModelConfig with the shapes of a (checked) Hugging Face GPT-2 `config.json`."""
    return model_config(
        **{ours: hf_cfg[theirs] for ours, theirs in SHAPE_KEYS.items()},
        layer_norm_eps=hf_cfg.get("layer_norm_epsilon", 1e-5),
    )


def check_same_shapes(hf_cfg: dict, cfg: ModelConfig, folder: Path) -> None:
    """A one-line error naming every shape key where `config.json` and `cfg` differ."""
    differ = [
        f"model.{ours}={getattr(cfg, ours)} vs {theirs}={hf_cfg[theirs]}"
        for ours, theirs in SHAPE_KEYS.items()
        if getattr(cfg, ours) != hf_cfg[theirs]
    ]
    if differ:
        raise ConfigError(
            f"model.init_from={folder}: its config.json does not match the model config: "
            + ", ".join(differ)
        )


def save_hf(model: GPT, out_dir: str | Path, eot_id: int | None = 50256) -> Path:
    """Write `config.json` + `model.safetensors` that `GPT2LMHeadModel.from_pretrained` loads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = to_hf_state_dict(model.state_dict(), model.cfg)
    state.pop("lm_head.weight", None)  # tied to wte; transformers re-ties it on load
    save_file(
        {k: v.float().cpu() for k, v in state.items()},
        out / "model.safetensors",
        metadata={"format": "pt"},
    )
    (out / "config.json").write_text(json.dumps(hf_config(model.cfg, eot_id), indent=2) + "\n")
    return out


def weights_file(folder: str | Path) -> Path:
    """The weights file of a Hugging Face folder (safetensors preferred)."""
    for name in WEIGHT_FILES:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise ConfigError(f"{folder}: expected {' or '.join(WEIGHT_FILES)} of a GPT-2 model")


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
    """Tensors of a local Hugging Face GPT-2 folder (safetensors, or a weights-only .bin)."""
    return read_weights(weights_file(folder))


def layer_count(hf: dict[str, torch.Tensor]) -> int:
    """How many transformer blocks (`h.<i>.`) a Hugging Face GPT-2 state dict holds."""
    prefix = re.compile(r"^(?:transformer\.)?h\.(\d+)\.")
    found = {int(m.group(1)) for k in hf if (m := prefix.match(k))}
    return max(found, default=-1) + 1


def convert_checked(hf: dict[str, torch.Tensor], model: GPT, path: Path) -> dict[str, torch.Tensor]:
    """`hf` as our state dict, after checking it has exactly `model`'s tensors and shapes."""
    if layer_count(hf) != model.cfg.n_layer:
        raise ConfigError(
            f"{path}: holds {layer_count(hf)} layers, the model has "
            f"model.n_layer={model.cfg.n_layer}"
        )
    try:
        state = from_hf_state_dict(hf, model.cfg)
    except KeyError as err:
        raise ConfigError(f"{path}: tensor {err.args[0]} is missing") from None
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
    run starts): a GPT-2 `config.json` with `cfg`'s shapes and a weights file beside it."""
    check_same_shapes(read_hf_config(Path(folder)), cfg, Path(folder))
    weights_file(folder)


def load_hf(folder: str | Path, cfg: ModelConfig | None = None) -> GPT:
    """A GPT built from a local Hugging Face GPT-2 folder (e.g. a downloaded `gpt2`).

    With `cfg`, the folder's `config.json` must have the same shapes (layers, heads, width,
    vocabulary, block size); without, the model takes its shapes from it.
    """
    folder = Path(folder)
    hf_cfg = read_hf_config(folder)
    if cfg is None:
        cfg = model_config_from_hf(hf_cfg)
    else:
        check_same_shapes(hf_cfg, cfg, folder)
    path = weights_file(folder)
    model = GPT(cfg)
    model.load_state_dict(convert_checked(read_weights(path), model, path))
    return model
