"""Distributed training on several local processes (gloo, CPU): every parallel layout trains
like one process with the same global batch, shards its state, and writes checkpoints that
load into any other layout.

The reference is a single-process run with the same model, seed and global batch (4 samples
per step: micro_batch_size 4, grad_accum 1). Every layout reads the same samples per step
(the loader hands out one global batch, split over the data-parallel ranks), so only the order
of floating-point reductions differs.

Starting processes costs ~3 s each on this 2-core machine (importing torch), so the training
runs are made once per module (`runs`), several runs per group of processes; each layout is
still its own test with its own id.
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_config
from multiproc import build_training_state, reshard_worker, run_jobs, spawn, train_worker
from omegaconf import OmegaConf
from torch.distributed.checkpoint.state_dict import get_state_dict

import cluster_configs
from jobs import export
from jobs.cli import compose_config
from trainer import checkpoint
from trainer.config import ConfigError, load_config
from trainer.run_dir import CHECKPOINTS, METRICS, read_jsonl
from trainer.train import run
from trainer.trained import load_model

pytestmark = pytest.mark.multiproc

MODEL = {"n_layer": 4, "n_head": 4, "n_embd": 64, "block_size": 32}
# llama_tiny's architecture at the same size: 4 query heads share 2 key/value heads (TP 2
# splits both), untied output layer; the tied variant exercises the pipeline's tied weight.
LLAMA = {**MODEL, "arch": "llama", "n_kv_head": 2, "tie_embeddings": False, "multiple_of": 32}
LLAMA_TIED = {**LLAMA, "tie_embeddings": True}
MEMORY_MODEL = {**MODEL, "n_embd": 128}  # bigger matrices: FSDP's padding is negligible
STEPS = 5
GLOBAL_BATCH = 4
EVAL = {"interval": STEPS, "steps": 2}  # validation once, after the last step

# Measured on CPU (fp32, 5 AdamW steps): per-step losses (and gradient norms, validation
# losses) of every layout differ from the single-process run by at most ~1e-6: the order of
# reductions (all-reduce / reduce-scatter sums, sharded matmuls, micro-batch means). 1e-5
# leaves headroom and still catches any real difference in data, scaling or synchronisation
# (those move the loss by >= 1e-3 and the gradient norm by far more).
LOSS_ATOL = 1e-5
# Final parameters after 5 AdamW steps: Adam divides by sqrt(v), which turns 1e-7-sized
# gradient differences into parameter differences up to ~1e-5 (measured: 3e-6 .. 1.3e-5);
# 1e-4 is the bound that holds on these machines.
PARAM_ATOL = 1e-4
# bf16 compute: FSDP casts the parameters to bf16 (mixed-precision policy) while one process
# autocasts; the losses agree to ~2e-4 (measured), the bound is 1e-2. The same for fp16.
HALF_LOSS_ATOL = 1e-2


@functools.cache
def preset(name: str) -> dict[str, Any]:
    """`cluster_configs/parallel/<name>.yaml` as `dlt-train parallel=<name>` composes it
    (-1 = the rest of the world; interpolations resolve in the rank that loads it)."""
    return OmegaConf.to_container(compose_config("train", [f"parallel={name}"]).parallel)


def parallel(name: str, **overrides: Any) -> dict[str, Any]:
    return {**preset(name), **overrides}


def config(
    run_dir: Path,
    parallel: dict[str, Any] | None = None,
    model: dict[str, Any] = MODEL,
    steps: int = STEPS,
    precision: str = "fp32",
    **train: Any,
) -> dict[str, Any]:
    return tiny_config(
        run_dir,
        model=dict(model),
        train={"max_steps": steps, "micro_batch_size": GLOBAL_BATCH, **train},
        parallel=parallel or {},
        precision=precision,
        eval=EVAL,
    )


@dataclass
class Job:
    world: int
    parallel: dict[str, Any]
    train: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    model: dict[str, Any] = field(default_factory=lambda: MODEL)
    steps: int = STEPS
    stop_at: int | None = None  # stop (and save) after this step
    checkpoint: dict[str, Any] = field(default_factory=dict)
    ref: str | None = None  # the single-process run it must match, when not the default

    @property
    def reference(self) -> str:  # the single-process run it must match
        if self.ref:
            return self.ref
        return "single" if self.precision == "fp32" else f"single_{self.precision}"

    @property
    def atol(self) -> float:
        return LOSS_ATOL if self.precision == "fp32" else HALF_LOSS_ATOL

    @property
    def same_val_batches(self) -> bool:
        """Validation reads micro_batch_size x dp ranks samples per batch: the reference's
        4 only without gradient accumulation."""
        return self.train.get("grad_accum", 1) == 1


# Every layout trains the global batch of 4 samples per step.
LAYOUTS: dict[str, Job] = {
    "ddp2": Job(2, parallel("ddp"), {"micro_batch_size": 2}),
    "fsdp2": Job(2, parallel("fsdp"), {"micro_batch_size": 2}),
    "fsdp4": Job(4, parallel("fsdp"), {"micro_batch_size": 1}),
    "zero2_2": Job(2, parallel("zero2"), {"micro_batch_size": 2}),
    "hsdp2x2": Job(4, parallel("hsdp", dp_replicate=2, dp_shard=2), {"micro_batch_size": 1}),
    "tp2": Job(2, parallel("tp")),
    "pp2_gpipe_mb2": Job(2, parallel("pp", pp_schedule="gpipe", pp_microbatches=2)),
    "pp2_gpipe_mb4": Job(2, parallel("pp", pp_schedule="gpipe", pp_microbatches=4)),
    "pp2_1f1b_mb2": Job(2, parallel("pp", pp_schedule="1f1b", pp_microbatches=2)),
    "pp2_1f1b_mb4": Job(2, parallel("pp", pp_schedule="1f1b", pp_microbatches=4)),
    "pp3_uneven": Job(3, parallel("pp", pp_microbatches=4)),  # 4 blocks as 2 + 1 + 1
    "fsdp2_tp2": Job(4, parallel("fsdp_tp"), {"micro_batch_size": 2}),
    "pp2_fsdp2": Job(
        4, parallel("pp", pp=2, dp_shard=2, pp_microbatches=2), {"micro_batch_size": 2}
    ),
    "pp2_tp2": Job(4, parallel("pp", pp=2, tp=2, pp_microbatches=2)),
    "fsdp2_actckpt": Job(
        2, parallel("fsdp"), {"micro_batch_size": 2, "activation_checkpointing": True}
    ),
    # gradient accumulation: 2 micro-batches of 1 sample per rank per step
    "ddp2_accum2": Job(2, parallel("ddp"), {"micro_batch_size": 1, "grad_accum": 2}),
    "fsdp2_accum2": Job(2, parallel("fsdp"), {"micro_batch_size": 1, "grad_accum": 2}),
    "tp2_accum2": Job(2, parallel("tp"), {"micro_batch_size": 2, "grad_accum": 2}),
    "pp2_accum2": Job(
        2, parallel("pp", pp_microbatches=2), {"micro_batch_size": 2, "grad_accum": 2}
    ),
    # bf16 (against the single-process bf16 run)
    "fsdp2_bf16": Job(2, parallel("fsdp"), {"micro_batch_size": 2}, "bf16"),
    "tp2_bf16": Job(2, parallel("tp"), {}, "bf16"),
    "pp2_bf16": Job(2, parallel("pp", pp_microbatches=2), {}, "bf16"),
    # fp16 with a gradient scaler: DDP only (check_layout refuses it on sharded layouts)
    "ddp2_fp16": Job(2, parallel("ddp"), {"micro_batch_size": 2}, "fp16"),
    # checkpoints written in the background while the next steps train
    "fsdp2_async": Job(
        2, parallel("fsdp"), {"micro_batch_size": 2}, checkpoint={"interval": 2, "async_save": True}
    ),
}
# The same suite for the Llama architecture (these layouts, against its own single-process
# run).
LLAMA_LAYOUTS = (
    "ddp2",
    "fsdp2",
    "zero2_2",
    "hsdp2x2",
    "tp2",
    "pp2_gpipe_mb2",
    "pp2_1f1b_mb4",
    "fsdp2_tp2",
    "pp2_tp2",
    "fsdp2_actckpt",
)
for _name in LLAMA_LAYOUTS:
    LAYOUTS[f"llama_{_name}"] = replace(LAYOUTS[_name], model=LLAMA, ref="llama_single")
LAYOUTS["llama_tied_pp2"] = Job(
    2, parallel("pp", pp_microbatches=2), model=LLAMA_TIED, ref="llama_tied_single"
)
FP32_LAYOUTS = [name for name, job in LAYOUTS.items() if job.precision == "fp32"]
MEMORY_STEPS = 3
MEMORY_LAYOUTS = {
    name: Job(
        world,
        parallel(preset_name),
        {"micro_batch_size": GLOBAL_BATCH // world},
        model=MEMORY_MODEL,
        steps=MEMORY_STEPS,
    )
    for name, world, preset_name in [
        ("mem_ddp2", 2, "ddp"),
        ("mem_fsdp2", 2, "fsdp"),
        ("mem_fsdp4", 4, "fsdp"),
    ]
}
LLAMA_MEMORY_MODEL = {**LLAMA, "n_embd": 128}
MEMORY_LAYOUTS["mem_llama_fsdp2"] = Job(
    2, parallel("fsdp"), {"micro_batch_size": 2}, model=LLAMA_MEMORY_MODEL, steps=MEMORY_STEPS
)
# Stopped after step 3 (a checkpoint with optimizer state) for the resharding tests.
RESUME_AT = 3
STOPPED = {
    "fsdp4_stop3": Job(4, parallel("fsdp"), {"micro_batch_size": 1}, stop_at=RESUME_AT),
    "llama_fsdp4_stop3": Job(
        4, parallel("fsdp"), {"micro_batch_size": 1}, model=LLAMA, stop_at=RESUME_AT
    ),
}

SINGLE = {
    "single": Job(1, {}),
    "single_bf16": Job(1, {}, precision="bf16"),
    "single_fp16": Job(1, {}, precision="fp16"),
    "mem_single": Job(1, {}, model=MEMORY_MODEL, steps=MEMORY_STEPS),
    "single_stop3": Job(1, {}, stop_at=RESUME_AT),
    "llama_single": Job(1, {}, model=LLAMA),
    "mem_llama_single": Job(1, {}, model=LLAMA_MEMORY_MODEL, steps=MEMORY_STEPS),
    "llama_tied_single": Job(1, {}, model=LLAMA_TIED),
}


def job_config(root: Path, name: str, job: Job) -> dict[str, Any]:
    cfg = config(root / name, job.parallel, job.model, job.steps, job.precision, **job.train)
    cfg["checkpoint"].update(job.checkpoint)
    return cfg


class Runs:
    """The training runs of this module: run directories by name, and which runs failed."""

    def __init__(self, root: Path):
        self.root = root
        self.failures: dict[str, str] = {}

    def dir(self, name: str) -> Path:
        if name in self.failures:
            pytest.fail(f"run {name} failed: {self.failures[name]}", pytrace=False)
        return self.root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    result = Runs(tmp_path_factory.mktemp("distributed"))
    for name, job in SINGLE.items():  # in this process: a world of one
        stop = None if job.stop_at is None else (lambda step, at=job.stop_at: step >= at)
        run(job_config(result.root, name, job), stop_requested=stop)
    jobs = {**LAYOUTS, **MEMORY_LAYOUTS, **STOPPED}
    for world in sorted({job.world for job in jobs.values()}):
        group = [
            (name, job_config(result.root, name, job), job.stop_at)
            for name, job in jobs.items()
            if job.world == world
        ]
        result.failures |= run_jobs(world, group, result.root / f"status_{world}")
    return result


def records(run_dir: Path) -> dict[int, dict[str, Any]]:
    return {r["step"]: r for r in read_jsonl(run_dir / METRICS)}


def assert_close_per_step(
    got: dict[int, dict], want: dict[int, dict], key: str, atol: float, steps=None
) -> None:
    """`got[step][key]` within `atol` of `want[step][key]` for every step of `got`, which has
    logged `steps` (all of the reference's when not given)."""
    assert sorted(got) == (sorted(want) if steps is None else steps), "logged steps differ"
    diffs = {step: abs(got[step][key] - want[step][key]) for step in got}
    assert max(diffs.values()) <= atol, f"|{key} - reference| per step: {diffs}"


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The run's final parameters as one process sees them (trainer.trained.load_model)."""
    model, _ = load_model(run_dir)
    return model.state_dict()


def assert_same_final_weights(run_dir: Path, reference_dir: Path) -> None:
    """Every final parameter of the run within PARAM_ATOL of the reference run's."""
    got, want = final_weights(run_dir), final_weights(reference_dir)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=PARAM_ATOL, msg=key)


