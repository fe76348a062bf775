"""Sequence parallel and loss parallel on top of tensor parallel (gloo, CPU, 2 ranks): they
train like one process with the same global batch, their checkpoints move to and from one
process, document masking still holds, and sequence parallel shrinks the activations each
rank keeps for backward by the amount docs/tensor_parallel.md states.

The runs follow tests/test_distributed.py (its tiny model, 5 AdamW steps, 4 samples per step,
the same tolerances), made once for this module (`sp_runs`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from multiproc import build_training_state, run_jobs, spawn, train_worker
from test_distributed import (
    GLOBAL_BATCH,
    LLAMA,
    LOSS_ATOL,
    MODEL,
    PARAM_ATOL,
    STEPS,
    Job,
    assert_close_per_step,
    config,
    final_weights,
    parallel,
    records,
)

from trainer import checkpoint
from trainer.config import ConfigError, load_config
from trainer.run_dir import CHECKPOINTS
from trainer.train import run

pytestmark = pytest.mark.multiproc

SP = parallel("tp", sequence_parallel=True)
SP_LP = parallel("tp_sp")  # sequence parallel + loss parallel
LP = parallel("tp", loss_parallel=True)
Z_LOSS = {"z_loss": 1e-2}  # large enough that a wrong z gradient moves the losses
RESUME_AT = 3

# name -> (job, the single-process run it must match)
LAYOUTS: dict[str, Job] = {
    "tp2_sp": Job(2, SP),
    "tp2_sp_lp": Job(2, SP_LP),
    "tp2_lp_z": Job(2, LP, Z_LOSS, ref="single_z"),
    "tp2_sp_lp_z": Job(2, SP_LP, Z_LOSS, ref="single_z"),
    "llama_tp2_sp": Job(2, SP, model=LLAMA, ref="llama_single"),
    "llama_tp2_sp_lp": Job(2, SP_LP, model=LLAMA, ref="llama_single"),
}
STOPPED = {"tp2_sp_lp_stop3": Job(2, SP_LP, stop_at=RESUME_AT)}
SINGLE = {
    "single": Job(1, {}),
    "single_z": Job(1, {}, Z_LOSS),
    "llama_single": Job(1, {}, model=LLAMA),
    "single_stop3": Job(1, {}, stop_at=RESUME_AT),
}


def job_config(root: Path, name: str, job: Job) -> dict[str, Any]:
    return config(root / name, job.parallel, job.model, job.steps, job.precision, **job.train)


class Runs:
    def __init__(self, root: Path, failures: dict[str, str]):
        self.root, self.failures = root, failures

    def dir(self, name: str) -> Path:
        if name in self.failures:
            pytest.fail(f"run {name} failed: {self.failures[name]}", pytrace=False)
        return self.root / name


@pytest.fixture(scope="module")
def sp_runs(tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("sequence_parallel")
    for name, job in SINGLE.items():
        stop = None if job.stop_at is None else (lambda step, at=job.stop_at: step >= at)
        run(job_config(root, name, job), stop_requested=stop)
    group = [
        (name, job_config(root, name, job), job.stop_at)
        for name, job in {**LAYOUTS, **STOPPED}.items()
    ]
    return Runs(root, run_jobs(2, group, root / "status"))


# --- 1. they train like one process -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_losses_and_parameters_match_single_process(sp_runs, name):
    job = LAYOUTS[name]
    got, want = records(sp_runs.dir(name)), records(sp_runs.dir(job.reference))
    state = checkpoint.read_trainer_state(checkpoint.latest(sp_runs.dir(name)))
    assert state["world_size"] == 2 and state["config"]["parallel"]["tp"] == 2
    for key in ("sequence_parallel", "loss_parallel"):
        assert state["config"]["parallel"][key] == job.parallel[key], key
    assert_close_per_step(got, want, "loss", LOSS_ATOL)
    assert_close_per_step(got, want, "grad_norm", LOSS_ATOL * 10)
    assert abs(got[STEPS]["val_loss"] - want[STEPS]["val_loss"]) <= LOSS_ATOL
    got_w, want_w = final_weights(sp_runs.dir(name)), final_weights(sp_runs.dir(job.reference))
    assert got_w.keys() == want_w.keys()
    for key in want_w:
        torch.testing.assert_close(got_w[key], want_w[key], rtol=0, atol=PARAM_ATOL, msg=key)


# --- 2. checkpoints move between TP+SP and one process ------------------------------------


@pytest.mark.slow
def test_tp_sp_checkpoint_resumes_as_single_process(sp_runs, tmp_path):
    """Stopped after step 3 under TP 2 + SP + LP, resumed by one process: steps 4-5 as an
    uninterrupted single-process run."""
    run_dir = tmp_path / "resumed"
    shutil.copytree(sp_runs.dir("tp2_sp_lp_stop3"), run_dir)
    assert sorted(records(run_dir)) == [1, 2, 3]
    run(config(run_dir))
    assert checkpoint.read_trainer_state(checkpoint.latest(run_dir))["world_size"] == 1
    assert_close_per_step(records(run_dir), records(sp_runs.dir("single")), "loss", LOSS_ATOL)


@pytest.mark.slow
def test_single_process_checkpoint_resumes_as_tp_sp(sp_runs, tmp_path):
    """A one-process checkpoint continues under TP 2 + SP + LP (the tied embedding becomes
    one vocabulary-sharded DTensor): steps 4-5 as uninterrupted."""
    run_dir = tmp_path / "resumed"
    shutil.copytree(sp_runs.dir("single_stop3"), run_dir)
    spawn(2, train_worker, config(run_dir, SP_LP))
    state = checkpoint.read_trainer_state(checkpoint.latest(run_dir))
    assert (state["step"], state["world_size"]) == (STEPS, 2)
    assert_close_per_step(records(run_dir), records(sp_runs.dir("single")), "loss", LOSS_ATOL)


# --- 3. document masking and activation memory (one probe on 2 ranks) ---------------------


def probe_worker(rank: int, cfgs: dict[str, dict], out: str) -> None:
    """On 2 ranks: (a) for each config, the loss and gradients of a batch of many short
    documents (model.doc_mask) under its layout; (b) the bytes autograd saves for backward
    in one forward, per rank. Rank 0 writes them to `out` (JSON)."""
    result: dict[str, Any] = {}
    for name, cfg in cfgs.items():
        _, pm, _ = build_training_state(cfg)
        ids = document_batch(cfg)
        weights = {storage_of(p) for p in pm.module.parameters()}
        saved: dict[int, int] = {}  # storage -> bytes: a tensor saved twice counts once

        def count(t: torch.Tensor) -> torch.Tensor:
            local = t.to_local() if hasattr(t, "to_local") else t
            if storage_of(local) not in weights:  # activations only, not the weights
                saved[storage_of(local)] = local.untyped_storage().nbytes()
            return t

        with pm_loss_context(pm), torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            loss = pm.wrapped(ids[:, :-1], ids[:, 1:])
            loss.backward()
        grads = {n: full(p.grad).tolist() for n, p in pm.module.named_parameters()}
        result[name] = {"loss": loss.item(), "saved_bytes": sum(saved.values()), "grads": grads}
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def storage_of(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.untyped_storage().data_ptr()


def pm_loss_context(pm):
    from trainer.parallel.tensor_parallel import loss_context

    return loss_context(pm.loss_parallel)


def full(t: torch.Tensor) -> torch.Tensor:
    """A gradient as one process holds it, reduced to a few numbers to compare."""
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    return torch.stack([t.sum(), t.square().sum(), t.flatten()[:7].sum()])


EOT = 3


def document_batch(cfg: dict) -> torch.Tensor:
    """4 windows of block_size + 1 tokens with an end-of-text every few tokens."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(
        4, cfg["data"]["vocab_size"], (4, cfg["model"]["block_size"] + 1), generator=g
    )
    ids[torch.rand(ids.shape, generator=g) < 0.2] = EOT
    return ids


