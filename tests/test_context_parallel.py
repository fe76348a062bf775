"""Context parallel (gloo, CPU): each sequence split over `parallel.cp` ranks trains like one
process with the same global batch (GPT-2 and Llama; with FSDP and TP), and its checkpoints
continue in other layouts and back.

Every CP rank of a group reads the same 4 samples per step and keeps its part of each
32-token sequence (rank r: chunks r and 2*cp-1-r of 2*cp). The references are single-process
runs of the same model, seed and batch; the bounds are test_distributed.py's.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from multiproc import run_jobs
from test_distributed import (
    LLAMA,
    LOSS_ATOL,
    MODEL,
    PARAM_ATOL,
    STEPS,
    Job,
    Runs,
    assert_close_per_step,
    assert_same_final_weights,
    config,
    final_weights,
    job_config,
    parallel,
    records,
)

from trainer import checkpoint
from trainer.config import ConfigError, load_config
from trainer.parallel.context_parallel import local_positions
from trainer.train import run

pytestmark = pytest.mark.multiproc

RESUME_AT = 3
SINGLE = {
    "single": Job(1, {}),
    "llama_single": Job(1, {}, model=LLAMA),
    "single_stop3": Job(1, {}, stop_at=RESUME_AT),
}
LAYOUTS = {  # every one trains the global batch of 4 samples per step
    "cp2": Job(2, parallel("cp")),
    "llama_cp2": Job(2, parallel("cp"), model=LLAMA, ref="llama_single"),
    "cp2_actckpt": Job(2, parallel("cp"), {"activation_checkpointing": True}),
    "cp4": Job(4, parallel("cp")),  # 8 chunks of 4 tokens
    "cp2_fsdp2": Job(4, parallel("cp", cp=2, dp_shard=2), {"micro_batch_size": 2}),
    "cp2_tp2": Job(4, parallel("cp", cp=2, tp=2)),
    # HSDP: parameters sharded over cp, replicated over dp_replicate
    "cp2_hsdp": Job(4, parallel("cp", cp=2, dp_replicate=2), {"micro_batch_size": 2}),
}
STOPPED = {"cp2_stop3": Job(2, parallel("cp"), stop_at=RESUME_AT)}
# A copy of single_stop3's run directory, continued on 2 CP ranks (resume=auto).
RESUMED_AS_CP2 = "single_stop3_as_cp2"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    result = Runs(tmp_path_factory.mktemp("context_parallel"))
    for name, job in SINGLE.items():  # in this process: a world of one
        stop = None if job.stop_at is None else (lambda step, at=job.stop_at: step >= at)
        run(job_config(result.root, name, job), stop_requested=stop)
    shutil.copytree(result.root / "single_stop3", result.root / RESUMED_AS_CP2)
    jobs = {**LAYOUTS, **STOPPED}
    for world in (2, 4):
        group = [
            (name, job_config(result.root, name, job), job.stop_at)
            for name, job in jobs.items()
            if job.world == world
        ]
        if world == 2:
            group.append(
                (RESUMED_AS_CP2, config(result.root / RESUMED_AS_CP2, parallel("cp")), None)
            )
        result.failures |= run_jobs(world, group, result.root / f"status_{world}")
    return result


# --- the split ------------------------------------------------------------------------------


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_split_covers_the_sequence_and_balances_the_work(cp):
    """The ranks' tokens are the whole sequence, each once; each rank holds T/cp of them, and
    every rank's causal attention scores the same number of (query, key) pairs: a token at
    position t sees t + 1 keys (without the mirrored tail, rank 0 would score the fewest)."""
    T = 32
    parts = [local_positions(T, r, cp, torch.device("cpu")) for r in range(cp)]
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(T))
    assert {len(p) for p in parts} == {T // cp}
    assert len({int((p + 1).sum()) for p in parts}) == 1


# --- every layout trains like one process ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_losses_match_single_process(runs, name):
    job = LAYOUTS[name]
    got, want = records(runs.dir(name)), records(runs.dir(job.reference))
    state = checkpoint.read_trainer_state(checkpoint.latest(runs.dir(name)))
    assert (state["world_size"], state["config"]["parallel"]["cp"]) == (
        job.world,
        job.parallel["cp"] if job.parallel["cp"] > 0 else job.world,
    )
    assert_close_per_step(got, want, "loss", LOSS_ATOL)
    assert_close_per_step(got, want, "grad_norm", LOSS_ATOL * 10)
    assert abs(got[STEPS]["val_loss"] - want[STEPS]["val_loss"]) <= LOSS_ATOL


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_final_parameters_match_single_process(runs, name):
    assert_same_final_weights(runs.dir(name), runs.dir(LAYOUTS[name].reference))


# --- checkpoints move into and out of CP layouts --------------------------------------------


@pytest.mark.slow
def test_cp2_checkpoint_resumes_as_one_process(runs, tmp_path):
    """Stopped after step 3 on 2 CP ranks, continued by one process: steps 4-5 as if
    uninterrupted (steps 1-3 were logged by the CP run)."""
    run_dir = tmp_path / "resumed"
    shutil.copytree(runs.dir("cp2_stop3"), run_dir)
    assert sorted(records(run_dir)) == [1, 2, 3]
    result = run(config(run_dir))
    assert result.resumed_from == run_dir / "checkpoints" / f"step_{RESUME_AT}"
    assert_close_per_step(records(run_dir), records(runs.dir("single")), "loss", LOSS_ATOL)
    final = final_weights(run_dir)
    for key, value in final_weights(runs.dir("single")).items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=PARAM_ATOL, msg=key)


@pytest.mark.slow
def test_single_process_checkpoint_resumes_as_cp2(runs):
    """One process's step-3 checkpoint continued on 2 CP ranks: steps 4-5 as uninterrupted."""
    run_dir = runs.dir(RESUMED_AS_CP2)
    state = checkpoint.read_trainer_state(checkpoint.latest(run_dir))
    assert (state["step"], state["world_size"], state["config"]["parallel"]["cp"]) == (STEPS, 2, 2)
    assert_close_per_step(records(run_dir), records(runs.dir("single")), "loss", LOSS_ATOL)