# --- 1. every layout trains like one process --------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_losses_match_single_process(runs, name):
    job = LAYOUTS[name]
    got, want = records(runs.dir(name)), records(runs.dir(job.reference))
    assert len(want) == STEPS
    state = checkpoint.read_trainer_state(checkpoint.latest(runs.dir(name)))
    assert state["world_size"] == job.world  # really that many ranks
    sizes = [state["config"]["parallel"][k] for k in ("dp_replicate", "dp_shard", "tp", "pp")]
    assert torch.tensor(sizes).prod() == job.world, sizes
    assert_close_per_step(got, want, "loss", job.atol)
    assert_close_per_step(got, want, "grad_norm", job.atol * 10)  # norms are ~2, losses ~5.5
    if job.same_val_batches:
        assert abs(got[STEPS]["val_loss"] - want[STEPS]["val_loss"]) <= job.atol


@pytest.mark.slow
@pytest.mark.parametrize("name", FP32_LAYOUTS)
def test_final_parameters_match_single_process(runs, name):
    assert_same_final_weights(runs.dir(name), runs.dir(LAYOUTS[name].reference))


# --- 2. memory: FSDP shards the training state, DDP holds a full copy ----------------------


@pytest.mark.slow
def test_state_gib_counts_parameters_gradients_and_adam_moments(runs):
    """`state_gib` is documented as the bytes of parameters + gradients + optimizer state: in
    fp32 with AdamW (exp_avg, exp_avg_sq) 4 tensors of 4 bytes per parameter."""
    model, _ = load_model(runs.dir("mem_single"))
    n = sum(p.numel() for p in model.parameters())  # the tied embedding once
    state_gib = records(runs.dir("mem_single"))[MEMORY_STEPS]["state_gib"]
    assert state_gib == pytest.approx(4 * 4 * n / 2**30), (
        f"state_gib is {state_gib * 2**30 / n:.1f} bytes per parameter"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, shards, reference",
    [
        ("mem_fsdp2", 2, "mem_single"),
        ("mem_fsdp4", 4, "mem_single"),
        ("mem_ddp2", 1, "mem_single"),
        ("mem_llama_fsdp2", 2, "mem_llama_single"),
    ],
)
def test_state_per_rank(runs, name, shards, reference):
    """FSDP2 splits every parameter (and so its gradient and Adam moments) on dim 0 into
    `shards` chunks of ceil(rows / shards) rows: the largest rank holds at most one extra row
    per tensor. With n_embd 128 every dim 0 (128, 512, 32 positions) divides by 4 except the
    257-row token embedding (65 rows instead of 64.25 on 4 ranks: +0.4% of the model), so the
    maximum over ranks is within 1% of single / N; 10% is the bound we hold it to.
    DDP keeps a full copy on every rank: exactly the single-process bytes."""
    single = records(runs.dir(reference))[MEMORY_STEPS]["state_gib"]
    per_rank = records(runs.dir(name))[MEMORY_STEPS]["state_gib"]
    if shards == 1:
        assert per_rank == pytest.approx(single, rel=1e-9)
    else:
        assert per_rank == pytest.approx(single / shards, rel=0.10)
        assert per_rank >= single / shards  # the maximum over ranks: never below an even split


