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

import json
import shutil
from dataclasses import dataclass, field
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
from trainer import checkpoint
from trainer.config import ConfigError, load_config
from trainer.generate import load_model
from trainer.parallel import check_layout
from trainer.train import run

pytestmark = pytest.mark.multiproc

MODEL = {"n_layer": 4, "n_head": 4, "n_embd": 64, "block_size": 32}
MEMORY_MODEL = {**MODEL, "n_embd": 128}  # bigger matrices: FSDP's padding is negligible
STEPS = 5
GLOBAL_BATCH = 4

# Measured on CPU (fp32, 5 AdamW steps): per-step losses of every layout differ from the
# single-process run by at most ~1e-6 (reduction order: all-reduce / reduce-scatter sums,
# sharded matmuls, micro-batch means); 1e-5 leaves headroom and still catches any real
# difference in data, scaling or synchronisation (those move the loss by >= 1e-3).
LOSS_ATOL = 1e-5
# Final parameters after 5 AdamW steps: Adam divides by sqrt(v), which amplifies 1e-7-sized
# gradient differences in near-zero gradients to ~lr * 1e-2; 1e-4 is what was measured to hold.
PARAM_ATOL = 1e-4
# bf16 compute: FSDP casts the parameters to bf16 (mixed-precision policy) while one process
# autocasts; the losses agree to a few 1e-3.
BF16_LOSS_ATOL = 1e-2


def preset(name: str, **overrides: Any) -> dict[str, Any]:
    """A `cluster_configs/parallel/<name>.yaml` preset (-1 = the rest of the world)."""
    folder = Path(cluster_configs.__file__).parent / "parallel"
    return {**OmegaConf.to_container(OmegaConf.load(folder / f"{name}.yaml")), **overrides}


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
    reference: str = "single"  # the single-process run it must match


