"""The run configuration: typed dataclasses plus the checks that run before any work starts.

`trainer` never sees Hydra: `jobs/` composes YAML from `cluster_configs/` and hands the result
to :func:`load_config`, which merges it onto these dataclasses (so an unknown key or a wrong
type is caught by OmegaConf) and then checks combinations (heads dividing width, ...).
Every problem becomes one :class:`ConfigError` whose message names the key.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_prep.config import DATA_KINDS, DataConfig

PRECISIONS = ("fp32", "bf16", "fp16")
PP_SCHEDULES = ("gpipe", "1f1b")
WANDB_MODES = ("disabled", "offline", "online")
MESH_DIMS = ("dp_replicate", "dp_shard", "tp", "pp")
ATTENTION_IMPLS = ("auto", "sdpa", "flash")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A configuration problem, described in one line that names the offending key."""


@dataclass
class ModelConfig:
    name: str = "custom"
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 192
    block_size: int = 128
    vocab_size: int | None = 257  # null: the dataset's vocabulary size
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    attention: str = "auto"  # auto: flash-attn on CUDA when installed, else SDPA
    init_from: str | None = None  # a Hugging Face GPT-2 folder to start from


@dataclass
class TrainConfig:
    micro_batch_size: int = 8
    grad_accum: int = 1
    global_batch_size: int | None = None  # if set, grad_accum is derived from it
    max_steps: int = 100
    lr: float = 6e-4
    min_lr: float = 6e-5  # floor of the cosine decay
    warmup_steps: int = 10
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 1337
    activation_checkpointing: bool = False
    compile: bool = False
    cpu_threads: int = 0  # torch threads per process on CPU; 0: auto (see trainer.distributed)


@dataclass
class EvalConfig:
    interval: int = 0  # 0 disables periodic validation
    steps: int = 4  # validation batches per evaluation


@dataclass
class CheckpointConfig:
    interval: int = 0  # 0: only at the end of the run
    keep: int = 3
    async_save: bool = False  # write in the background while training continues


@dataclass
class WandbConfig:
    mode: str = "disabled"  # disabled | offline | online
    project: str = "distributed-llm-trainer"
    entity: str | None = None
    group: str | None = None
    name: str | None = None  # default: run.name
    tags: list[str] = field(default_factory=list)


@dataclass
class LogConfig:
    interval: int = 10
    progress: bool = True  # a progress bar, only when stderr is a terminal
    peak_tflops: float | None = None  # device peak for MFU; null: look it up for known GPUs
    tensorboard: bool = False  # event files in <run>/tensorboard
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class RunConfig:
    name: str = "default"
    dir: str = "runs/default"


@dataclass
class ParallelConfig:
    """Sizes of the device mesh; their product must equal the world size."""

    name: str = "single"
    dp_replicate: int = 1  # DDP (or HSDP's replicas)
    dp_shard: int = 1  # FSDP2
    tp: int = 1  # tensor parallel
    pp: int = 1  # pipeline parallel
    # one of the four sizes may be -1: whatever makes the product equal the world size
    ddp_bucket_mb: int = 25
    fsdp_reshard_after_forward: bool = True  # False: ZeRO-2 style (no re-gather in backward)
    fsdp_cpu_offload: bool = False
    pp_schedule: str = "1f1b"  # gpipe | 1f1b
    pp_microbatches: int = 4  # per pipeline step; must divide train.micro_batch_size

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    run: RunConfig = field(default_factory=RunConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: str = "fp32"
    resume: str = "auto"  # auto | none | PATH to a checkpoint folder
    device: str = "auto"


def describe_omegaconf_error(err: OmegaConfBaseException) -> str:
    """One line from an OmegaConf error: `key: what is wrong`."""
    key = getattr(err, "full_key", None) or ""
    msg = str(getattr(err, "msg", None) or err).strip().splitlines()[0]
    return f"{key}: {msg}" if key else msg


def load_config(source: Any = None, world_size: int = 1) -> Config:
    """Validate `source` (a mapping, DictConfig or Config) and return a :class:`Config`.

    Raises :class:`ConfigError` with a one-line message naming the key.
    """
    if isinstance(source, Config):
        source = OmegaConf.structured(source)
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, source or {})
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise ConfigError(describe_omegaconf_error(err)) from None
    check_config(cfg, world_size)
    return cfg


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(cfg: Config, *keys: str) -> None:
    for key in keys:
        value = functools.reduce(getattr, key.split("."), cfg)
        _require(value is not None and value > 0, f"{key}={value}: must be a positive number")


def _finite(cfg: Config, *keys: str) -> None:
    for key in keys:
        value = functools.reduce(getattr, key.split("."), cfg)
        _require(math.isfinite(value), f"{key}={value}: must be a finite number")


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, f"{key}={value!r}: expected one of {', '.join(allowed)}")