# --- 3. checkpoints move between layouts ---------------------------------------------------


def single_view(ckpt: Path, root: Path, model: dict[str, Any] = MODEL) -> tuple[dict, dict]:
    """Model and AdamW state of checkpoint `ckpt`, loaded into one process."""
    _, pm, optimizer = build_training_state(config(root / "view", model=model))
    checkpoint.load(ckpt, pm.module, optimizer)
    return get_state_dict(pm.module, optimizer)


def assert_same_state(got: tuple[dict, dict], want: tuple[dict, dict], hop: str) -> None:
    (got_model, got_optim), (want_model, want_optim) = got, want
    assert got_model.keys() == want_model.keys(), hop
    for key in want_model:
        assert torch.equal(got_model[key], want_model[key]), f"{hop}: model {key}"
    assert got_optim["state"].keys() == want_optim["state"].keys(), hop
    for key, moments in want_optim["state"].items():
        assert moments.keys() == {"step", "exp_avg", "exp_avg_sq"}, f"{hop}: {key}"
        for k, value in moments.items():
            assert torch.equal(got_optim["state"][key][k], value), f"{hop}: optimizer {key}.{k}"

    def hyper(optim: dict) -> list[dict]:
        return [{k: v for k, v in g.items() if k != "params"} for g in optim["param_groups"]]

    assert hyper(got_optim) == hyper(want_optim), hop