def probe_config(root: Path, layout: dict, model: dict, **extra: Any) -> dict:
    return config(root, layout, {**model, **extra})


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("probe")
    doc = {"doc_mask": True, "eot_id": EOT, "doc_positions": "reset"}
    cfgs = {
        "gpt2_tp": probe_config(root, parallel("tp"), MODEL, **doc),
        "gpt2_sp_lp": probe_config(root, SP_LP, MODEL, **doc),
        "llama_tp": probe_config(root, parallel("tp"), LLAMA, **doc),
        "llama_sp_lp": probe_config(root, SP_LP, LLAMA, **doc),
        "llama_sp": probe_config(root, SP, LLAMA, **doc),
    }
    out = root / "probe.json"
    spawn(2, probe_worker, cfgs, str(out))
    return json.loads(out.read_text())


def single_process(cfg: dict) -> dict[str, Any]:
    """The probe's loss and gradients computed by one process (same seed, same batch)."""
    _, pm, _ = build_training_state({**cfg, "parallel": {}})
    ids = document_batch(cfg)
    loss = pm.wrapped(ids[:, :-1], ids[:, 1:])
    loss.backward()
    return {
        "loss": loss.item(),
        "grads": {n: full(p.grad).tolist() for n, p in pm.module.named_parameters()},
    }
