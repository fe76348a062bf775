"""Interleaved and zero-bubble pipeline schedules (gloo, CPU, 2 ranks): several stages per rank
train like one process with the same global batch, and their checkpoints (the full model's
names) resume exactly in other layouts.

`pp_virtual_stages=2` on 2 ranks cuts the 4-block model into 4 stages of one block: rank 0 runs
stages 0 and 2 (the embeddings and block 0, block 2), rank 1 stages 1 and 3 (block 1, block 3
and the output layer). The reference runs and helpers are those of test_distributed.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from multiproc import run_jobs
from test_distributed import (
    LLAMA,
    LLAMA_TIED,
    LOSS_ATOL,
    MODEL,
    RESUME_AT,
    STEPS,
    Job,
    Runs,
    assert_close_per_step,
    assert_same_final_weights,
    config,
    job_config,
    parallel,
    records,
)
from torch.distributed.checkpoint import FileSystemReader

from trainer import checkpoint
from trainer.config import ConfigError, load_config
from trainer.parallel.pipeline import rank_stages, stage_blocks
from trainer.run_dir import CHECKPOINTS
from trainer.train import run

pytestmark = pytest.mark.multiproc


def interleaved(**overrides: Any) -> dict[str, Any]:
    return parallel("pp_interleaved", **{"pp": 2, "pp_microbatches": 2, **overrides})


def zero_bubble(**overrides: Any) -> dict[str, Any]:
    return parallel("pp_zb", **{"pp": 2, "pp_microbatches": 2, **overrides})


LAYOUTS: dict[str, Job] = {
    "interleaved": Job(2, interleaved()),
    "interleaved_mb4": Job(2, interleaved(pp_microbatches=4)),
    "interleaved_accum2": Job(2, interleaved(), {"micro_batch_size": 2, "grad_accum": 2}),
    "zero_bubble": Job(2, zero_bubble()),
    "zero_bubble_z_loss": Job(2, zero_bubble(), {"z_loss": 1e-2}, ref="single_z_loss"),
    "zero_bubble_v1": Job(2, zero_bubble(pp_virtual_stages=1)),  # ZB-H1, one stage per rank
    "llama_interleaved": Job(2, interleaved(), model=LLAMA, ref="llama_single"),
    "llama_zero_bubble": Job(2, zero_bubble(), model=LLAMA, ref="llama_single"),
    "llama_tied_interleaved": Job(2, interleaved(), model=LLAMA_TIED, ref="llama_tied_single"),
    "llama_tied_zero_bubble": Job(2, zero_bubble(), model=LLAMA_TIED, ref="llama_tied_single"),
}
STOPPED = {
    "interleaved_stop3": Job(2, interleaved(), stop_at=RESUME_AT),
    "zero_bubble_stop3": Job(2, zero_bubble(), stop_at=RESUME_AT),
}
# Resumed from step 3 of another layout's run (`resume=` its checkpoint, a fresh run dir), in
# the same process group after the run that wrote it.
RESUMED = {
    "fsdp_from_interleaved": (
        Job(2, parallel("fsdp"), {"micro_batch_size": 2}),
        "interleaved_stop3",
    ),
    "interleaved_from_single": (Job(2, interleaved()), "single_stop3"),
    "fsdp_from_zero_bubble": (
        Job(2, parallel("fsdp"), {"micro_batch_size": 2}),
        "zero_bubble_stop3",
    ),
}
SINGLE = {
    "single": Job(1, {}),
    "single_stop3": Job(1, {}, stop_at=RESUME_AT),
    "single_z_loss": Job(1, {}, {"z_loss": 1e-2}),
    "llama_single": Job(1, {}, model=LLAMA),
    "llama_tied_single": Job(1, {}, model=LLAMA_TIED),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    result = Runs(tmp_path_factory.mktemp("pipeline_schedules"))
    for name, job in SINGLE.items():  # in this process: a world of one
        stop = None if job.stop_at is None else (lambda step, at=job.stop_at: step >= at)
        run(job_config(result.root, name, job), stop_requested=stop)
    group = [
        (name, job_config(result.root, name, job), job.stop_at)
        for name, job in {**LAYOUTS, **STOPPED}.items()
    ]
    for name, (job, source) in RESUMED.items():
        cfg = job_config(result.root, name, job)
        cfg["resume"] = str(result.root / source / CHECKPOINTS / f"step_{RESUME_AT}")
        group.append((name, cfg, None))
    result.failures |= run_jobs(2, group, result.root / "status_2")
    return result


# --- the split -----------------------------------------------------------------------------


def test_looped_stages_put_first_and_last_stage_on_the_end_ranks():
    """pp=2 x 2 virtual stages: rank 0 runs 0 and 2, rank 1 runs 1 and 3 (the last)."""
    assert [rank_stages(2, 2, r) for r in (0, 1)] == [[0, 2], [1, 3]]
    assert [rank_stages(3, 2, r) for r in (0, 1, 2)] == [[0, 3], [1, 4], [2, 5]]
    # 10 blocks on 4 stages: 3, 3, 2, 2; every block exactly once
    split = [stage_blocks(10, 4, s) for s in range(4)]
    assert [len(b) for b in split] == [3, 3, 2, 2]
    assert sum(split, []) == [str(i) for i in range(10)]


# --- several stages per rank train like one process ----------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_losses_match_single_process(runs, name):
    job = LAYOUTS[name]
    got, want = records(runs.dir(name)), records(runs.dir(job.reference))
    assert len(want) == STEPS
    state = checkpoint.read_trainer_state(checkpoint.latest(runs.dir(name)))
    assert state["world_size"] == 2
    assert state["config"]["parallel"]["pp_virtual_stages"] == job.parallel["pp_virtual_stages"]
    assert_close_per_step(got, want, "loss", LOSS_ATOL)
    assert_close_per_step(got, want, "grad_norm", LOSS_ATOL * 10)
    if job.same_val_batches:
        assert abs(got[STEPS]["val_loss"] - want[STEPS]["val_loss"]) <= LOSS_ATOL


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_final_parameters_match_single_process(runs, name):
    assert_same_final_weights(runs.dir(name), runs.dir(LAYOUTS[name].reference))


@pytest.mark.slow
def test_checkpoint_holds_the_full_models_names(runs):
    """Every parameter under its one-process name, once per rank that holds it: the blocks of
    both stages of each rank, the tied weight as tok_emb (rank 0) and lm_head (rank 1)."""
    ckpt = checkpoint.latest(runs.dir("interleaved"))
    keys = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata.keys()
    model = {k.removeprefix("app.model.") for k in keys if k.startswith("app.model.")}
    assert {k.split(".")[1] for k in model if k.startswith("blocks.")} == {"0", "1", "2", "3"}
    assert {"tok_emb.weight", "lm_head.weight", "ln_f.weight"} <= model


# --- checkpoints move between layouts ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RESUMED))
def test_checkpoint_resumes_exactly_in_another_layout(runs, name):
    """Interleaved PP and zero bubble (2 ranks x 2 stages) stopped after step 3 -> FSDP 2, and
    one process stopped after step 3 -> interleaved PP: steps 4-5 as an uninterrupted
    one-process run."""
    job, source = RESUMED[name]
    state = checkpoint.read_trainer_state(checkpoint.latest(runs.dir(name)))
    assert (state["step"], state["world_size"]) == (STEPS, 2)
    assert checkpoint.read_trainer_state(runs.dir(source) / CHECKPOINTS / f"step_{RESUME_AT}")[
        "config"
    ]["parallel"]["pp_virtual_stages"] == (1 if source == "single_stop3" else 2)
    assert state["config"]["parallel"]["pp_virtual_stages"] == job.parallel["pp_virtual_stages"]
    want = records(runs.dir("single"))
    assert_close_per_step(records(runs.dir(name)), want, "loss", LOSS_ATOL, [4, 5])


@pytest.mark.slow
def test_interleaved_checkpoint_resumes_in_one_process(runs, tmp_path):
    ckpt = runs.dir("interleaved_stop3") / CHECKPOINTS / f"step_{RESUME_AT}"
    cfg = config(tmp_path / "resumed")
    cfg["resume"] = str(ckpt)
    run(cfg)
    want = records(runs.dir("single"))
    assert_close_per_step(records(tmp_path / "resumed"), want, "loss", LOSS_ATOL, [4, 5])


# --- what the schedules cannot run is refused, naming the key ------------------------------


@pytest.mark.parametrize(
    "layout, model, match",
    [
        (
            {"pp_schedule": "1f1b", "pp_virtual_stages": 2},
            MODEL,
            r"parallel\.pp_virtual_stages=2: pp_schedule=1f1b runs one stage per rank",
        ),
        (
            {"pp_schedule": "interleaved_1f1b", "pp_virtual_stages": 1},
            MODEL,
            r"parallel\.pp_virtual_stages=1: pp_schedule=interleaved_1f1b needs at least 2",
        ),
        (
            {"pp_schedule": "interleaved_1f1b", "pp_virtual_stages": 3},
            MODEL,
            r"parallel\.pp_virtual_stages=3: .* 6 stages, more than model\.n_layer=4",
        ),
        (
            {"pp_schedule": "zero_bubble", "pp_virtual_stages": 2, "pp_microbatches": 3},
            {**MODEL, "n_layer": 8},
            r"parallel\.pp_microbatches=3 must be a multiple of parallel\.pp=2",
        ),
        (
            {"pp_schedule": "zbv", "pp_virtual_stages": 2},
            MODEL,
            r"parallel\.pp_schedule=zbv: .* use zero_bubble",
        ),
        (
            {"pp_schedule": "chimera"},
            MODEL,
            r"parallel\.pp_schedule='chimera': expected one of .*interleaved_1f1b, zero_bubble",
        ),
        (
            {"pp_schedule": "interleaved_1f1b", "pp_virtual_stages": 2, "dp_shard": 2},
            MODEL,
            r"parallel\.pp_schedule=interleaved_1f1b with dp_shard=2, tp=1: .* not supported",
        ),
    ],
    ids=[
        "v2-1f1b",
        "v1-interleaved",
        "stages-over-blocks",
        "mb-not-multiple",
        "zbv",
        "unknown",
        "with-fsdp",
    ],
)
def test_bad_schedule_is_a_config_error(tmp_path, layout, model, match):
    world = 2 * layout.get("dp_shard", 1)
    cfg = config(tmp_path / "run", {"pp": 2, "pp_microbatches": 2, **layout}, model=model)
    with pytest.raises(ConfigError, match=match):
        load_config(cfg, world_size=world)


@pytest.mark.parametrize("schedule", [interleaved, zero_bubble])
@pytest.mark.parametrize("key", ["compile", "activation_checkpointing"])
def test_compile_or_recomputation_with_a_multi_stage_schedule_is_refused(tmp_path, schedule, key):
    cfg = config(tmp_path / "run", schedule(), **{key: True})
    with pytest.raises(ConfigError, match=rf"train\.{key}=true is not supported with pipeline"):
        load_config(cfg, world_size=2)


def test_presets_run_two_stages_per_rank(tmp_path):
    for name, schedule in [("pp_interleaved", "interleaved_1f1b"), ("pp_zb", "zero_bubble")]:
        cfg = load_config(config(tmp_path / "run", parallel(name)), world_size=2)
        p = cfg.parallel
        assert (p.pp, p.pp_schedule, p.pp_virtual_stages) == (2, schedule, 2), name


def test_bubble_theory_of_the_benchmark_is_the_documented_formula():
    """(pp-1)/(M+pp-1) for GPipe/1F1B, V times less idle when interleaved, and ZB-H1's
    (pp-1)(t_F + t_I - t_W) with the paper's equal unit costs (a third of 1F1B's idle)."""
    from benchmarks.pipeline_bubble import theory

    assert theory("1f1b", 1, 2, 4, {"F": 1.0, "B": 2.0}) == pytest.approx(1 / 5)
    assert theory("gpipe", 1, 4, 8, {"F": 1.0, "B": 2.0}) == pytest.approx(3 / 11)
    assert theory("interleaved_1f1b", 2, 2, 4, {"F": 1.0, "B": 2.0}) == pytest.approx(1 / 9)
    unit = {"F": 1.0, "I": 1.0, "W": 1.0}
    assert theory("zero_bubble", 1, 2, 4, unit) == pytest.approx(1 / 13)
    assert theory("zero_bubble", 1, 2, 4, {"F": 1.0, "I": 1.0, "W": 3.0}) == 0.0