@pytest.mark.slow
@pytest.mark.parametrize("arch, model", [("gpt2", MODEL), ("llama", LLAMA)])
def test_checkpoint_reshards_exactly_across_layouts(runs, tmp_path, arch, model):
    """FSDP 4 -> DDP 2 -> one process -> TP 2 x FSDP 2 -> one process: each hop loads the
    previous checkpoint into its layout and saves it again; parameters and AdamW state
    (exp_avg, exp_avg_sq, step) come out bit for bit as they went in."""
    stopped = "fsdp4_stop3" if arch == "gpt2" else f"{arch}_fsdp4_stop3"
    source = runs.dir(stopped) / CHECKPOINTS / f"step_{RESUME_AT}"
    original = single_view(source, tmp_path, model)
    assert {int(s["step"]) for s in original[1]["state"].values()} == {RESUME_AT}

    def hop(world: int, layout: dict, src: Path, name: str) -> Path:
        cfg = config(tmp_path / "cfg", layout, model=model)
        if world == 1:
            reshard_worker(0, cfg, str(src), str(tmp_path / name))
        else:
            spawn(world, reshard_worker, cfg, str(src), str(tmp_path / name))
        ckpt = tmp_path / name / CHECKPOINTS / f"step_{RESUME_AT}"
        assert_same_state(single_view(ckpt, tmp_path, model), original, f"after {name}")
        return ckpt

    ckpt = hop(2, parallel("ddp"), source, "ddp2")
    ckpt = hop(1, {}, ckpt, "single1")
    ckpt = hop(4, parallel("fsdp_tp"), ckpt, "fsdp2_tp2")
    hop(1, {}, ckpt, "single2")


