"""`train.compile=true` under every parallel layout (gloo, CPU): each transformer block is
compiled in place before DDP / FSDP2 wrap it (after TP, activation checkpointing and the
pipeline split), so a compiled run must train exactly like the eager run of the same layout
and like one process, and its checkpoints must move between layouts as eager ones do.

Compiling costs seconds per graph per process on CPU, so every run is made once per module
(`runs`): each layout of `LAYOUTS` runs eagerly and compiled in the same group of processes.
A new layout (sequence parallel, context parallel, another pipeline schedule) is one more line
in `LAYOUTS`; its owner's parity tests cover the eager run.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from multiproc import run_jobs, train_jobs_worker
from test_distributed import (
    LOSS_ATOL,
    MODEL,
    PARAM_ATOL,
    Job,
    Runs,
    assert_close_per_step,
    config,
    final_weights,
    job_config,
    parallel,
    preset,
    records,
)
from torch._dynamo.utils import counters

import cluster_configs
from trainer.config import ConfigError, load_config
from trainer.run_dir import CHECKPOINTS
from trainer.train import run

pytestmark = pytest.mark.multiproc

TINY = {**MODEL, "n_layer": 2}  # two blocks (one per stage under pp 2): little to compile
STEPS = 3
SAVE_AT = 2  # every run also saves this step: the resume tests start from it
DYNAMO = "dynamo_rank{rank}.json"  # what torch.compile did on a rank, written into its run dir


def layout(world: int, parallel: dict[str, Any], **train: Any) -> Job:
    """A layout trained with the global batch of 4 samples (the eager and compiled run)."""
    return Job(world, parallel, train, model=TINY, steps=STEPS, checkpoint={"interval": SAVE_AT})


# One line per layout: each runs as eager_<name> and compiled_<name>.
LAYOUTS: dict[str, Job] = {
    "ddp2": layout(2, parallel("ddp"), micro_batch_size=2),
    "fsdp2": layout(2, parallel("fsdp"), micro_batch_size=2),
    "zero2_2": layout(2, parallel("zero2"), micro_batch_size=2),
    "tp2": layout(2, parallel("tp")),
    "pp2": layout(2, parallel("pp", pp_microbatches=2)),
    "fsdp2_actckpt": layout(2, parallel("fsdp"), micro_batch_size=2, activation_checkpointing=True),
    "hsdp2x2": layout(4, parallel("hsdp", dp_replicate=2, dp_shard=2), micro_batch_size=1),
    "zero1_2": layout(2, parallel("zero1"), micro_batch_size=2),
    "cp2": layout(2, parallel("cp")),  # each sequence split over 2 ranks (FSDP over cp)
}
SINGLE = layout(1, {})
# A one-process checkpoint continued by a compiled pipeline (tied embedding split in two).
INTO_COMPILED = "compiled_pp2_from_single"


def compiled(job: Job) -> Job:
    return replace(job, train={**job.train, "compile": True})


def eager(name: str) -> str:
    """The eager run of layout `name` (of `LAYOUTS`, or "single")."""
    return "single" if name == "single" else f"eager_{name}"


def fresh_compile_state() -> None:
    """Forget all compiled code and the counters of what was compiled (as a new process)."""
    torch._dynamo.reset()
    counters.clear()


def dynamo_record() -> dict[str, Any]:
    """What torch.compile did in this process since `fresh_compile_state()`."""
    return {
        "frames_ok": counters["frames"]["ok"],  # frames turned into compiled code
        "unique_graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": dict(counters["graph_break"]),  # reason -> count
    }


def compile_jobs_worker(rank: int, jobs: list[tuple[str, dict, int | None]], status: str) -> None:
    """`train_jobs_worker`, one job at a time from a clean compile cache; each rank records
    what torch.compile did in the job's run directory."""
    for job in jobs:
        fresh_compile_state()
        train_jobs_worker(rank, [job], status)
        record = json.dumps(dynamo_record(), indent=1)
        (Path(job[1]["run"]["dir"]) / DYNAMO.format(rank=rank)).write_text(record)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    result = Runs(tmp_path_factory.mktemp("compile"))
    for name, job in {"single": SINGLE, "compiled_single": compiled(SINGLE)}.items():
        fresh_compile_state()
        run(job_config(result.root, name, job))  # in this process: a world of one
        (result.root / name / DYNAMO.format(rank=0)).write_text(json.dumps(dynamo_record()))
    fresh_compile_state()  # leave no compiled code behind for other modules
    jobs = {f"eager_{name}": job for name, job in LAYOUTS.items()}
    jobs |= {f"compiled_{name}": compiled(job) for name, job in LAYOUTS.items()}
    groups: dict[int, list] = {}
    for name, job in jobs.items():
        groups.setdefault(job.world, []).append((name, job_config(result.root, name, job), None))
    into = job_config(result.root, INTO_COMPILED, compiled(LAYOUTS["pp2"]))
    into["resume"] = str(result.root / "single" / CHECKPOINTS / f"step_{SAVE_AT}")
    groups[2].append((INTO_COMPILED, into, None))
    for world, group in sorted(groups.items()):
        status = result.root / f"status_{world}"
        result.failures |= run_jobs(world, group, status, 300.0, compile_jobs_worker)
    return result


