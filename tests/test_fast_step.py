"""The fast training step's pieces that run on CPU (issue 12, items 3, 4, 5, 7):

- the attention kernel is chosen on the dtype of q, so under autocast a flash kernel (here a
  stand-in: flash-attn needs CUDA) is picked and called by a model forward;
- foreach gradient clipping equals the per-parameter clipping it replaced, in every layout;
- AdamW groups hold one kind of parameter each (plain, or DTensor of one mesh and placement),
  so it runs with foreach in every layout, tensor parallel included;
- DDP buckets hold the gradients (gradient_as_bucket_view); Python's garbage collector stays
  out of the step and collects on log steps only.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from multiproc import build_training_state, spawn
from test_distributed import config, parallel
from torch.distributed.tensor import DTensor
from torch.optim import adam

from trainer.config import ConfigError, model_config, resolve_config
from trainer.models import attention, build_model
from trainer.optim import build_optimizer
from trainer.parallel.ddp import static_graph_valid
from trainer.parallel.pipeline import tied_weight
from trainer.train import run

SMALL = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=64)
ARCHS = {
    "gpt2": dict(SMALL),
    "llama": dict(SMALL, arch="llama", n_kv_head=2, tie_embeddings=False, multiple_of=16),
}


# --- the attention kernel -----------------------------------------------------------------


class StandInFlash:
    """flash_attn_func computed with SDPA ((B, T, heads, D) in and out, GQA, causal), which
    records the dtype of every q it is given."""

    def __init__(self) -> None:
        self.q_dtypes: list[torch.dtype] = []

    def __call__(self, q, k, v, dropout_p: float = 0.0, causal: bool = False) -> torch.Tensor:
        self.q_dtypes.append(q.dtype)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=causal, enable_gqa=k.size(1) != q.size(1)
        )
        return y.transpose(1, 2)


@pytest.fixture
def flash(monkeypatch) -> StandInFlash:
    """flash-attn "installed" and running on the CPU: the stand-in kernel."""
    kernel = StandInFlash()
    monkeypatch.setattr(attention, "flash_attn_func", kernel)
    monkeypatch.setattr(attention, "FLASH_DEVICES", ("cuda", "cpu"))
    return kernel


def new_model(arch: str, **keys: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(model_config(**ARCHS[arch], **keys)).eval()


def tokens() -> torch.Tensor:
    return torch.randint(
        0, SMALL["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1)
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_gate_decides_on_q_under_autocast(arch: str, flash: StandInFlash) -> None:
    """Under autocast a block's attention gets an fp32 input (LayerNorm/RMSNorm output) while
    q is bf16: the gate looks at q, picks flash, and the model's forward calls it."""
    model = new_model(arch)
    block_inputs: list[torch.dtype] = []
    for block in model.blocks.values():
        block.attn.register_forward_pre_hook(lambda m, args: block_inputs.append(args[0].dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(tokens())
        reference = new_model(arch, attention="sdpa")(tokens())
    assert block_inputs == [torch.float32] * SMALL["n_layer"]  # what the old gate looked at
    assert flash.q_dtypes == [torch.bfloat16] * SMALL["n_layer"]  # what the kernel receives
    torch.testing.assert_close(got, reference, atol=2e-2, rtol=0)  # bf16 logits


def test_flash_runs_under_autocast_and_refuses_fp32(flash: StandInFlash) -> None:
    model = new_model("gpt2", attention="flash")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens())  # it used to raise here: the block input is fp32
    assert len(flash.q_dtypes) == SMALL["n_layer"]
    with pytest.raises(ConfigError, match=r"^model\.attention=flash needs [^\n]*$"):
        with torch.no_grad():
            model(tokens())  # fp32 compute: flash-attn has no fp32 kernel


@pytest.mark.parametrize("choice", ["flash", "cudnn"])
def test_unavailable_kernel_is_a_one_line_error(choice: str) -> None:
    """Without flash-attn (or a CUDA GPU), asking for it names the key and what it needs."""
    model = new_model("gpt2", attention=choice)
    with pytest.raises(ConfigError, match=rf"^model\.attention={choice} needs [^\n]*$"):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(tokens())


def test_choose_kernel(flash: StandInFlash) -> None:
    """The one table of choices (CPU here; flash runs on it through the stand-in)."""
    cpu, bf16, fp32 = torch.device("cpu"), torch.bfloat16, torch.float32

    def choose(setting: str, dtype: torch.dtype, packed: bool = False, **keys) -> str:
        cfg = model_config(**SMALL, attention=setting, **keys)
        return attention.choose_kernel(cfg, cpu, dtype, packed)

    assert choose("auto", bf16) == "flash"
    assert choose("auto", fp32) == "sdpa"  # flash-attn has no fp32 kernel
    assert choose("sdpa", bf16) == "sdpa"
    assert choose("auto", bf16, packed=True) == "flash"  # varlen: one sequence per document
    assert choose("sdpa", bf16, packed=True) == "sdpa"  # a boolean mask
    assert choose("auto", fp32, packed=True) == "sdpa"  # no flex on CPU


def test_kv_cache_through_flash(flash: StandInFlash, monkeypatch) -> None:
    """Generating with the KV cache through the flash kernel gives the logits of a full
    forward (the stand-in also takes fp32 here, so the comparison is exact to rounding)."""
    monkeypatch.setattr(attention, "HALF_PRECISION", (torch.float32,))
    model, idx = new_model("llama"), tokens()
    with torch.no_grad():
        full = model(idx)
        flash.q_dtypes.clear()
        cache = model.new_kv_cache()
        steps = [model(idx[:, :8], kv_cache=cache)]  # the prompt, then one token at a time
        steps += [model(idx[:, t : t + 1], kv_cache=cache) for t in range(8, idx.size(1))]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert len(flash.q_dtypes) == SMALL["n_layer"] * (1 + idx.size(1) - 8)


# --- gradient clipping and the optimizer in every layout ----------------------------------

CLIP_LAYOUTS = ("ddp", "fsdp", "tp", "pp")  # 2 gloo ranks each; "single" runs in-process
MAX_NORM = 0.05  # well below the gradient norm of a fresh model: clipping scales


def reference_clip(pm, max_norm: float) -> torch.Tensor:
    """The clipping foreach clipping replaced: a Python loop over the parameters (one norm and
    one multiply per parameter). Kept here as the reference."""
    grads = [p.grad for p in pm.module.parameters() if p.grad is not None]
    if pm.tied_group is not None and not pm.runs_first_stage:
        tied = tied_weight(pm.module, pm.spec)
        grads = [g for g in grads if tied is None or g is not tied.grad]
    squares = torch.zeros((), device=grads[0].device if grads else "cpu")
    by_layout: dict[tuple, list] = {}
    for g in grads:
        if isinstance(g, DTensor):
            by_layout.setdefault((g.device_mesh, g.placements), []).append(g)
        else:
            squares = squares + g.detach().float().norm() ** 2
    for group in by_layout.values():
        norm = torch.nn.utils.get_total_norm(group)
        squares = squares + norm.full_tensor().float() ** 2
    if pm.layout.mesh is not None and pm.layout.mesh["pp"].size() > 1:
        torch.distributed.all_reduce(squares, group=pm.layout.mesh["pp"].get_group())
    total = squares.sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in pm.module.parameters():
        if p.grad is not None:
            grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            grad.mul_(coef)
    return total


def local_grads(pm) -> list[torch.Tensor]:
    grads = [p.grad for p in pm.module.parameters() if p.grad is not None]
    return [g.to_local() if isinstance(g, DTensor) else g for g in grads]


def check_clipping(name: str, cfg: dict) -> None:
    """One backward in `cfg`'s layout, then the new and the reference clipping on copies of
    the same gradients: norms and clipped gradients within 1e-6 relative; with clipping off
    (max_norm=inf) the same norm and the gradients untouched."""
    _, pm, _ = build_training_state(cfg)
    x = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(3))
    y = torch.roll(x, -1, dims=1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    pm.forward_backward(x, y, True, scaler, contextlib.nullcontext())
    pm.after_backward()
    before = [g.clone() for g in local_grads(pm)]

    def reset() -> None:
        for g, saved in zip(local_grads(pm), before, strict=True):
            g.copy_(saved)

    expected = reference_clip(pm, MAX_NORM)
    clipped = [g.clone() for g in local_grads(pm)]
    reset()
    got = pm.clip_grad_norm(MAX_NORM)
    assert expected > 2 * MAX_NORM, f"{name}: the test must clip (norm {float(expected)})"
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0, msg=f"{name}: norm")
    for g, want in zip(local_grads(pm), clipped, strict=True):
        torch.testing.assert_close(g, want, rtol=1e-6, atol=0, msg=f"{name}: clipped gradient")
    reset()
    unclipped = pm.clip_grad_norm(float("inf"))
    torch.testing.assert_close(unclipped, expected, rtol=1e-6, atol=0, msg=f"{name}: norm (off)")
    assert all(torch.equal(g, b) for g, b in zip(local_grads(pm), before, strict=True)), name