@pytest.mark.slow
def test_resume_fsdp4_run_as_ddp2(runs, tmp_path):
    """Stopped after step 3 on FSDP 4 and resumed on DDP 2 (other sharding, other number of
    data-parallel ranks): steps 4-5 match an uninterrupted single-process run."""
    run_dir = tmp_path / "resumed"
    shutil.copytree(runs.dir("fsdp4_stop3"), run_dir)
    assert sorted(records(run_dir)) == [1, 2, 3]
    spawn(2, train_worker, config(run_dir, parallel("ddp"), micro_batch_size=2))
    state = checkpoint.read_trainer_state(checkpoint.latest(run_dir))
    assert (state["step"], state["world_size"]) == (STEPS, 2)
    assert state["config"]["parallel"]["dp_replicate"] == 2
    # steps 1-3 were logged by the FSDP run, 4-5 by the DDP run
    assert_close_per_step(records(run_dir), records(runs.dir("single")), "loss", LOSS_ATOL)


@pytest.mark.slow
def test_resume_single_process_run_as_pp2(runs, tmp_path):
    """A one-process checkpoint continues on 2 pipeline stages: steps 4-5 as uninterrupted.

    The tied embedding is one parameter in one process but two in a pipeline (tok_emb on the
    first stage, lm_head on the last), so the last stage needs optimizer state under
    `lm_head.weight`, which only pipeline checkpoints hold."""
    run_dir = tmp_path / "resumed"
    shutil.copytree(runs.dir("single_stop3"), run_dir)
    spawn(2, train_worker, config(run_dir, parallel("pp", pp_microbatches=2)))
    assert checkpoint.read_trainer_state(checkpoint.latest(run_dir))["world_size"] == 2
    assert_close_per_step(records(run_dir), records(runs.dir("single")), "loss", LOSS_ATOL)


@pytest.mark.slow
def test_async_checkpoint_of_fsdp_run_resumes_exactly(runs, tmp_path):
    """fsdp2_async saved step 2 in the background while steps 3-4 trained: the checkpoint
    holds step 2's state (not a later one), so one process resumed from it matches."""
    ckpt = runs.dir("fsdp2_async") / CHECKPOINTS / "step_2"
    assert checkpoint.read_trainer_state(ckpt)["world_size"] == 2
    cfg = config(tmp_path / "resumed")
    cfg["resume"] = str(ckpt)
    result = run(cfg)
    assert result.resumed_from == ckpt
    want = records(runs.dir("single"))
    assert_close_per_step(records(tmp_path / "resumed"), want, "loss", LOSS_ATOL, [3, 4, 5])