def resolve_auto_size(p: ParallelConfig, world_size: int) -> None:
    """Replace a mesh size of -1 by what makes the product equal the world size."""
    auto = [d for d in MESH_DIMS if getattr(p, d) == -1]
    _require(len(auto) <= 1, f"parallel: only one size may be -1, got {', '.join(auto)}")
    if auto:
        rest = math.prod(getattr(p, d) for d in MESH_DIMS if d not in auto)
        _require(
            rest > 0 and world_size % rest == 0,
            f"parallel.{auto[0]}=-1: world size {world_size} is not a multiple of the other "
            f"sizes' product {rest}",
        )
        setattr(p, auto[0], world_size // rest)


def check_config(cfg: Config, world_size: int = 1) -> None:
    """Cross-field checks. Also derives `train.grad_accum` from `train.global_batch_size`."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    _one_of("data.kind", cfg.data.kind, DATA_KINDS)
    if cfg.data.kind == "dummy":
        _positive(cfg, "data.vocab_size")
        if m.vocab_size is None:
            m.vocab_size = cfg.data.vocab_size
    else:
        _require(bool(cfg.data.path), "data.path: data.kind=shards needs the dataset folder")
    _positive(cfg, "model.n_layer", "model.n_head", "model.n_embd", "model.block_size")
    _positive(cfg, "train.micro_batch_size", "train.grad_accum")
    _positive(cfg, "train.max_steps", "train.lr", "checkpoint.keep", "log.interval")
    _finite(cfg, "train.lr", "train.min_lr", "train.weight_decay", "train.grad_clip")
    _finite(cfg, "model.dropout", "model.layer_norm_eps")
    _positive(cfg, "model.layer_norm_eps")
    _require(t.cpu_threads >= 0, f"train.cpu_threads={t.cpu_threads}: must be >= 0 (0: auto)")
    resolve_auto_size(p, world_size)
    _positive(cfg, "parallel.dp_replicate", "parallel.dp_shard", "parallel.tp", "parallel.pp")
    _positive(cfg, "parallel.pp_microbatches", "parallel.ddp_bucket_mb")
    _one_of("parallel.pp_schedule", p.pp_schedule, PP_SCHEDULES)
    _require(
        m.n_embd % m.n_head == 0,
        f"model.n_head={m.n_head} must divide model.n_embd={m.n_embd}",
    )
    if m.vocab_size is not None:
        _positive(cfg, "model.vocab_size")
    if m.vocab_size is not None and cfg.data.vocab_size is not None:
        _require(
            m.vocab_size >= cfg.data.vocab_size,
            f"model.vocab_size={m.vocab_size} is smaller than data.vocab_size="
            f"{cfg.data.vocab_size} (tokenizer {cfg.data.tokenizer})",
        )
    _require(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout}: must be in [0, 1)")
    _one_of("model.attention", m.attention, ATTENTION_IMPLS)
    _one_of("precision", cfg.precision, PRECISIONS)
    _one_of("log.wandb.mode", cfg.log.wandb.mode, WANDB_MODES)
    _one_of("device", cfg.device, DEVICES)
    _require(
        0.0 <= t.min_lr <= t.lr, f"train.min_lr={t.min_lr} must be between 0 and train.lr={t.lr}"
    )
    _require(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps}: must be >= 0")
    _require(0.0 <= t.beta1 < 1.0 and 0.0 <= t.beta2 < 1.0, "train.beta1/beta2: must be in [0, 1)")
    _require(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay}: must be >= 0")
    _require(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip}: must be >= 0 (0 disables)")
    _require(cfg.eval.interval >= 0, f"eval.interval={cfg.eval.interval}: must be >= 0")
    _require(cfg.eval.steps > 0, f"eval.steps={cfg.eval.steps}: must be a positive number")
    _require(
        cfg.checkpoint.interval >= 0,
        f"checkpoint.interval={cfg.checkpoint.interval}: must be >= 0 (0: only at the end)",
    )
    _require(
        cfg.data.dummy_branching > 0,
        f"data.dummy_branching={cfg.data.dummy_branching}: must be a positive number",
    )
    _require(bool(cfg.run.dir), "run.dir: must name a directory")
    _require(bool(cfg.resume), "resume: expected auto, none or a checkpoint path")
    _require(
        p.world_size == world_size,
        f"parallel: dp_replicate*dp_shard*tp*pp = {p.world_size} must equal the world size "
        f"{world_size}",
    )
    if t.global_batch_size is not None:
        per_step = t.micro_batch_size * p.dp_size
        _require(
            t.global_batch_size > 0 and t.global_batch_size % per_step == 0,
            f"train.global_batch_size={t.global_batch_size} must be a positive multiple of "
            f"train.micro_batch_size*data-parallel size = {per_step}",
        )
        t.grad_accum = t.global_batch_size // per_step


def to_dict(cfg: Config) -> dict[str, Any]:
    """A plain, JSON/YAML-friendly dict of the config."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]