def check_foreach_optimizer(name: str, cfg: dict) -> None:
    """Every AdamW group holds one kind of parameter, has foreach on, and a step runs through
    the multi-tensor (foreach) implementation, never the per-parameter loop."""
    _, pm, optimizer = build_training_state(cfg)
    kinds = set()
    for group in optimizer.param_groups:
        assert group["foreach"] and not group["fused"], name
        group_kinds = {
            (p.device_mesh, p.placements) if isinstance(p, DTensor) else None
            for p in group["params"]
        }
        assert len(group_kinds) == 1, f"{name}: a group mixes {group_kinds}"
        kinds |= group_kinds
    calls = []
    multi, single = adam._multi_tensor_adam, adam._single_tensor_adam

    def counted(params, *args, **kwargs):
        calls.append(len(params))
        return multi(params, *args, **kwargs)

    def refused(*args, **kwargs):
        raise AssertionError(f"{name}: AdamW ran its per-parameter loop")

    adam._multi_tensor_adam, adam._single_tensor_adam = counted, refused
    try:
        for p in pm.module.parameters():
            p.grad = torch.zeros_like(p) + 1e-3
        optimizer.step()
    finally:
        adam._multi_tensor_adam, adam._single_tensor_adam = multi, single
    assert len(calls) == len(optimizer.param_groups), name
    if "tp" in name:  # sharded and replicated parameters side by side, now in separate groups
        assert None in kinds and len(kinds) > 2, f"{name}: {kinds}"