# --- 4. impossible layouts fail at once, naming the key ------------------------------------


@pytest.mark.parametrize(
    "world, layout, precision, match",
    [
        (2, {"tp": 3}, "fp32", "world size 2"),
        (3, {"tp": 3}, "fp32", r"parallel\.tp=3 must divide model\.n_head=4"),
        (8, {"pp": 8}, "fp32", r"parallel\.pp=8 is larger than model\.n_layer=4"),
        (4, {"pp": 2, "dp_replicate": 2}, "fp32", "pipeline parallel with plain DDP"),
        (4, {"tp": 2, "dp_replicate": 2}, "fp32", "tensor parallel with plain DDP"),
        (2, {"dp_shard": 2}, "fp16", "precision=fp16"),
        (2, {"tp": 2}, "fp16", "precision=fp16"),
        (2, {"pp": 2, "pp_microbatches": 3}, "fp32", r"parallel\.pp_microbatches=3"),
        (4, {"dp_shard": -1, "tp": -1}, "fp32", "only one size may be -1"),
        (3, {"dp_shard": -1, "tp": 2}, "fp32", r"parallel\.dp_shard=-1: world size 3"),
    ],
    ids=[
        "product-not-world",
        "tp-not-dividing-heads",
        "pp-over-layers",
        "pp-with-ddp",
        "tp-with-ddp",
        "fp16-fsdp",
        "fp16-tp",
        "pp-microbatches-not-dividing-batch",
        "two-auto-sizes",
        "auto-size-not-dividing",
    ],
)
def test_bad_layout_is_a_config_error(tmp_path, world, layout, precision, match):
    cfg = config(tmp_path / "run", layout, precision=precision)
    with pytest.raises(ConfigError, match=match):
        load_config(cfg, world_size=world)  # the layout rules are part of the one validation


def test_tensor_parallel_must_split_the_key_value_heads_too(tmp_path):
    """Grouped-query attention: 4 query heads but 2 key/value heads cannot go on 4 ranks."""
    cfg = config(tmp_path / "run", {"tp": 4}, model=LLAMA)
    with pytest.raises(ConfigError, match=r"parallel\.tp=4 must divide the key/value heads"):
        load_config(cfg, world_size=4)
    load_config(config(tmp_path / "run", {"tp": 2}, model=LLAMA), world_size=2)


def test_bad_layout_fails_before_any_work(tmp_path, monkeypatch):
    """`run()` checks the layout before joining a process group or touching the run dir
    (there is no MASTER_ADDR: joining would fail otherwise)."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ConfigError, match=r"parallel\.tp=3"):
        run(config(tmp_path / "run", {"tp": 3}))
    assert not (tmp_path / "run").exists()


def test_every_parallel_preset_is_a_valid_layout(tmp_path):
    """The presets resolve their -1 size against a world of 4 and pass check_layout (with 8
    blocks: pp_interleaved's 4 ranks run 2 stages each)."""
    names = sorted(p.stem for p in (Path(cluster_configs.__file__).parent / "parallel").iterdir())
    assert {"single", "ddp", "fsdp", "zero2", "hsdp", "tp", "fsdp_tp", "pp", "3d"} <= set(names)
    for name in names:
        world = 1 if name == "single" else 4
        cfg = config(tmp_path / "run", preset(name), model={**MODEL, "n_layer": 8})
        cfg = load_config(cfg, world_size=world)  # + layout
        assert cfg.parallel.world_size == world, name


# --- 5. export of a sharded checkpoint -----------------------------------------------------


@pytest.mark.slow
def test_export_of_fsdp_checkpoint_is_the_single_process_view(runs, tmp_path):
    run_dir = runs.dir("fsdp2")
    export.main([f"checkpoint={run_dir}", "format=torch", f"out={tmp_path / 'out'}"])
    saved = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    want = final_weights(run_dir)
    assert saved["model"].keys() == want.keys() - {"lm_head.weight"}
    for key, value in saved["model"].items():
        assert torch.equal(value, want[key]), key
    assert saved["config"]["n_embd"] == MODEL["n_embd"]