# Every layout trains the global batch of 4 samples per step.
LAYOUTS: dict[str, Job] = {
    "ddp2": Job(2, preset("ddp"), {"micro_batch_size": 2}),
    "fsdp2": Job(2, preset("fsdp"), {"micro_batch_size": 2}),
    "fsdp4": Job(4, preset("fsdp"), {"micro_batch_size": 1}),
    "zero2_2": Job(2, preset("zero2"), {"micro_batch_size": 2}),
    "hsdp2x2": Job(4, {"dp_replicate": 2, "dp_shard": 2}, {"micro_batch_size": 1}),
    "tp2": Job(2, preset("tp")),
    "pp2_gpipe_mb2": Job(2, preset("pp", pp_schedule="gpipe", pp_microbatches=2)),
    "pp2_gpipe_mb4": Job(2, preset("pp", pp_schedule="gpipe", pp_microbatches=4)),
    "pp2_1f1b_mb2": Job(2, preset("pp", pp_schedule="1f1b", pp_microbatches=2)),
    "pp2_1f1b_mb4": Job(2, preset("pp", pp_schedule="1f1b", pp_microbatches=4)),
    "fsdp2_tp2": Job(4, preset("fsdp_tp"), {"micro_batch_size": 2}),
    "pp2_fsdp2": Job(4, {"pp": 2, "dp_shard": 2, "pp_microbatches": 2}, {"micro_batch_size": 2}),
    "pp2_tp2": Job(4, {"pp": 2, "tp": 2, "pp_microbatches": 2}),
    "fsdp2_actckpt": Job(
        2, preset("fsdp"), {"micro_batch_size": 2, "activation_checkpointing": True}
    ),
    "ddp2_accum2": Job(2, preset("ddp"), {"micro_batch_size": 1, "grad_accum": 2}),
    "fsdp2_accum2": Job(2, preset("fsdp"), {"micro_batch_size": 1, "grad_accum": 2}),
}
BF16_LAYOUTS = {
    "fsdp2_bf16": Job(2, preset("fsdp"), {"micro_batch_size": 2}, "bf16", reference="single_bf16")
}
MEMORY_STEPS = 3
MEMORY_LAYOUTS = {
    name: Job(world, parallel, {"micro_batch_size": GLOBAL_BATCH // world}, "fp32", MEMORY_MODEL)
    for name, world, parallel in [
        ("mem_ddp2", 2, preset("ddp")),
        ("mem_fsdp2", 2, preset("fsdp")),
        ("mem_fsdp4", 4, preset("fsdp")),
    ]
}
for job in MEMORY_LAYOUTS.values():
    job.steps = MEMORY_STEPS
# Stopped after step 3 (a checkpoint with optimizer state) for the resharding tests.
STOPPED = {"fsdp4_stop3": Job(4, preset("fsdp"), {"micro_batch_size": 1}, stop_at=3)}
RESUME_AT = 3

SINGLE = {
    "single": Job(1, {}),
    "single_bf16": Job(1, {}, precision="bf16"),
    "mem_single": Job(1, {}, model=MEMORY_MODEL, steps=MEMORY_STEPS),
}


def job_config(root: Path, name: str, job: Job) -> dict[str, Any]:
    return config(root / name, job.parallel, job.model, job.steps, job.precision, **job.train)


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
        run(job_config(result.root, name, job))
    parallel = {**LAYOUTS, **BF16_LAYOUTS, **MEMORY_LAYOUTS, **STOPPED}
    for world in sorted({job.world for job in parallel.values()}):
        jobs = [
            (name, job_config(result.root, name, job), job.stop_at)
            for name, job in parallel.items()
            if job.world == world
        ]
        result.failures |= run_jobs(world, jobs, result.root / f"status_{world}")
    return result


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def last_record(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def assert_losses_match(got: dict[int, float], want: dict[int, float], atol: float) -> None:
    assert sorted(got) == sorted(want), "logged steps differ"
    diffs = {step: abs(got[step] - want[step]) for step in want}
    assert max(diffs.values()) <= atol, f"|loss - reference| per step: {diffs}"


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The run's final parameters as one process sees them (trainer.generate.load_model)."""
    model, _ = load_model(run_dir)
    return model.state_dict()


# --- 1. every layout trains like one process --------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", [*LAYOUTS, *BF16_LAYOUTS])
def test_losses_match_single_process(runs, name):
    job = {**LAYOUTS, **BF16_LAYOUTS}[name]
    atol = BF16_LOSS_ATOL if job.precision == "bf16" else LOSS_ATOL
    want = losses(runs.dir(job.reference))
    assert len(want) == STEPS
    assert_losses_match(losses(runs.dir(name)), want, atol)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_final_parameters_match_single_process(runs, name):
    got, want = final_weights(runs.dir(name)), final_weights(runs.dir("single"))
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=PARAM_ATOL, msg=key)


# --- 2. memory: FSDP shards the training state, DDP holds a full copy ----------------------


@pytest.mark.slow
def test_single_process_state_counts_parameters_gradients_and_adam_moments(runs):
    """`state_gib` is documented as parameters + gradients + optimizer state: in fp32 with
    AdamW (exp_avg, exp_avg_sq), 4 tensors of 4 bytes per parameter."""
    model, _ = load_model(runs.dir("mem_single"))
    n = sum(p.numel() for p in model.parameters())  # the tied embedding once
    assert last_record(runs.dir("mem_single"))["state_gib"] == pytest.approx(4 * 4 * n / 2**30)


@pytest.mark.slow
@pytest.mark.parametrize("name, shards", [("mem_fsdp2", 2), ("mem_fsdp4", 4), ("mem_ddp2", 1)])
def test_state_per_rank(runs, name, shards):
    """FSDP2 splits every parameter (and so its gradient and Adam moments) on dim 0 into
    `shards` chunks of ceil(rows / shards) rows; the largest rank holds at most one extra row
    per tensor. With n_embd 128 every dim 0 (128, 3*128... and 32 positions) divides by 4
    except the 257-row embedding (65 rows instead of 64.25 on 4 ranks: +0.4% of the model), so
    the maximum over ranks is within 1% of single / N; 10% is the bound we hold it to.
    DDP keeps a full copy on every rank: exactly the single-process bytes."""
    single = last_record(runs.dir("mem_single"))["state_gib"]
    per_rank = last_record(runs.dir(name))["state_gib"]
    if shards == 1:
        assert per_rank == pytest.approx(single, rel=1e-9)
    else:
        assert per_rank == pytest.approx(single / shards, rel=0.10)
        assert per_rank >= single / shards  # the maximum over ranks: never below an even split


# --- 3. checkpoints move between layouts ---------------------------------------------------


def single_view(ckpt: Path, root: Path) -> tuple[dict, dict]:
    """Model and AdamW state of checkpoint `ckpt`, loaded into one process."""
    _, pm, optimizer = build_training_state(config(root / "view"))
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
    strip = [{k: v for k, v in g.items() if k != "params"} for g in want_optim["param_groups"]]
    assert [
        {k: v for k, v in g.items() if k != "params"} for g in got_optim["param_groups"]
    ] == strip, hop


@pytest.mark.slow
def test_checkpoint_reshards_exactly_across_layouts(runs, tmp_path):
    """FSDP 4 -> DDP 2 -> one process -> TP 2 x FSDP 2 -> one process: each hop loads the
    previous checkpoint into its layout and saves it again; parameters and AdamW state
    (exp_avg, exp_avg_sq, step) come out bit for bit as they went in."""
    source = runs.dir("fsdp4_stop3") / "checkpoints" / f"step_{RESUME_AT}"
    original = single_view(source, tmp_path)
    assert int(next(iter(original[1]["state"].values()))["step"]) == RESUME_AT

    def hop(world: int, parallel: dict, src: Path, name: str) -> Path:
        cfg = config(tmp_path / "cfg", parallel)
        if world == 1:
            reshard_worker(0, cfg, str(src), str(tmp_path / name))
        else:
            spawn(world, reshard_worker, cfg, str(src), str(tmp_path / name))
        ckpt = tmp_path / name / "checkpoints" / f"step_{RESUME_AT}"
        assert_same_state(single_view(ckpt, tmp_path), original, f"after {name}")
        return ckpt

    ckpt = hop(2, preset("ddp"), source, "ddp2")
    ckpt = hop(1, {}, ckpt, "single1")
    ckpt = hop(4, preset("fsdp_tp"), ckpt, "fsdp2_tp2")
    hop(1, {}, ckpt, "single2")


@pytest.mark.slow
def test_resume_fsdp4_run_as_ddp2(runs, tmp_path):
    """Stopped after step 3 on FSDP 4 and resumed on DDP 2 (other sharding, other number of
    data-parallel ranks): steps 4-5 match an uninterrupted single-process run."""
    run_dir = tmp_path / "resumed"
    shutil.copytree(runs.dir("fsdp4_stop3"), run_dir)
    assert sorted(losses(run_dir)) == [1, 2, 3]
    spawn(2, train_worker, config(run_dir, preset("ddp"), micro_batch_size=2))
    state = checkpoint.read_trainer_state(checkpoint.latest(run_dir))
    assert (state["step"], state["world_size"]) == (STEPS, 2)
    assert state["config"]["parallel"]["dp_replicate"] == 2
    want = losses(runs.dir("single"))
    got = losses(run_dir)  # steps 1-3 logged by the FSDP run, 4-5 by the DDP run
    assert_losses_match(got, want, LOSS_ATOL)


# --- 4. impossible layouts fail at once, naming the key ------------------------------------


@pytest.mark.parametrize(
    "world, parallel, model, precision, match",
    [
        (2, {"tp": 3}, MODEL, "fp32", "world size 2"),
        (3, {"tp": 3}, MODEL, "fp32", r"parallel\.tp=3 must divide model\.n_head=4"),
        (8, {"pp": 8}, MODEL, "fp32", r"parallel\.pp=8 is larger than model\.n_layer=4"),
        (4, {"pp": 2, "dp_replicate": 2}, MODEL, "fp32", "pipeline parallel with plain DDP"),
        (4, {"tp": 2, "dp_replicate": 2}, MODEL, "fp32", "tensor parallel with plain DDP"),
        (2, {"dp_shard": 2}, MODEL, "fp16", "precision=fp16"),
        (2, {"tp": 2}, MODEL, "fp16", "precision=fp16"),
        (2, {"pp": 2, "pp_microbatches": 3}, MODEL, "fp32", r"parallel\.pp_microbatches=3"),
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
    ],
)
def test_bad_layout_is_a_config_error(tmp_path, world, parallel, model, precision, match):
    cfg = config(tmp_path / "run", parallel, model, precision=precision)
    with pytest.raises(ConfigError, match=match):
        check_layout(load_config(cfg, world_size=world))


def test_bad_layout_fails_before_any_work(tmp_path, monkeypatch):
    """`run()` checks the layout before joining a process group or touching the run dir (no
    MASTER_ADDR here: joining would fail differently)."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    cfg = config(tmp_path / "run", {"tp": 3})
    with pytest.raises(ConfigError, match=r"parallel\.tp=3"):
        run(cfg)
    assert not (tmp_path / "run").exists()


def test_every_parallel_preset_is_a_valid_layout(tmp_path):
    """The presets resolve their -1 size against a world of 4 and pass check_layout."""
    folder = Path(cluster_configs.__file__).parent / "parallel"
    for path in sorted(folder.glob("*.yaml")):
        world = 1 if path.stem == "single" else 4
        cfg = load_config(config(tmp_path / "run", preset(path.stem)), world_size=world)
        check_layout(cfg)
        assert cfg.parallel.world_size == world, path.stem


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
