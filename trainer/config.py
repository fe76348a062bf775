"""The run configuration: its schema, where its values come from, and the one validation.

- **Values** live in one place: the YAML tree `cluster_configs/` (`train.yaml` and the presets
  it picks by default). :func:`default_tree` composes it with Hydra's compose API, exactly as
  `dlt-train` does, so `trainer.train.run(cfg)` and `dlt-train` with the same keys omitted
  train the same run. The dataclasses below declare types only (no default values).
- **One validation**: :func:`resolve_config` merges a source onto the defaults (an unknown key
  or a wrong type is caught by OmegaConf), derives what the config leaves open (a mesh size of
  -1, `grad_accum` from the global batch, the vocabulary from the dataset), checks every rule
  (fields, combinations, the parallel layout, the inputs) and returns an immutable
  :class:`Config`. Every path runs it before anything is submitted or written: training here,
  `dlt-train cluster=...` (and `dry_run=true`), sweeps. The trainer trusts what it returns.

Every problem becomes one :class:`ConfigError` whose message names the key.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import typing
from collections.abc import Collection
from dataclasses import dataclass, fields, replace
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_prep.config import CorpusConfig
from data_prep.errors import UserError
from data_prep.shards import DatasetError, read_manifest

CONFIG_MODULE = "cluster_configs"  # the YAML tree, shipped as a package
PRECISIONS = ("fp32", "bf16", "fp16")
SINGLE_STAGE_SCHEDULES = ("gpipe", "1f1b")  # one stage per rank; the others take several
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble")
WANDB_MODES = ("disabled", "offline", "online")
MESH_DIMS = ("dp_replicate", "dp_shard", "cp", "tp", "pp")
ATTENTION_IMPLS = ("auto", "sdpa", "flash", "cudnn")
DEVICES = ("auto", "cpu", "cuda")
DATA_KINDS = ("dummy", "shards")
DOC_POSITIONS = ("continue", "reset")
ARCHS = ("gpt2", "llama")  # the registry of trainer/models/ (a test keeps the two equal)
LR_SCHEDULES = ("cosine", "wsd", "constant")
DECAY_SHAPES = ("linear", "1-sqrt")  # wsd's decay


class ConfigError(UserError, ValueError):
    """A configuration problem, described in one line that names the offending key."""

    same_on_every_rank = True


@dataclass(frozen=True)
class RopeScalingConfig:
    """Llama-3.1 rotary frequency scaling (long context); `factor` null: off."""

    factor: float | None
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # gpt2 | llama: the architecture (trainer/models/<arch>/)
    name: str
    n_layer: int
    n_head: int
    n_kv_head: int | None  # llama: key/value heads (grouped-query attention); null: n_head
    n_embd: int
    block_size: int
    vocab_size: int | None  # null: the dataset's vocabulary size
    dropout: float
    layer_norm_eps: float  # the epsilon of the norms (LayerNorm for gpt2, RMSNorm for llama)
    attention: str  # auto | sdpa | flash | cudnn: the kernel (trainer/models/attention.py)
    init_from: str | None  # a Hugging Face folder (of this arch) to start from
    tie_embeddings: bool  # the output layer shares the token embedding's weight
    rope_theta: float  # llama: rotary position embedding base
    rope_scaling: RopeScalingConfig
    ffn_dim_multiplier: float | None  # llama: SwiGLU hidden size = multiplier * 8/3 * n_embd
    multiple_of: int  # llama: ... rounded up to a multiple of this
    doc_mask: bool  # attention stays inside each document of a packed window
    doc_positions: str  # continue | reset: positions restart at 0 after each EOT
    eot_id: int | None  # the end-of-text id doc_mask splits at; null: the dataset's
    pad_vocab_to_multiple: int  # embedding/output rows rounded up to a multiple (1: none)
    loss_chunk_size: int  # tokens per chunk of the lm_head + cross-entropy; 0: unchunked

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and output layer: `vocab_size` rounded up to a multiple of
        `pad_vocab_to_multiple`; the rows past `vocab_size` are never a token."""
        m = self.pad_vocab_to_multiple
        return -(-self.vocab_size // m) * m


@dataclass(frozen=True)
class TrainConfig:
    micro_batch_size: int
    grad_accum: int
    global_batch_size: int | None  # if set, grad_accum is derived from it
    max_steps: int
    lr: float
    min_lr: float  # where the decay ends (cosine, wsd)
    warmup_steps: int
    lr_schedule: str  # cosine | wsd | constant (after the linear warmup)
    decay_fraction: float  # wsd: the last fraction of max_steps decays to min_lr
    decay_shape: str  # wsd: linear | 1-sqrt
    beta1: float
    beta2: float
    weight_decay: float
    grad_clip: float  # 0 disables clipping
    seed: int
    activation_checkpointing: bool
    compile: bool
    compile_loss: bool  # with compile: the final norm, lm_head and loss compiled too
    cpu_threads: int  # torch threads per process on CPU; 0: auto (see trainer.distributed)
    z_loss: float  # weight of PaLM's z-loss, mean(logsumexp(logits)^2); 0: off
    skip_spike_factor: float  # skip an update whose loss/grad norm > factor x rolling mean; 0: off
    skip_spike_window: int  # accepted steps in the rolling mean (and before skipping can start)
    max_consecutive_skips: int  # this many skipped updates in a row stop the run


@dataclass(frozen=True)
class MixSource:
    """One dataset of a weighted mixture (`data.mix`). The only config class with defaults:
    list items have no YAML template to take them from."""

    path: str  # a prepared shard dataset
    weight: float  # its share of the samples, relative to the others' weights
    name: str | None = None  # in metrics (tokens_per_source); default: the path


@dataclass(frozen=True)
class DataConfig:
    """The trainer's keys of the `data` section (dlt-prep reads the others: CorpusConfig)."""

    name: str
    kind: str  # dummy: synthetic tokens | shards: a prepared dataset at `path`
    path: str | None  # the shard dataset the trainer reads
    mix: list[MixSource]  # several shard datasets with weights; replaces `path` when set
    verify: bool  # check every shard's sha256 before its tokens are used (in the background)
    tokenizer: str | None  # gpt2 | bpe | bytes | hf; null: whatever the dataset used
    vocab_size: int | None  # ids in the data are below this; null: from the dataset
    tokenizer_hash: str | None  # filled from the dataset's manifest
    dummy_branching: int  # dummy: each token has this many possible successors


@dataclass(frozen=True)
class EvalConfig:
    interval: int  # 0 disables periodic validation
    steps: int  # validation batches per evaluation
    hellaswag: str | None  # a HellaSwag-format jsonl scored at each evaluation; null: off
    hellaswag_examples: int | None  # its first N questions; null: all


@dataclass(frozen=True)
class CheckpointConfig:
    interval: int  # 0: only at the end of the run
    keep: int
    async_save: bool | str  # auto (async on CUDA) | true | false: write in the background


@dataclass(frozen=True)
class DistConfig:
    timeout_s: float  # a collective that waits longer ends the run (init_process_group)


@dataclass(frozen=True)
class WandbConfig:
    mode: str  # disabled | offline | online
    project: str
    entity: str | None
    group: str | None
    name: str | None  # default: run.name
    tags: list[str]


@dataclass(frozen=True)
class LogConfig:
    interval: int
    progress: bool  # a progress bar, only when stderr is a terminal
    peak_tflops: float | None  # device peak for MFU; null: look it up for known GPUs
    tensorboard: bool  # event files in <run>/tensorboard
    wandb: WandbConfig


@dataclass(frozen=True)
class ProfileConfig:
    """A torch.profiler trace of optimizer steps start_step .. start_step + steps - 1."""

    enabled: bool
    start_step: int  # the first profiled optimizer step (counted from 1)
    steps: int  # how many steps the trace covers


@dataclass(frozen=True)
class RunConfig:
    name: str
    dir: str


@dataclass(frozen=True)
class ParallelConfig:
    """Sizes of the device mesh; their product must equal the world size (one may be -1:
    whatever makes it so)."""

    name: str
    dp_replicate: int  # DDP (or HSDP's replicas)
    dp_shard: int  # FSDP2
    tp: int  # tensor parallel
    pp: int  # pipeline parallel
    cp: int  # context parallel: each sequence split over this many ranks
    ddp_bucket_mb: int
    fsdp_reshard_after_forward: bool  # False: ZeRO-2 style (no re-gather in backward)
    fsdp_cpu_offload: bool
    zero1: bool  # DDP with the optimizer state sharded over the replicas (ZeRO-1)
    pp_schedule: str  # gpipe | 1f1b | interleaved_1f1b | zero_bubble
    pp_microbatches: int  # per pipeline step; must divide train.micro_batch_size
    pp_virtual_stages: int  # pipeline stages per rank (interleaved_1f1b, zero_bubble)
    sequence_parallel: bool  # TP: norms/dropout/residuals sharded over the sequence
    loss_parallel: bool  # TP: logits (and the embedding) sharded over the vocabulary

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp * self.pp

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    train: TrainConfig
    data: DataConfig
    eval: EvalConfig
    checkpoint: CheckpointConfig
    log: LogConfig
    profile: ProfileConfig
    run: RunConfig
    parallel: ParallelConfig
    dist: DistConfig
    precision: str
    resume: str  # auto | none | PATH to a checkpoint folder
    device: str


# ------------------------------------------------------------------------------- the values

# Keys of the shared `data:` section that only dlt-prep reads (the trainer ignores them).
PREP_ONLY_KEYS = frozenset(f.name for f in fields(CorpusConfig)) - {
    f.name for f in fields(DataConfig)
}


def compose_tree(
    config_name: str, overrides: list[str] = (), with_hydra: bool = False
) -> DictConfig:
    """`cluster_configs/<config_name>.yaml` with `overrides`, composed by Hydra's compose API
    (`with_hydra`: with the `hydra` node, e.g. the launcher). Works inside a running Hydra app
    too (ours or a user's): its global state is set aside meanwhile and put back."""
    running = GlobalHydra.instance()
    previous = running.hydra if running.is_initialized() else None
    running.clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            return compose(
                config_name=config_name,
                overrides=list(overrides),
                return_hydra_config=with_hydra,
            )
    finally:
        if previous is not None:
            GlobalHydra.instance().clear()
            GlobalHydra.instance().initialize(previous)


@functools.cache
def _default_tree() -> DictConfig:
    tree = compose_tree("train")
    return OmegaConf.masked_copy(tree, [f.name for f in fields(Config)])


def default_tree() -> DictConfig:
    """The training defaults: `train.yaml` with its default presets, interpolations kept (so
    `run.dir` follows `model.name` as it does on the command line)."""
    return copy.deepcopy(_default_tree())


def model_config(values: Any = None, **overrides: Any) -> ModelConfig:
    """A :class:`ModelConfig` from the defaults, `values` (e.g. a checkpoint's saved model
    section, possibly from an older version) and `overrides`."""
    defaults = OmegaConf.to_container(_default_tree().model, resolve=True)  # no data here
    node = OmegaConf.merge(defaults, values or {}, overrides)
    try:
        return OmegaConf.to_object(_merged(ModelConfig, node))
    except OmegaConfBaseException as err:
        raise ConfigError(describe_omegaconf_error(err)) from None


def _merged(cls: type, *sources: Any) -> DictConfig:
    """`sources` merged onto dataclass `cls` as a schema (type checks, unknown keys)."""
    return OmegaConf.merge(_open_schema(cls), *sources)


def _open_schema(cls: type) -> DictConfig:
    """`cls` as a schema that can be merged into: OmegaConf makes the nodes of a frozen
    dataclass read-only, so every section is built and unlocked here (the instance that
    `to_object` makes of the merged result is frozen again)."""
    node = OmegaConf.structured(cls)
    OmegaConf.set_readonly(node, False)
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            node[f.name] = _open_schema(hints[f.name])
    return node


def describe_omegaconf_error(err: OmegaConfBaseException) -> str:
    """One line from an OmegaConf error: `key: what is wrong`."""
    key = getattr(err, "full_key", None) or ""
    msg = str(getattr(err, "msg", None) or err).strip().splitlines()[0]
    return f"{key}: {msg}" if key else msg


def _on_defaults(source: Any, given: Collection[str] | None = None) -> DictConfig:
    """`source` merged onto the defaults (no schema yet), without the keys of the `data`
    section that only dlt-prep reads. That section is resolved first, so that `path:
    ${.out}` follows a `data.out` of `source` as it does on the command line.

    `given`: the keys the user set (default: every key of `source`). A dataset the user names
    (`data.path` or `data.mix`) speaks for itself: unless `data.tokenizer` is given too, the
    preset's tokenizer (a statement about the preset's own dataset) gives way to the
    manifest's."""
    if isinstance(source, Config):
        source = to_dict(source)
    given = set(given) if given is not None else dotted_keys(source or {})
    tree = default_tree()
    OmegaConf.set_struct(tree, False)  # unknown keys are the schema's to report, by name
    node = OmegaConf.merge(tree, source or {})
    values = OmegaConf.to_container(node.data, resolve=True)
    node.data = {k: v for k, v in values.items() if k not in PREP_ONLY_KEYS}
    if given & {"data.path", "data.mix"} and "data.tokenizer" not in given:
        node.data.tokenizer = None
    return node


def dotted_keys(source: Any, prefix: str = "") -> set[str]:
    """Every key of a nested mapping, dotted (`{"data": {"path": p}}` -> data, data.path)."""
    if isinstance(source, DictConfig):
        source = OmegaConf.to_container(source, resolve=False)
    keys: set[str] = set()
    if isinstance(source, dict):
        for key, value in source.items():
            keys.add(prefix + str(key))
            keys |= dotted_keys(value, f"{prefix}{key}.")
    return keys


# --------------------------------------------------------------------------- the validation


def resolve_config(
    source: Any = None, world_size: int = 1, given: Collection[str] | None = None
) -> Config:
    """The one validation of a run's config: `source` (a mapping, DictConfig or Config) on the
    defaults, derived, checked, with the dataset's vocabulary filled in and the inputs
    (starting weights, validation split) checked. Reads files, writes nothing. `given`: the
    keys the user set, when `source` holds more (a composed command line); see _on_defaults."""
    cfg = load_config(source, world_size, given)
    cfg = with_dataset(cfg)
    check_inputs(cfg)
    return cfg


def load_config(
    source: Any = None, world_size: int = 1, given: Collection[str] | None = None
) -> Config:
    """:func:`resolve_config` without looking at any file: the defaults, `source`, the
    derived sizes and every rule that needs only the config itself."""
    try:
        merged = _merged(Config, _on_defaults(source, given))
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise ConfigError(describe_omegaconf_error(err)) from None
    check_fields(cfg)
    cfg = derive(cfg, world_size)
    check_combinations(cfg, world_size)
    check_layout(cfg)
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


def check_fields(cfg: Config) -> None:
    """Each key on its own: ranges, choices, what a data kind needs."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    _one_of("data.kind", cfg.data.kind, DATA_KINDS)
    if cfg.data.kind == "dummy":
        _positive(cfg, "data.vocab_size")
        _require(not cfg.data.mix, "data.mix: a mixture is of shard datasets (data.kind=shards)")
    else:
        _require(
            bool(cfg.data.path or cfg.data.mix),
            "data.path: data.kind=shards needs the dataset folder (or data.mix, several)",
        )
    check_mix(cfg.data.mix)
    _positive(cfg, "model.n_layer", "model.n_head", "model.n_embd", "model.block_size")
    _positive(cfg, "train.micro_batch_size", "train.grad_accum")
    _positive(cfg, "train.max_steps", "train.lr", "checkpoint.keep", "log.interval")
    _finite(cfg, "train.lr", "train.min_lr", "train.weight_decay", "train.grad_clip")
    _finite(cfg, "model.dropout", "model.layer_norm_eps")
    _positive(cfg, "model.layer_norm_eps")
    _require(t.cpu_threads >= 0, f"train.cpu_threads={t.cpu_threads}: must be >= 0 (0: auto)")
    _require(t.seed >= 0, f"train.seed={t.seed}: must be >= 0 (it seeds NumPy's generators too)")
    _positive(cfg, "parallel.pp_microbatches", "parallel.ddp_bucket_mb")
    _positive(cfg, "parallel.pp_virtual_stages")
    _require(
        p.pp_schedule != "zbv",
        "parallel.pp_schedule=zbv: torch's ScheduleZBVZeroBubble fails in forward-only "
        "(evaluation) steps; use zero_bubble",
    )
    _one_of("parallel.pp_schedule", p.pp_schedule, PP_SCHEDULES)
    if m.vocab_size is not None:
        _positive(cfg, "model.vocab_size")
    _positive(cfg, "model.pad_vocab_to_multiple")
    _require(
        m.loss_chunk_size >= 0,
        f"model.loss_chunk_size={m.loss_chunk_size}: must be >= 0 (tokens per chunk; 0: off)",
    )
    _require(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout}: must be in [0, 1)")
    _one_of("model.arch", m.arch, ARCHS)
    _one_of("model.attention", m.attention, ATTENTION_IMPLS)
    if m.n_kv_head is not None:
        _positive(cfg, "model.n_kv_head")
    _positive(cfg, "model.rope_theta", "model.multiple_of")
    _finite(cfg, "model.rope_theta")
    if m.ffn_dim_multiplier is not None:
        _positive(cfg, "model.ffn_dim_multiplier")
    if m.rope_scaling.factor is not None:
        _positive(cfg, "model.rope_scaling.factor")
    _one_of("model.doc_positions", m.doc_positions, DOC_POSITIONS)
    _require(m.eot_id is None or m.eot_id >= 0, f"model.eot_id={m.eot_id}: must be a token id >= 0")
    _require(
        m.arch != "gpt2" or m.tie_embeddings,
        "model.tie_embeddings=false: GPT-2 ties its output layer to the token embedding",
    )
    _require(
        m.arch != "gpt2" or m.n_kv_head is None,
        f"model.n_kv_head={m.n_kv_head}: grouped-query attention is a llama key "
        "(model.arch=gpt2 has n_head key/value heads)",
    )
    _one_of("precision", cfg.precision, PRECISIONS)
    _one_of("log.wandb.mode", cfg.log.wandb.mode, WANDB_MODES)
    _one_of("device", cfg.device, DEVICES)
    _require(
        0.0 <= t.min_lr <= t.lr, f"train.min_lr={t.min_lr} must be between 0 and train.lr={t.lr}"
    )
    _require(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps}: must be >= 0")
    check_stability_fields(t)
    _require(0.0 <= t.beta1 < 1.0 and 0.0 <= t.beta2 < 1.0, "train.beta1/beta2: must be in [0, 1)")
    _require(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay}: must be >= 0")
    _require(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip}: must be >= 0 (0 disables)")
    _require(cfg.eval.interval >= 0, f"eval.interval={cfg.eval.interval}: must be >= 0")
    _require(cfg.eval.steps > 0, f"eval.steps={cfg.eval.steps}: must be a positive number")
    if cfg.eval.hellaswag_examples is not None:
        _positive(cfg, "eval.hellaswag_examples")
    _require(
        cfg.checkpoint.async_save in (True, False, "auto"),
        f"checkpoint.async_save={cfg.checkpoint.async_save!r}: expected auto, true or false",
    )
    _require(
        cfg.dist.timeout_s > 0 and math.isfinite(cfg.dist.timeout_s),
        f"dist.timeout_s={cfg.dist.timeout_s}: must be a positive number of seconds",
    )
    _require(
        cfg.checkpoint.interval >= 0,
        f"checkpoint.interval={cfg.checkpoint.interval}: must be >= 0 (0: only at the end)",
    )
    _require(
        cfg.data.dummy_branching > 0,
        f"data.dummy_branching={cfg.data.dummy_branching}: must be a positive number",
    )
    if cfg.data.kind == "dummy":
        _require(
            cfg.data.dummy_branching <= cfg.data.vocab_size,
            f"data.dummy_branching={cfg.data.dummy_branching}: must be at most data.vocab_size="
            f"{cfg.data.vocab_size} (a token's successors are distinct tokens)",
        )
    _positive(cfg, "profile.start_step", "profile.steps")
    _require(bool(cfg.run.dir), "run.dir: must name a directory")
    _require(bool(cfg.resume), "resume: expected auto, none or a checkpoint path")


def check_mix(mix: list[MixSource]) -> None:
    """Each source of `data.mix`: a path, a positive finite weight, a name of its own."""
    names = [source.name or source.path for source in mix]
    for i, source in enumerate(mix):
        where = f"data.mix[{i}]"
        _require(bool(source.path), f"{where}.path: must name a prepared dataset folder")
        _require(
            math.isfinite(source.weight) and source.weight > 0,
            f"{where}.weight={source.weight}: must be a positive number",
        )
        _require(
            names[i] not in names[:i],
            f"{where}: {names[i]!r} also names data.mix[{names.index(names[i])}] (two sources "
            "of one name: give each a distinct name)",
        )


def check_stability_fields(t: TrainConfig) -> None:
    """The schedule's and the stability keys' ranges and choices."""
    _one_of("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    _one_of("train.decay_shape", t.decay_shape, DECAY_SHAPES)
    _require(
        0.0 < t.decay_fraction <= 1.0,
        f"train.decay_fraction={t.decay_fraction}: must be in (0, 1]",
    )
    _require(
        math.isfinite(t.z_loss) and t.z_loss >= 0,
        f"train.z_loss={t.z_loss}: must be >= 0 (0: off; 1e-4 is typical)",
    )
    _require(
        math.isfinite(t.skip_spike_factor)
        and (t.skip_spike_factor == 0 or t.skip_spike_factor > 1),
        f"train.skip_spike_factor={t.skip_spike_factor}: must be 0 (off) or above 1",
    )
    _require(
        t.skip_spike_window > 0,
        f"train.skip_spike_window={t.skip_spike_window}: must be a positive number",
    )
    _require(
        t.max_consecutive_skips > 0,
        f"train.max_consecutive_skips={t.max_consecutive_skips}: must be a positive number",
    )


def wsd_decay_steps(t: TrainConfig) -> int:
    """The steps of the WSD schedule's decay: `decay_fraction` of `max_steps`, rounded."""
    return round(t.decay_fraction * t.max_steps)


def auto_sizes(p: ParallelConfig, world_size: int) -> ParallelConfig:
    """A mesh size of -1 replaced by what makes the product equal the world size."""
    auto = [d for d in MESH_DIMS if getattr(p, d) == -1]
    _require(len(auto) <= 1, f"parallel: only one size may be -1, got {', '.join(auto)}")
    if not auto:
        return p
    rest = math.prod(getattr(p, d) for d in MESH_DIMS if d not in auto)
    _require(
        rest > 0 and world_size % rest == 0,
        f"parallel.{auto[0]}=-1: world size {world_size} is not a multiple of the other "
        f"sizes' product {rest}",
    )
    return replace(p, **{auto[0]: world_size // rest})


def derive(cfg: Config, world_size: int) -> Config:
    """What the config leaves open: mesh sizes of -1, `train.grad_accum` from
    `train.global_batch_size`, a dummy dataset's vocabulary for the model."""
    p = auto_sizes(cfg.parallel, world_size)
    cfg = replace(cfg, parallel=p)
    _positive(
        cfg,
        "parallel.dp_replicate",
        "parallel.dp_shard",
        "parallel.cp",
        "parallel.tp",
        "parallel.pp",
    )
    if cfg.data.kind == "dummy" and cfg.model.vocab_size is None:
        cfg = replace(cfg, model=replace(cfg.model, vocab_size=cfg.data.vocab_size))
    t = cfg.train
    if t.global_batch_size is not None:
        per_step = t.micro_batch_size * p.dp_size
        _require(
            t.global_batch_size > 0 and t.global_batch_size % per_step == 0,
            f"train.global_batch_size={t.global_batch_size} must be a positive multiple of "
            f"train.micro_batch_size*data-parallel size = {per_step}",
        )
        cfg = replace(cfg, train=replace(t, grad_accum=t.global_batch_size // per_step))
    return cfg


def check_combinations(cfg: Config, world_size: int) -> None:
    """Rules between keys: heads and width, vocabularies, the schedule, the world size."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if t.lr_schedule == "wsd":
        decay = wsd_decay_steps(t)
        _require(
            decay >= 1,
            f"train.decay_fraction={t.decay_fraction}: decays over no step of "
            f"train.max_steps={t.max_steps}",
        )
        _require(
            t.warmup_steps + decay <= t.max_steps,
            f"train.warmup_steps={t.warmup_steps} + the decay (train.decay_fraction="
            f"{t.decay_fraction}: {decay} steps) exceed train.max_steps={t.max_steps}",
        )
    _require(
        m.n_embd % m.n_head == 0,
        f"model.n_head={m.n_head} must divide model.n_embd={m.n_embd}",
    )
    _require(
        m.n_head % m.kv_heads == 0,
        f"model.n_kv_head={m.n_kv_head} must divide model.n_head={m.n_head}",
    )
    if m.vocab_size is not None and cfg.data.vocab_size is not None:
        _require(
            m.vocab_size >= cfg.data.vocab_size,
            f"model.vocab_size={m.vocab_size} is smaller than data.vocab_size="
            f"{cfg.data.vocab_size} (tokenizer {cfg.data.tokenizer})",
        )
    if m.attention in ("flash", "cudnn"):  # said before the build, not at the first forward
        _require(
            cfg.precision in ("bf16", "fp16") and cfg.device != "cpu",
            f"model.attention={m.attention} needs a CUDA GPU and precision=bf16 or fp16 "
            f"(precision={cfg.precision}, device={cfg.device}); model.attention=auto picks "
            "what runs",
        )
    check_documents(cfg)
    if cfg.profile.enabled:
        last = cfg.profile.start_step + cfg.profile.steps - 1
        _require(
            last <= t.max_steps,
            f"profile.start_step={cfg.profile.start_step} + profile.steps={cfg.profile.steps}: "
            f"the window ends at step {last}, after train.max_steps={t.max_steps}",
        )
    _require(
        p.world_size == world_size,
        f"parallel: dp_replicate*dp_shard*cp*tp*pp = {p.world_size} must equal the world size "
        f"{world_size}",
    )
    if cfg.eval.hellaswag:
        check_hellaswag(cfg)


def check_hellaswag(cfg: Config) -> None:
    """What `eval.hellaswag` needs: a tokenizer for its text, evaluations, no pipeline."""
    key = f"eval.hellaswag={cfg.eval.hellaswag}"
    _require(
        cfg.data.kind == "shards",
        f"{key}: needs data.kind=shards (its text is encoded with the dataset's tokenizer; "
        "dummy data has none)",
    )
    _require(
        cfg.eval.interval > 0,
        f"{key}: runs with each evaluation, but eval.interval=0 (set eval.interval=N)",
    )
    _require(
        cfg.parallel.pp == 1,
        f"{key}: not supported with pipeline parallel (parallel.pp={cfg.parallel.pp}); "
        "evaluate a checkpoint with dlt-eval instead",
    )


def check_documents(cfg: Config) -> None:
    """Document masking needs an end-of-text id inside the vocabulary; position reset needs
    the mask (a shard dataset's id is checked once it is read: :func:`with_dataset`)."""
    m = cfg.model
    _require(
        m.doc_positions == "continue" or m.doc_mask,
        f"model.doc_positions={m.doc_positions}: needs model.doc_mask=true",
    )
    if m.doc_mask and cfg.data.kind == "dummy":
        _require(
            m.eot_id is not None,
            "model.doc_mask=true needs an end-of-text id: data.kind=dummy has none, set "
            "model.eot_id (a dataset's manifest provides it)",
        )
    if m.eot_id is not None and m.vocab_size is not None:
        _require(
            m.eot_id < m.vocab_size,
            f"model.eot_id={m.eot_id}: must be below model.vocab_size={m.vocab_size}",
        )


def check_layout(cfg: Config) -> None:
    """Parallel layouts that cannot work with this model or these settings."""
    p, m = cfg.parallel, cfg.model
    _require(m.n_head % p.tp == 0, f"parallel.tp={p.tp} must divide model.n_head={m.n_head}")
    _require(
        m.kv_heads % p.tp == 0,
        f"parallel.tp={p.tp} must divide the key/value heads model.n_kv_head={m.kv_heads}",
    )
    from trainer.models import spec_of  # imported here: the models build on this module

    problem = spec_of(m).check_layout(m, p)  # e.g. tp must divide the MLP's hidden size
    _require(problem is None, problem or "")
    _require(p.pp <= m.n_layer, f"parallel.pp={p.pp} is larger than model.n_layer={m.n_layer}")
    check_pipeline_schedule(cfg)
    if p.pp > 1:
        _require(
            p.pp_microbatches >= p.pp,
            f"parallel.pp_microbatches={p.pp_microbatches} must be at least parallel.pp={p.pp}",
        )
        _require(
            cfg.train.micro_batch_size % p.pp_microbatches == 0,
            f"parallel.pp_microbatches={p.pp_microbatches} must divide "
            f"train.micro_batch_size={cfg.train.micro_batch_size}",
        )
    plain_ddp = p.dp_replicate > 1 and p.dp_shard == 1 and p.cp == 1  # cp>1: FSDP
    _require(
        not (p.tp > 1 and plain_ddp),
        "parallel: tensor parallel with plain DDP (dp_replicate>1, dp_shard=1) is not "
        "supported; shard instead (dp_shard>1, i.e. FSDP or HSDP)",
    )
    _require(
        not (p.pp > 1 and plain_ddp),
        "parallel: pipeline parallel with plain DDP (dp_replicate>1, dp_shard=1) is not "
        "supported; use dp_shard (FSDP) for the data-parallel part",
    )
    sharded = p.dp_shard > 1 or p.cp > 1 or p.tp > 1 or p.pp > 1
    _require(
        not (cfg.precision == "fp16" and sharded),
        "precision=fp16 works with single/DDP layouts only; use bf16",
    )
    if p.cp > 1:
        check_context_parallel(cfg)
    _require(
        not (p.zero1 and (p.dp_shard > 1 or p.cp > 1 or p.tp > 1 or p.pp > 1)),
        "parallel.zero1=true shards the optimizer over DDP replicas only (dp_shard=cp=tp=pp=1); "
        "FSDP (dp_shard>1) shards the optimizer state already",
    )
    _require(
        not (p.zero1 and cfg.precision == "fp16"),
        "parallel.zero1=true with precision=fp16 is not supported; use bf16 or fp32",
    )
    check_tp_extras(cfg)
    check_chunked_loss(cfg)
    _require(
        not (m.doc_mask and p.pp > 1),
        f"model.doc_mask=true is not supported with pipeline parallel (parallel.pp={p.pp}): "
        "later stages receive hidden states, not the token ids the mask is built from",
    )


def check_chunked_loss(cfg: Config) -> None:
    """The chunked loss (model.loss_chunk_size > 0) takes the hidden states and the output
    weight itself: where the output layer is split (loss parallel), sequence-sharded (sequence
    parallel) or the loss is the pipeline schedule's (pp > 1), it would bypass that layout."""
    p, key = cfg.parallel, f"model.loss_chunk_size={cfg.model.loss_chunk_size}"
    if cfg.model.loss_chunk_size == 0:
        return
    for refused, what in (
        (p.loss_parallel, "parallel.loss_parallel=true (the vocabulary is split already)"),
        (p.sequence_parallel, "parallel.sequence_parallel=true"),
        (p.pp > 1, f"pipeline parallel (parallel.pp={p.pp}); set 0"),
    ):
        _require(not refused, f"{key}: the chunked loss is not supported with {what}")


def check_context_parallel(cfg: Config) -> None:
    """What context parallel (parallel.cp > 1) needs and what it does not combine with."""
    p, m = cfg.parallel, cfg.model
    key = f"parallel.cp={p.cp}"
    _require(
        m.block_size % (2 * p.cp) == 0,
        f"{key}: model.block_size={m.block_size} must be divisible by 2*cp={2 * p.cp} (each "
        "rank holds two equal chunks of every sequence)",
    )
    refusals = [
        (p.pp > 1, f"pipeline parallel (parallel.pp={p.pp})"),
        (m.doc_mask, "model.doc_mask=true (the document mask would have to span the ranks)"),
        (m.dropout > 0, f"model.dropout={m.dropout} (its attention has no dropout; set 0)"),
        (bool(cfg.eval.hellaswag), "eval.hellaswag (score a checkpoint with dlt-eval)"),
    ]
    for refused, what in refusals:
        _require(not refused, f"{key}: context parallel is not supported with {what}")


def check_pipeline_schedule(cfg: Config) -> None:
    """Stages per rank and micro-batches that `parallel.pp_schedule` can run."""
    p, m = cfg.parallel, cfg.model
    v, key = p.pp_virtual_stages, f"parallel.pp_virtual_stages={p.pp_virtual_stages}"
    if p.pp_schedule in SINGLE_STAGE_SCHEDULES:
        _require(
            v == 1,
            f"{key}: pp_schedule={p.pp_schedule} runs one stage per rank "
            "(use interleaved_1f1b or zero_bubble for more)",
        )
        return
    if p.pp == 1:
        return  # no pipeline: the schedule keys are not used
    _require(
        v >= 2 or p.pp_schedule == "zero_bubble",
        f"{key}: pp_schedule={p.pp_schedule} needs at least 2 stages per rank",
    )
    _require(
        p.pp * v <= m.n_layer,
        f"{key}: parallel.pp x pp_virtual_stages = {p.pp * v} stages, more than "
        f"model.n_layer={m.n_layer} blocks",
    )
    _require(
        p.pp_microbatches % p.pp == 0,
        f"parallel.pp_microbatches={p.pp_microbatches} must be a multiple of parallel.pp="
        f"{p.pp} for pp_schedule={p.pp_schedule} (micro-batches go round in groups of pp)",
    )
    for key, on in (
        ("train.compile", cfg.train.compile),
        ("train.activation_checkpointing", cfg.train.activation_checkpointing),
    ):
        _require(
            not on,
            f"{key}=true is not supported with pipeline schedule {p.pp_schedule} (untested with "
            "its stage views and split backward); use gpipe or 1f1b for it",
        )
    _require(
        p.dp_shard == 1 and p.tp == 1,
        f"parallel.pp_schedule={p.pp_schedule} with dp_shard={p.dp_shard}, tp={p.tp}: "
        "combining it with FSDP or TP is not supported yet (use gpipe or 1f1b)",
    )


def check_tp_extras(cfg: Config) -> None:
    """What sequence parallel and loss parallel need: tensor parallel to extend (and for SP
    a sequence that splits evenly; an uneven vocabulary split works)."""
    p, m = cfg.parallel, cfg.model
    for key in ("sequence_parallel", "loss_parallel"):
        if getattr(p, key):
            _require(p.tp > 1, f"parallel.{key}=true needs tensor parallel (parallel.tp>1)")
            _require(p.pp == 1, f"parallel.{key}=true is not supported with parallel.pp>1")
    _require(
        p.cp == 1 or not (p.sequence_parallel or p.loss_parallel),
        f"parallel.cp={p.cp}: context parallel with sequence/loss parallel is not supported "
        "(untested together)",
    )
    if p.sequence_parallel:
        _require(
            m.block_size % p.tp == 0,
            f"parallel.sequence_parallel=true: parallel.tp={p.tp} must divide "
            f"model.block_size={m.block_size}",
        )
        _require(
            not cfg.eval.hellaswag,
            "eval.hellaswag is not supported with parallel.sequence_parallel=true: its rows "
            "have any length, and the sequence must split evenly over the tp ranks",
        )


def with_dataset(cfg: Config) -> Config:
    """For a shard dataset: check the config against its manifest and fill in what the config
    left null (data.tokenizer, data.vocab_size, data.tokenizer_hash, model.vocab_size,
    model.eot_id). The datasets of a mixture must share one tokenizer."""
    if cfg.data.kind != "shards":
        return cfg
    folders = [s.path for s in cfg.data.mix] or [cfg.data.path]
    tok = read_manifest(folders[0])["tokenizer"]
    for other in folders[1:]:
        their = read_manifest(other)["tokenizer"]
        if their["hash"] != tok["hash"]:
            raise ConfigError(
                f"data.mix: {other} was tokenized with {their['name']} ({their['vocab_size']} "
                f"ids, hash {their['hash'][:12]}) but {folders[0]} with {tok['name']} "
                f"({tok['vocab_size']} ids, hash {tok['hash'][:12]}): the datasets of a mixture "
                "need one tokenizer (prepare them with the same tokenizer= settings)"
            )
    where = f"dataset {folders[0]}"
    if cfg.data.tokenizer not in (None, tok["name"]):
        raise ConfigError(
            f"data.tokenizer={cfg.data.tokenizer} but {where} was tokenized with {tok['name']} "
            "(leave data.tokenizer out: a dataset's manifest names its tokenizer)"
        )
    if cfg.data.vocab_size not in (None, tok["vocab_size"]):
        raise ConfigError(
            f"data.vocab_size={cfg.data.vocab_size} but {where} has {tok['vocab_size']} ids"
        )
    m = cfg.model
    if m.vocab_size is not None and m.vocab_size < tok["vocab_size"]:
        raise ConfigError(
            f"model.vocab_size={m.vocab_size} is smaller than the vocabulary of {where} "
            f"({tok['name']}, {tok['vocab_size']} ids)"
        )
    eot_id = dataset_eot_id(m, tok.get("eot_id"), where)
    data = replace(
        cfg.data, tokenizer=tok["name"], vocab_size=tok["vocab_size"], tokenizer_hash=tok["hash"]
    )
    model = replace(m, vocab_size=m.vocab_size or tok["vocab_size"], eot_id=eot_id)
    return replace(cfg, data=data, model=model)


def dataset_eot_id(m: ModelConfig, eot_id: int | None, where: str) -> int | None:
    """model.eot_id checked against (or taken from) the dataset's end-of-text id."""
    if eot_id is None:  # a manifest without one: only an explicit model.eot_id
        eot_id = m.eot_id
    elif m.eot_id not in (None, eot_id):
        raise ConfigError(f"model.eot_id={m.eot_id} but {where} ends its documents with {eot_id}")
    if m.doc_mask and eot_id is None:
        raise ConfigError(f"model.doc_mask=true: {where} records no end-of-text id")
    return eot_id


def check_inputs(cfg: Config) -> None:
    """What would otherwise fail only once the run has started (the starting weights) or at
    its first evaluation, after the work is done (the validation split)."""
    # Imported here: both modules build on this one.
    from trainer.data import build_source, has_split
    from trainer.hf import check_hf_folder

    if cfg.model.init_from:
        check_hf_folder(cfg.model.init_from, cfg.model)
    if cfg.eval.hellaswag:
        from trainer.evals.hellaswag import check_file

        try:
            check_file(cfg.eval.hellaswag, cfg.eval.hellaswag_examples)
        except DatasetError as err:
            raise ConfigError(f"eval.hellaswag: {err}") from None
    if cfg.eval.interval > 0 and has_split(cfg, "val"):  # none: the run says validation is off
        try:
            build_source(cfg, "val")
        except (DatasetError, ConfigError) as err:
            raise ConfigError(
                f"eval.interval={cfg.eval.interval}: {err} (eval.interval=0 trains without "
                "validation)"
            ) from None


def to_dict(cfg: Config) -> dict[str, Any]:
    """A plain, JSON/YAML-friendly dict of the config."""
    return dataclasses.asdict(cfg)
