"""Meta-device initialisation: every layout starts from the single process's weights, bit for
bit, while each rank allocates only what it holds.

The model is built on the meta device, parallelised there, then each rank materialises its
part and fills it per parameter from (train.seed, name, full shape) (trainer/models/init.py).
The references are made in this (pytest) process, a world of one; each layout's ranks
compare their local shards with the matching slices of them (and reassemble the full
tensors). Layouts of the same world size share one group of processes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_config
from multiproc import spawn, train_worker
from test_distributed import LLAMA, LLAMA_TIED, MODEL, parallel

from trainer.config import resolve_config
from trainer.hf import save_hf
from trainer.models import init as meta_init
from trainer.run_dir import METRICS, read_jsonl
from trainer.train import build_model, build_parallel_model, run

pytestmark = pytest.mark.multiproc

# (world size, parallel preset + overrides, model) of every layout of the parity suite
LAYOUTS: dict[str, tuple[int, dict[str, Any], dict[str, Any]]] = {
    "ddp2": (2, parallel("ddp"), MODEL),
    "fsdp2": (2, parallel("fsdp"), MODEL),
    "tp2": (2, parallel("tp"), MODEL),
    "tp2_sp_lp": (2, parallel("tp_sp"), MODEL),  # sequence + loss parallel: vocab shards
    "pp2_1f1b": (2, parallel("pp", pp_microbatches=2), MODEL),
    "pp2_interleaved": (2, parallel("pp_interleaved"), MODEL),  # 2 stages per rank
    "cp2": (2, parallel("cp"), MODEL),
    "zero1_2": (2, parallel("zero1"), MODEL),
    "llama_fsdp2": (2, parallel("fsdp"), LLAMA),
    "llama_tp2": (2, parallel("tp"), LLAMA),
    "llama_tied_pp2": (2, parallel("pp", pp_microbatches=2), LLAMA_TIED),
    "hsdp2x2": (4, parallel("hsdp", dp_replicate=2, dp_shard=2), MODEL),
    "fsdp2_tp2": (4, parallel("fsdp_tp"), MODEL),  # 2-D: FSDP's Shard(0) over TP's shards
    "llama_fsdp2_tp2": (4, parallel("fsdp_tp"), LLAMA),
}
HF_JOB = "hf_fsdp2"  # model.init_from under FSDP: the folder's exact weights
# Memory: big enough that the weights dominate the process's other allocations (28M
# parameters, 108 MiB fp32; the largest parameter, an MLP matrix, is 9 MiB).
MEMORY_MODEL = {"n_layer": 4, "n_head": 4, "n_embd": 768, "block_size": 32}


def job_config(root: Path, name: str, par: dict, model: dict) -> dict:
    cfg = tiny_config(root / name, model=dict(model), parallel=dict(par))
    cfg["train"] |= {"micro_batch_size": 4, "max_steps": 1}
    return cfg


def reference(cfg: dict) -> dict[str, torch.Tensor]:
    """The single process's initial parameters and buffers (this process: a world of one)."""
    config = resolve_config({**cfg, "parallel": parallel("single")}, world_size=1)
    model = build_model(config, torch.device("cpu"))
    return {**model.state_dict(), **dict(model.named_buffers(remove_duplicate=False))}