def check_ddp_options(name: str, cfg: dict) -> None:
    """DDP's gradients are views into its buckets, and its graph is declared static (one
    micro-batch per step, not compiled)."""
    _, pm, _ = build_training_state(cfg)
    assert pm.wrapped.gradient_as_bucket_view and pm.wrapped.static_graph, name


def fast_step_worker(rank: int, jobs: list[tuple[str, dict]]) -> None:
    for name, cfg in jobs:
        check_clipping(name, cfg)
        check_foreach_optimizer(name, cfg)
        if name == "ddp":
            check_ddp_options(name, cfg)


def layout_config(tmp_path, name: str) -> dict:
    if name == "single":
        return config(tmp_path / name)
    micro = {"ddp": 2, "fsdp": 2}.get(name, 4)  # the global batch of 4 samples
    extra = {"pp_schedule": "1f1b", "pp_microbatches": 2} if name == "pp" else {}
    return config(tmp_path / name, parallel(name, **extra), micro_batch_size=micro)


def test_clipping_and_foreach_single_process(tmp_path) -> None:
    fast_step_worker(0, [("single", layout_config(tmp_path, "single"))])


@pytest.mark.multiproc
def test_clipping_and_foreach_in_every_layout(tmp_path) -> None:
    """DDP, FSDP, TP and PP (with the tied output layer on two stages) on 2 gloo ranks."""
    spawn(2, fast_step_worker, [(name, layout_config(tmp_path, name)) for name in CLIP_LAYOUTS])


def test_static_graph_only_where_valid() -> None:
    """Not with gradient accumulation (no_sync breaks it) nor with torch.compile."""
    assert static_graph_valid(grad_accum=1, compiled=False)
    assert not static_graph_valid(grad_accum=2, compiled=False)
    assert not static_graph_valid(grad_accum=1, compiled=True)


# --- the garbage collector ----------------------------------------------------------------


def test_garbage_collector_stays_out_of_the_step(tmp_path) -> None:
    """Inside the loop the automatic collector is off; the young generations are collected on
    log steps only (every 2nd step and the last), all of them after a checkpoint (every 3rd
    step and the last); afterwards the collector is back on."""
    young, full = [], []  # one entry per collection of generation 1 / 2 (the loop's)

    def count(phase: str, info: dict) -> None:
        if phase == "start":
            {1: young, 2: full}.get(info["generation"], []).append(1)

    seen: dict[int, tuple[bool, int, int]] = {}

    def observe(step: int) -> bool:  # before the step's checkpoint
        seen[step] = (gc.isenabled(), len(young), len(full))
        return False

    cfg = config(tmp_path / "gc", steps=5)
    cfg["log"]["interval"] = 2
    cfg["checkpoint"] = {"interval": 3}
    assert gc.isenabled()
    gc.callbacks.append(count)
    try:
        run(cfg, stop_requested=observe)
    finally:
        gc.callbacks.remove(count)
    assert gc.isenabled()
    assert [enabled for enabled, _, _ in seen.values()] == [False] * 5
    collections = [seen[step][1] - seen[step - 1][1] for step in range(2, 6)]
    assert collections == [1, 0, 1, 1]  # after steps 2, 4 and 5 (the last is always logged)
    full_collections = [seen[step][2] - seen[step - 1][2] for step in range(2, 6)]
    assert full_collections == [0, 0, 1, 0]  # after step 3's checkpoint (5's: after observe)
    assert len(full) == seen[5][2] + 1  # and after the last one


def test_optimizer_keeps_its_kernels_after_loading_a_state_dict() -> None:
    """A state dict carries each group's foreach/fused flags (another machine's, or an
    older version's): loading it keeps this machine's."""
    cfg = resolve_config(config("unused"), world_size=1)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.train, torch.device("cpu"))
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        group["foreach"], group["fused"] = None, False  # as written before foreach was set
    optimizer.load_state_dict(state)
    assert all(g["foreach"] and not g["fused"] for g in optimizer.param_groups)


@pytest.mark.parametrize("choice", ["flash", "cudnn"])
@pytest.mark.parametrize("precision, device", [("fp32", "auto"), ("bf16", "cpu")])
def test_a_gpu_kernel_is_refused_before_the_build(tmp_path, choice, precision, device) -> None:
    """A fixed GPU kernel that cannot run (fp32, or device=cpu) is one line from the config
    validation, before any model is built."""
    cfg = config(tmp_path / "kernel")
    cfg["model"]["attention"], cfg["precision"], cfg["device"] = choice, precision, device
    with pytest.raises(ConfigError, match=rf"^model\.attention={choice} needs a CUDA GPU [^\n]*$"):
        resolve_config(cfg, world_size=1)