def dynamo(run_dir: Path, rank: int) -> dict[str, Any]:
    return json.loads((run_dir / DYNAMO.format(rank=rank)).read_text())


# --- compiled = eager, in every layout ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["single", *LAYOUTS])
def test_compiled_losses_match_eager_and_one_process(runs, name):
    """Per step: loss, gradient norm and the final validation loss of the compiled run are
    those of the eager run of the same layout and of one eager process."""
    got = records(runs.dir(f"compiled_{name}"))
    for reference in {eager(name), "single"}:
        want = records(runs.dir(reference))
        assert len(want) == STEPS
        assert_close_per_step(got, want, "loss", LOSS_ATOL)
        assert_close_per_step(got, want, "grad_norm", LOSS_ATOL * 10)
        assert abs(got[STEPS]["val_loss"] - want[STEPS]["val_loss"]) <= LOSS_ATOL, reference


@pytest.mark.slow
@pytest.mark.parametrize("name", ["single", *LAYOUTS])
def test_compiled_final_parameters_match_eager_and_one_process(runs, name):
    got = final_weights(runs.dir(f"compiled_{name}"))
    for reference in {eager(name), "single"}:
        want = final_weights(runs.dir(reference))
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=PARAM_ATOL, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["single", *LAYOUTS])
def test_compiled_runs_compile_on_every_rank_without_graph_breaks(runs, name):
    """The parity above would hold trivially if compile did nothing: every rank of a compiled
    run turned frames into graphs, with no graph break (collectives stay outside the block
    graph or, under TP, are traced into it); the eager run of the layout compiled none."""
    world = SINGLE.world if name == "single" else LAYOUTS[name].world
    for rank in range(world):
        record = dynamo(runs.dir(f"compiled_{name}"), rank)
        assert record["frames_ok"] > 0 and record["unique_graphs"] > 0, (rank, record)
        # training and evaluation (another grad mode), of the blocks and, but under pipeline
        # parallel, of the head (train.compile_loss): no recompiles per step or micro-batch
        assert record["unique_graphs"] <= (2 if name.startswith("pp") else 4), (rank, record)
        assert record["graph_breaks"] == {}, (rank, record["graph_breaks"])
        assert dynamo(runs.dir(eager(name)), rank)["unique_graphs"] == 0, rank


# --- checkpoints of compiled runs move between layouts --------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_compiled_checkpoint_resumes_in_one_eager_process(runs, tmp_path, name):
    """Step 2 of a compiled run, continued by one eager process: step 3 as uninterrupted
    (compiled blocks keep their parameter names, so the checkpoint is an ordinary one)."""
    ckpt = runs.dir(f"compiled_{name}") / CHECKPOINTS / f"step_{SAVE_AT}"
    cfg = job_config(tmp_path, "resumed", SINGLE)
    cfg["resume"] = str(ckpt)
    assert run(cfg).resumed_from == ckpt
    want = records(runs.dir("single"))
    assert_close_per_step(records(tmp_path / "resumed"), want, "loss", LOSS_ATOL, [STEPS])


@pytest.mark.slow
def test_one_process_checkpoint_resumes_in_a_compiled_pipeline(runs):
    """One eager process's step 2 continued on 2 compiled pipeline stages: step 3 as
    uninterrupted."""
    got, want = records(runs.dir(INTO_COMPILED)), records(runs.dir("single"))
    assert_close_per_step(got, want, "loss", LOSS_ATOL, [STEPS])
    assert dynamo(runs.dir(INTO_COMPILED), 0)["unique_graphs"] > 0


# --- no layout refuses compile ----------------------------------------------------------------


def test_every_parallel_preset_accepts_compile(tmp_path):
    names = sorted(p.stem for p in (Path(cluster_configs.__file__).parent / "parallel").iterdir())
    multi_stage = {"pp_interleaved", "pp_zb"}  # several stages per rank: refused (one line)
    for name in names:
        world = 1 if name == "single" else 2 if name in multi_stage else 4
        cfg = config(tmp_path / "run", preset(name), compile=True)  # 4 blocks: pp=4 fits
        if name in multi_stage:
            with pytest.raises(ConfigError, match="train.compile=true is not supported with pipe"):
                load_config(cfg, world_size=world)
        else:
            assert load_config(cfg, world_size=world).train.compile, name