# --- layouts context parallel refuses, naming the key ---------------------------------------


@pytest.mark.parametrize(
    "world, layout, model, match",
    [
        (3, {"cp": 3}, {}, r"parallel\.cp=3: model\.block_size=32 must be divisible by 2\*cp=6"),
        (4, {"cp": 2, "pp": 2}, {}, r"parallel\.cp=2: .* pipeline parallel"),
        (2, {"cp": 2}, {"doc_mask": True, "eot_id": 0}, r"parallel\.cp=2: .* model\.doc_mask"),
        (2, {"cp": 2}, {"dropout": 0.1}, r"parallel\.cp=2: .* model\.dropout=0\.1"),
        (2, {"cp": 0}, {}, r"parallel\.cp=0: must be a positive number"),
        (4, {"cp": 2}, {}, r"dp_replicate\*dp_shard\*cp\*tp\*pp = 2 must equal the world size 4"),
    ],
    ids=["block-size", "pp", "doc-mask", "dropout", "zero", "world-size"],
)
def test_bad_context_parallel_layout_is_a_config_error(tmp_path, world, layout, model, match):
    cfg = config(tmp_path / "run", layout, model={**MODEL, **model})
    with pytest.raises(ConfigError, match=match):
        load_config(cfg, world_size=world)


def test_cp_preset_takes_the_whole_world(tmp_path):
    cfg = load_config(config(tmp_path / "run", parallel("cp")), world_size=4)
    assert (cfg.parallel.cp, cfg.parallel.dp_size, cfg.parallel.world_size) == (4, 1, 4)


def test_context_parallel_refuses_hellaswag_during_training(tmp_path):
    cfg = config(tmp_path / "run", {"cp": 2})
    cfg["data"] = {"kind": "shards", "path": str(tmp_path / "data")}  # load_config reads no file
    cfg["eval"] = {"interval": 5, "hellaswag": str(tmp_path / "hellaswag.jsonl")}
    with pytest.raises(ConfigError, match=r"parallel\.cp=2: .* eval\.hellaswag"):
        load_config(cfg, world_size=2)