def compare_worker(rank: int, jobs: list[tuple[str, dict, str]], out: str) -> None:
    """Each job: this rank's part of the model, built as a run builds it, against the
    reference file: every local shard equal to its slice of the full tensor, every sharded
    parameter reassembled equal to it, buffers and tied weights as in the single process.
    Writes {checked, mismatches} per rank."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    from trainer import distributed
    from trainer.parallel import build_layout

    for name, cfg, ref_file in jobs:
        world = distributed.world_from_env()
        config = resolve_config(cfg, world_size=world.size)
        world, device = distributed.init(config.device)
        layout = build_layout(config, device.type, world.size)
        pm, _, _ = build_parallel_model(config, layout, device)
        want = torch.load(ref_file, weights_only=True)
        checked, bad = [], []
        for key, param in pm.module.named_parameters():
            full = want[key]
            if isinstance(param, DTensor):
                part = distribute_tensor(
                    full, param.device_mesh, param.placements, src_data_rank=None
                )
                same = torch.equal(param.to_local(), part.to_local())
                same = torch.equal(param.full_tensor(), full) and same  # collective
            else:
                same = torch.equal(param.detach(), full)
            checked.append(key)
            if not same:
                bad.append(key)
        for key, buffer in pm.module.named_buffers(remove_duplicate=False):
            checked.append(key)
            if not torch.equal(buffer, want[key]):
                bad.append(key)
        module = pm.module
        if (
            config.model.tie_embeddings
            and module.tok_emb is not None
            and module.lm_head is not None
        ):
            if module.lm_head.weight is not module.tok_emb.weight:
                bad.append("lm_head.weight is no longer tok_emb.weight")
        result = {"checked": checked, "mismatches": bad}
        Path(out, f"{name}.rank{rank}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> Path:
    """Every layout compared with its reference; returns the folder of the per-rank results."""
    root = tmp_path_factory.mktemp("meta_init")
    groups: dict[int, list] = {}
    for name, (world, par, model) in LAYOUTS.items():
        cfg = job_config(root, name, par, model)
        torch.save(reference(cfg), root / f"{name}.pt")
        groups.setdefault(world, []).append((name, cfg, str(root / f"{name}.pt")))
    groups[2].append(hf_job(root))
    for world, jobs in sorted(groups.items()):
        spawn(world, compare_worker, jobs, str(root), timeout_s=240)
    return root


def hf_job(root: Path) -> tuple[str, dict, str]:
    """A Hugging Face folder of a model unlike any seeded init (its own seed), loaded by
    model.init_from under FSDP; its reference is the model that wrote it."""
    torch.manual_seed(1234)
    source = resolve_config(tiny_config(root / "hf_src", model=dict(MODEL))).model
    from trainer.models import build_model as new_model

    model = new_model(source)  # eager: the global RNG, not the seeded per-name init
    save_hf(model, root / "hf")
    cfg = job_config(root, HF_JOB, parallel("fsdp"), {**MODEL, "init_from": str(root / "hf")})
    torch.save(model.state_dict(), root / f"{HF_JOB}.pt")
    return HF_JOB, cfg, str(root / f"{HF_JOB}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("name", [*LAYOUTS, HF_JOB])
def test_every_rank_holds_slices_of_the_single_process_init(compared, name):
    world = LAYOUTS[name][0] if name in LAYOUTS else 2
    held: set[str] = set()
    for rank in range(world):
        result = json.loads((compared / f"{name}.rank{rank}.json").read_text())
        assert result["mismatches"] == [], f"rank {rank}"
        held |= set(result["checked"])
    reference_names = set(torch.load(compared / f"{name}.pt", weights_only=True))
    # together the ranks hold every tensor of the model (tied: the one name of both)
    assert reference_names - held <= {"lm_head.weight"}, reference_names - held


def test_init_is_a_function_of_seed_and_name_only(tiny):
    """The same parameter gets the same values whatever else the model holds (here: a model
    of another depth), another seed other values; the rule per parameter is the arch's."""
    two = build_model(resolve_config(tiny("a", model={"n_layer": 2})), torch.device("cpu"))
    four = build_model(resolve_config(tiny("b", model={"n_layer": 4})), torch.device("cpu"))
    other = resolve_config(tiny("c", model={"n_layer": 2}, train={"seed": 7}))
    reseeded = build_model(other, torch.device("cpu"))
    assert torch.equal(two.blocks["1"].attn.q_proj.weight, four.blocks["1"].attn.q_proj.weight)
    assert not torch.equal(two.tok_emb.weight, reseeded.tok_emb.weight)
    assert torch.equal(two.blocks["0"].ln_1.weight, torch.ones(32))
    assert torch.equal(two.blocks["0"].mlp.fc.bias, torch.zeros(128))
    assert two.lm_head.weight is two.tok_emb.weight
    std = two.blocks["0"].attn.o_proj.weight.std().item()  # 0.02 / sqrt(2 * n_layer) = 0.01
    assert 0.008 < std < 0.012


