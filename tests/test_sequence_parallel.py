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
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from multiproc import build_training_state, run_jobs, spawn, train_worker
from test_distributed import (
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
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.tensor import DTensor

from trainer import checkpoint
from trainer.config import ConfigError, check_layout, load_config
from trainer.train import run

pytestmark = pytest.mark.multiproc

SP = parallel("tp", sequence_parallel=True)
SP_LP = parallel("tp_sp")  # sequence parallel + loss parallel
LP = parallel("tp", loss_parallel=True)
Z_LOSS = {"z_loss": 1e-2}  # large enough that a wrong z gradient moves the losses
RESUME_AT = 3

# each against the single-process run of its `ref` ("single" by default)
LAYOUTS: dict[str, Job] = {
    "tp2_sp": Job(2, SP),
    "tp2_lp_z": Job(2, LP, Z_LOSS, ref="single_z"),
    "tp2_sp_lp_z": Job(2, SP_LP, Z_LOSS, ref="single_z"),
    "llama_tp2_sp": Job(2, SP, model=LLAMA, ref="llama_single"),
    "llama_tp2_sp_lp": Job(2, SP_LP, model=LLAMA, ref="llama_single"),
    # train.compile=true: each block compiled after TP + SP (the DTensor ops traced)
    "tp2_sp_lp_compile": Job(2, SP_LP, {"compile": True}),
    "llama_tp2_sp_lp_actckpt": Job(
        2, SP_LP, {"activation_checkpointing": True}, model=LLAMA, ref="llama_single"
    ),
    # 2-D: FSDP shards the TP (+ SP + LP) slices, the tied vocabulary-sharded weight too
    "fsdp2_tp2_sp_lp": Job(4, {**SP_LP, "dp_shard": 2, "tp": 2}, {"micro_batch_size": 2}),
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
    jobs = {**LAYOUTS, **STOPPED}
    failures: dict[str, str] = {}
    for world in sorted({job.world for job in jobs.values()}):
        group = [
            (name, job_config(root, name, job), job.stop_at)
            for name, job in jobs.items()
            if job.world == world
        ]
        failures |= run_jobs(world, group, root / f"status_{world}")
    return Runs(root, failures)


# --- 1. they train like one process -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_losses_and_parameters_match_single_process(sp_runs, name):
    job = LAYOUTS[name]
    got, want = records(sp_runs.dir(name)), records(sp_runs.dir(job.reference))
    state = checkpoint.read_trainer_state(checkpoint.latest(sp_runs.dir(name)))
    assert state["world_size"] == job.world and state["config"]["parallel"]["tp"] == 2
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
    """On 2 ranks, for each config: the loss and gradients of a batch of many short
    documents (model.doc_mask), and the bytes of activations autograd saved for backward
    on this rank. Rank 0 writes them to `out` (JSON)."""
    result = {name: probe_one(cfg) for name, cfg in cfgs.items()}
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def probe_one(cfg: dict) -> dict[str, Any]:
    """One forward + backward of `document_batch` under `cfg`'s layout."""
    _, pm, _ = build_training_state(cfg)
    ids = document_batch(cfg)
    weights = {storage_of(p) for p in pm.module.parameters()}
    saved: dict[int, int] = {}  # storage -> bytes: a tensor saved twice counts once

    def count(t: torch.Tensor) -> torch.Tensor:
        if storage_of(t) not in weights:  # activations only, not the weights
            saved[storage_of(t)] = local_tensor(t).untyped_storage().nbytes()
        return t

    from trainer.parallel.tensor_parallel import loss_context

    with loss_context(pm.loss_parallel):
        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            loss = pm.wrapped(ids[:, :-1], ids[:, 1:])
        loss.backward()
    grads = {n: summary(p.grad) for n, p in pm.module.named_parameters()}
    return {"loss": loss.item(), "saved_bytes": sum(saved.values()), "grads": grads}


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """What this rank holds of `t`: a DTensor's local shard, a pending collective's buffer."""
    t = t.to_local() if isinstance(t, DTensor) else t
    return t.elem if isinstance(t, AsyncCollectiveTensor) else t


def storage_of(t: torch.Tensor) -> int:
    return local_tensor(t).untyped_storage().data_ptr()


def summary(t: torch.Tensor) -> list[float]:
    """A gradient as one process holds it, reduced to a few numbers to compare."""
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    return torch.stack([t.sum(), t.square().sum(), t.flatten()[:7].sum()]).tolist()


EOT = 3


def document_batch(cfg: dict) -> torch.Tensor:
    """4 windows of block_size + 1 tokens with an end-of-text every few tokens."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(
        4, cfg["data"]["vocab_size"], (4, cfg["model"]["block_size"] + 1), generator=g
    )
    ids[torch.rand(ids.shape, generator=g) < 0.2] = EOT
    return ids


DOC_MASK = {"doc_mask": True, "eot_id": EOT, "doc_positions": "reset"}
PROBES = {
    "gpt2_tp": (parallel("tp"), MODEL),
    "gpt2_sp": (SP, MODEL),
    "gpt2_sp_lp": (SP_LP, MODEL),
    "llama_tp": (parallel("tp"), LLAMA),
    "llama_sp": (SP, LLAMA),
    "llama_sp_lp": (SP_LP, LLAMA),
}


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("probe")
    cfgs = {
        name: config(root / name, layout, {**model, **DOC_MASK})
        for name, (layout, model) in PROBES.items()
    }
    out = root / "probe.json"
    spawn(2, probe_worker, cfgs, str(out))
    return json.loads(out.read_text())


def single_process(model: dict, root: Path, doc_mask: bool = True) -> dict[str, Any]:
    """What `probe_one` finds, computed by one process (same seed, same batch)."""
    masking = DOC_MASK if doc_mask else {"doc_mask": False, "doc_positions": "continue"}
    cfg = config(root, {}, {**model, **masking})
    _, pm, _ = build_training_state(cfg)
    ids = document_batch(cfg)
    loss = pm.wrapped(ids[:, :-1], ids[:, 1:])
    loss.backward()
    return {
        "loss": loss.item(),
        "grads": {n: summary(p.grad) for n, p in pm.module.named_parameters()},
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in PROBES if "_sp" in n])
def test_doc_mask_under_sequence_parallel_matches_single_process(probe, name, tmp_path):
    """Windows of many short documents (an EOT every ~5 tokens, positions restarting per
    document): the document ids come from the whole token ids at the model's entry and
    attention runs on the whole sequence, so TP + SP computes one process's loss and
    gradients."""
    model = PROBES[name][1]
    want, got = single_process(model, tmp_path), probe[name]
    assert abs(got["loss"] - want["loss"]) <= LOSS_ATOL
    without_mask = single_process(model, tmp_path, doc_mask=False)
    # the mask matters in this batch: without it the gradients are others
    changed = [
        k
        for k, v in want["grads"].items()
        if v != pytest.approx(without_mask["grads"][k], rel=1e-2)
    ]
    assert len(changed) > len(want["grads"]) // 2, changed
    assert got["grads"].keys() == want["grads"].keys()
    for key, value in want["grads"].items():
        torch.testing.assert_close(
            torch.tensor(got["grads"][key]), torch.tensor(value), rtol=1e-4, atol=1e-6, msg=key
        )


def norm_saved_bytes_per_token(arch: str, d: int) -> int:
    """What autograd keeps of one token in one norm (fp32): LayerNorm its input, mean and
    1/std; our RMSNorm its input, the normalised input and 1/rms."""
    return 4 * (d + 2 if arch == "gpt2" else 2 * d + 1)


@pytest.mark.slow
@pytest.mark.parametrize("arch, model", [("gpt2", MODEL), ("llama", LLAMA)])
def test_sequence_and_loss_parallel_activation_memory_per_rank(probe, arch, model):
    """Bytes of activations saved for backward on a rank (one forward, 4 x 32 tokens):

    - SP keeps only T / tp tokens of every norm's saved tensors (2 per block + the final
      one): it saves (1 - 1/tp) of them. The tensors saved inside attention and the MLP do not
      shrink: a column-parallel layer keeps its all-gathered (whole-sequence) input.
    - LP keeps the log-probabilities of V / tp vocabulary columns (rank 0: ceil(257 / 2) =
      129) instead of all V.

    The measured differences are these formulas (docs/tensor_parallel.md)."""
    tokens, tp, vocab = 4 * model["block_size"], 2, 257
    norms = 2 * model["n_layer"] + 1
    sp_saves = norms * norm_saved_bytes_per_token(arch, model["n_embd"]) * tokens * (1 - 1 / tp)
    lp_saves = 4 * tokens * (vocab - -(-vocab // tp))
    tp_bytes, sp_bytes = probe[f"{arch}_tp"]["saved_bytes"], probe[f"{arch}_sp"]["saved_bytes"]
    assert tp_bytes - sp_bytes == pytest.approx(sp_saves, rel=0.01)
    assert sp_bytes - probe[f"{arch}_sp_lp"]["saved_bytes"] == pytest.approx(lp_saves, rel=0.01)


# --- 4. what they need --------------------------------------------------------------------


@pytest.mark.parametrize(
    "world, layout, model, match",
    [
        (1, {"sequence_parallel": True}, MODEL, r"^parallel\.sequence_parallel=true needs tensor"),
        (2, {"dp_shard": 2, "loss_parallel": True}, MODEL, r"^parallel\.loss_parallel=true needs"),
        (
            2,
            {"tp": 2, "sequence_parallel": True},
            {**MODEL, "block_size": 31},
            r"must divide model\.block_size=31",
        ),
        (
            4,
            {"tp": 2, "pp": 2, "loss_parallel": True},
            MODEL,
            r"^parallel\.loss_parallel=true is not supported with parallel\.pp>1",
        ),
        (
            4,
            {"tp": 2, "pp": 2, "sequence_parallel": True},
            MODEL,
            r"^parallel\.sequence_parallel=true is not supported with parallel\.pp>1",
        ),
    ],
    ids=["sp-without-tp", "lp-without-tp", "sp-uneven-sequence", "lp-with-pp", "sp-with-pp"],
)
def test_sequence_and_loss_parallel_refusals(tmp_path, world, layout, model, match):
    with pytest.raises(ConfigError, match=match):
        load_config(config(tmp_path / "run", layout, model), world_size=world)


def test_hellaswag_is_refused_under_sequence_parallel(tmp_path):
    """HellaSwag rows have any length; an uneven sequence split breaks the collectives."""
    cfg = load_config(config(tmp_path / "run", SP), world_size=2)
    with_hellaswag = replace(cfg, eval=replace(cfg.eval, hellaswag=str(tmp_path / "hs.jsonl")))
    with pytest.raises(ConfigError, match=r"^eval\.hellaswag is not supported with parallel\.seq"):
        check_layout(with_hellaswag)


def test_tp_sp_preset_turns_both_on(tmp_path):
    cfg = load_config(config(tmp_path / "run", SP_LP), world_size=2)
    p = cfg.parallel
    assert (p.tp, p.sequence_parallel, p.loss_parallel) == (2, True, True)
    off = load_config(config(tmp_path / "run", parallel("tp")), world_size=2).parallel
    assert (off.sequence_parallel, off.loss_parallel) == (False, False)  # single.yaml's