def test_init_from_loads_exact_weights_without_initialising(tiny, tmp_path, monkeypatch):
    """model.init_from: the folder's weights, exactly, and no random init drawn first."""
    torch.manual_seed(99)
    from trainer.models import build_model as new_model

    cfg = resolve_config(tiny("src", model={"arch": "llama", **LLAMA}))
    source = new_model(cfg.model)
    save_hf(source, tmp_path / "hf")
    monkeypatch.setattr(meta_init, "initial_value", refuse("initial_value"))
    loaded = resolve_config(tiny("dst", model={**LLAMA, "init_from": str(tmp_path / "hf")}))
    model = build_model(loaded, torch.device("cpu"))
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    rotary = model.blocks["1"].attn.rotary  # recomputed buffers
    assert torch.equal(rotary.cos, source.blocks["1"].attn.rotary.cos)


def refuse(what: str):
    def raise_(*args, **kwargs):
        raise AssertionError(f"{what} was called")

    return raise_


def test_resume_does_not_initialise(tiny, monkeypatch):
    """A resumed run fills its weights from the checkpoint only: the initialiser is never
    called, and the run continues exactly (same losses as an uninterrupted run). The first
    record of each attempt has the build's memory."""
    whole = run(tiny("whole", train={"max_steps": 4}))
    cfg = tiny("resumed", train={"max_steps": 4}, checkpoint={"interval": 2})
    run(cfg, stop_requested=lambda step: step >= 2)
    monkeypatch.setattr(meta_init, "initial_value", refuse("initial_value"))
    resumed = run(cfg)
    assert resumed.resumed_from is not None and resumed.losses == {
        s: whole.losses[s] for s in (3, 4)
    }
    records = read_jsonl(Path(cfg["run"]["dir"]) / METRICS)
    firsts = [r for r in records if "init_memory_gib" in r]
    assert [r["step"] for r in firsts] == [1, 3]  # the first record of each attempt
    for r in firsts:
        assert len(r["init_memory_gib_per_device"]) == 1
        assert r["init_memory_gib"] == max(r["init_memory_gib_per_device"]) >= 0
    log = (Path(cfg["run"]["dir"]) / "train.log").read_text()
    assert f"init memory {firsts[0]['init_memory_gib']:.2f} GiB" in log.splitlines()[0]


def test_fsdp_ranks_build_only_their_shard(tmp_path):
    """FSDP on 2 ranks: each rank's init memory (metrics.jsonl's first record, a fresh
    process each) is its shard plus one full parameter in flight, well below one process's
    whole model.

    The bound per rank: half the weights + 3 x the largest parameter (its full tensor drawn,
    the cut shard, a copy in flight) + 8 MiB for what else the build touches (allocator
    rounding, code pages first used). Measured: 121.5 MiB for one process (109 MiB of
    weights + the full tensor being drawn), 72-73 MiB per FSDP rank (bound: 89.5 MiB)."""
    runs = {}
    for name, world, preset in (("single", 1, "single"), ("fsdp2", 2, "fsdp")):
        cfg = job_config(tmp_path, name, parallel(preset), MEMORY_MODEL)
        spawn(world, train_worker, cfg)  # one step
        runs[name] = read_jsonl(tmp_path / name / METRICS)[0]
    n = 4 * 12 * 768**2 + 4 * 13 * 768 + 2 * 768 + 257 * 768 + 32 * 768  # parameters
    mib = 2**-20
    whole, largest = 4 * n * mib, 4 * 768 * 3072 * mib
    single = runs["single"]["init_memory_gib_per_device"]
    fsdp = runs["fsdp2"]["init_memory_gib_per_device"]
    assert runs["fsdp2"]["init_memory_gib"] == max(fsdp) and len(fsdp) == 2
    assert single[0] * 1024 >= 0.95 * whole, (single, whole)
    for per_rank in fsdp:
        assert per_rank * 1024 <= whole / 2 + 3 * largest + 8, (fsdp, whole)
        assert per_rank <= 0.7 * single[0], (fsdp, single)
