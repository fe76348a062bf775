"""Training stability: the z-loss term, and skipping the updates of non-finite or spiking
steps (trainer/stability.py) — identical on every rank and across a resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from multiproc import build_training_state, run_jobs
from torch.distributed.checkpoint.state_dict import get_state_dict

from trainer import checkpoint
from trainer.config import ConfigError, load_config, resolve_config
from trainer.data import BatchLoader, build_source
from trainer.errors import TrainingError
from trainer.models.loss import IGNORE_INDEX, cross_entropy, lm_loss
from trainer.run_dir import CHECKPOINTS, METRICS, TRAIN_LOG, read_jsonl
from trainer.stability import UpdateGuard
from trainer.train import build_model, run
from trainer.trained import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

Z = 1e-2  # large enough to change the second step's loss visibly
# factor 1.04 over a window of 2 accepted steps: tiny_config's run skips several real steps
# (5, 8, 9, 11-16; margins of 0.9% and more, far above rounding between layouts)
SPIKES = {
    "max_steps": 16,
    "skip_spike_factor": 1.04,
    "skip_spike_window": 2,
    "max_consecutive_skips": 10,
}


def metrics(run_dir: str | Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_jsonl(Path(run_dir) / METRICS)}


def skipped_steps(run_dir: str | Path) -> list[int]:
    """The steps whose update was skipped, from the counts in metrics.jsonl."""
    rows = metrics(run_dir)
    return [s for s in rows if rows[s]["skipped"] > rows.get(s - 1, {"skipped": 0})["skipped"]]


# ---------------------------------------------------------------------------------- z-loss


def random_logits() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(2, 5, 11, generator=gen)
    targets = torch.randint(0, 11, (2, 5), generator=gen)
    targets[0, 1] = targets[1, 4] = IGNORE_INDEX
    return logits, targets


def test_z_loss_and_its_gradient_match_the_formulas():
    """loss = CE + c * mean(logsumexp^2) over the counted targets; its gradient per logit row
    is (softmax - onehot(target) + 2c * logsumexp * softmax) / n, computed here by hand."""
    logits, targets = random_logits()
    logits.requires_grad_(True)
    terms = lm_loss(logits, targets, Z)
    terms.objective(Z).backward()

    flat, t = logits.detach().double().flatten(0, 1), targets.flatten()
    counted = t != IGNORE_INDEX
    n = counted.sum()
    lse = flat.exp().sum(-1).log()
    target_logit = flat[torch.arange(len(t)), t.clamp(min=0)]
    assert terms.ce.item() == pytest.approx((lse - target_logit)[counted].sum() / n, abs=1e-6)
    assert torch.equal(terms.ce, cross_entropy(logits, targets))  # the same computation
    assert terms.z.item() == pytest.approx((lse**2)[counted].sum() / n, rel=1e-6)
    softmax = flat.exp() / flat.exp().sum(-1, keepdim=True)
    onehot = F.one_hot(t.clamp(min=0), 11).double()
    grad = (softmax - onehot + 2 * Z * lse[:, None] * softmax) * counted[:, None] / n
    torch.testing.assert_close(logits.grad.double().flatten(0, 1), grad, atol=1e-7, rtol=1e-5)


def test_z_loss_off_is_exactly_the_cross_entropy(tiny):
    """train.z_loss=0: the training step computes F.cross_entropy as before, with the same
    loss and the same gradients, bit for bit."""
    logits, targets = random_logits()
    off = lm_loss(logits, targets, 0.0)
    assert off.z is None and torch.equal(off.objective(0.0), cross_entropy(logits, targets))

    cfg, pm, _ = build_training_state(tiny(model={"dropout": 0.0}))
    x, y = BatchLoader(build_source(cfg, "train"), 2, 0, 1).next_batch()
    reference = build_model(cfg, torch.device("cpu"))
    want = reference(x, y)
    want.backward()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    got = pm.forward_backward(x, y, True, scaler, torch.autocast("cpu", enabled=False))
    assert got.z is None and torch.equal(got.ce, want.detach())
    for (name, p), q in zip(pm.module.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


def test_z_loss_trains_but_loss_and_val_loss_stay_cross_entropy(tiny):
    """With z-loss on, the logged loss is the plain cross-entropy (step 1: identical to the
    run without z-loss, same weights and batch), `z_loss` is c * mean(logsumexp^2) of that batch,
    the z term changes the updates, and validation is the plain cross-entropy of the model."""
    sections = {"eval": {"interval": 6, "steps": 1}}
    plain = metrics(run(tiny("plain", **sections)).run_dir)
    cfg = tiny("z", train={"z_loss": Z}, **sections)
    with_z = metrics(run(cfg).run_dir)
    assert "z_loss" not in plain[1]
    assert with_z[1]["loss"] == plain[1]["loss"]  # the same cross-entropy, bit for bit
    assert abs(with_z[2]["loss"] - plain[2]["loss"]) > 1e-5  # the z term moved step 1's update

    config = resolve_config(cfg)
    x, y = BatchLoader(build_source(config, "train"), 2, 0, 1).next_batch()
    with torch.no_grad():
        logits = build_model(config, torch.device("cpu"))(x)
    lse = torch.logsumexp(logits.double(), -1)
    assert with_z[1]["z_loss"] == pytest.approx(Z * (lse**2).mean().item(), rel=1e-5)

    model, _ = load_model(cfg["run"]["dir"])
    vx, vy = BatchLoader(build_source(config, "val"), 2, 0, 1).next_batch()
    with torch.no_grad():
        assert with_z[6]["val_loss"] == pytest.approx(model(vx, vy).item(), abs=1e-6)


# ------------------------------------------------------------------------ update skipping


def guard(factor: float = 2.0, window: int = 3, max_skips: int = 3, fp16: bool = False):
    t = load_config(
        {
            "data": {"kind": "dummy", "vocab_size": 257},
            "train": {
                "skip_spike_factor": factor,
                "skip_spike_window": window,
                "max_consecutive_skips": max_skips,
            },
        }
    ).train
    return UpdateGuard(t, fp16=fp16)


def test_spikes_are_judged_against_the_mean_of_the_last_accepted_steps():
    g = guard()
    assert g.judge(1, 100.0, 100.0) is None  # warming up: the window is not full yet
    assert g.judge(2, 3.0, 1.0) is None and g.judge(3, 3.0, 1.0) is None
    # the window (100, 3, 3) is full: threshold = 2 x its mean
    assert g.judge(4, 70.0, 1.0) is None  # 70 <= 2 * 106/3
    assert list(g.losses) == [3.0, 3.0, 70.0]  # the oldest value left
    loss_spike = g.judge(5, 60.0, 1.0)
    assert (loss_spike.what, loss_spike.value) == ("loss", 60.0)
    assert loss_spike.threshold == pytest.approx(2 * 76 / 3)
    norm_spike = g.judge(6, 3.0, 5.0)
    assert (norm_spike.what, norm_spike.threshold) == ("grad norm", pytest.approx(2.0))
    assert list(g.losses) == [3.0, 3.0, 70.0]  # skipped steps do not enter the mean
    assert (g.consecutive, g.skipped, g.streak_start, g.gave_up) == (2, 2, 5, False)
    assert "step 6: update skipped: grad norm 5 > threshold 2" in norm_spike.describe()
    assert g.judge(7, 3.0, 1.0) is None and (g.consecutive, g.skipped) == (0, 2)


def test_non_finite_steps_are_always_skipped_and_a_streak_gives_up():
    g = guard(factor=0.0, max_skips=2)  # spike skipping off
    assert g.judge(1, 5.0, 1e6) is None  # no spike check
    assert g.judge(2, math.nan, 1.0).describe() == "step 2: update skipped: loss nan is not finite"
    assert not g.gave_up
    assert g.judge(3, 5.0, math.inf).what == "grad norm"
    assert g.gave_up and g.streak_start == 2


def test_fp16_overflow_is_the_grad_scalers_to_skip():
    """fp16: an infinite gradient norm is an overflow the GradScaler skips (and lowers its
    scale for); it is neither counted as a skip nor added to the statistics."""
    g = guard(window=1, fp16=True)
    assert g.judge(1, 3.0, math.inf) is None and g.skipped == 0 and not g.norms
    assert g.judge(2, math.nan, 1.0).what == "loss"  # a non-finite loss still is


def test_statistics_round_trip_through_a_state_dict():
    g = guard()
    for step, loss in enumerate([3.0, 2.0, 2.5, 40.0], start=1):
        g.judge(step, loss, 1.0)
    restored = guard()
    restored.load_state_dict(g.state_dict())
    assert (
        restored.state_dict()
        == g.state_dict()
        == {
            "losses": [3.0, 2.0, 2.5],
            "norms": [1.0, 1.0, 1.0],
            "consecutive": 1,
            "skipped": 1,
            "streak_start": 4,
        }
    )


def test_skipped_update_leaves_weights_and_optimizer_state_untouched(tiny):
    cfg = tiny(train=SPIKES, checkpoint={"interval": 1, "keep": 20})
    run(cfg)
    run_dir = Path(cfg["run"]["dir"])
    assert skipped_steps(run_dir) == [5, 8, 9, 11, 12, 13, 14, 15, 16]
    log = (run_dir / TRAIN_LOG).read_text()
    assert "step 5: update skipped: grad norm 1.393 > threshold 1.357" in log

    def state(step: int) -> tuple[dict, dict]:
        _, pm, optimizer = build_training_state(tiny("view"))
        checkpoint.load(run_dir / CHECKPOINTS / f"step_{step}", pm.module, optimizer)
        return get_state_dict(pm.module, optimizer)

    (model_4, optim_4), (model_5, optim_5), (model_7, _) = state(4), state(5), state(7)
    for key in model_4:
        assert torch.equal(model_4[key], model_5[key]), key
    assert not all(torch.equal(model_5[k], model_7[k]) for k in model_5)  # steps 6, 7 updated
    for key, moments in optim_4["state"].items():
        for k, value in moments.items():  # AdamW's moments and its step count
            assert torch.equal(optim_5["state"][key][k], value), f"{key}.{k}"


@pytest.mark.parametrize("stop_at", [10, 13])  # before a streak; inside one (11-16)
def test_resume_skips_exactly_the_steps_of_an_uninterrupted_run(tiny, stop_at):
    whole = run(tiny("whole", train=SPIKES))
    cfg = tiny("split", train=SPIKES)
    first = run(cfg, stop_requested=lambda step: step == stop_at)
    second = run(cfg)
    assert first.step == stop_at and second.resumed_from is not None
    assert {**first.losses, **second.losses} == whole.losses  # float equality: bitwise
    assert (
        skipped_steps(cfg["run"]["dir"])
        == skipped_steps(whole.run_dir)
        == [5, 8, 9, 11, 12, 13, 14, 15, 16]
    )
    saved = checkpoint.read_trainer_state(first.last_checkpoint)["stability"]
    assert saved["consecutive"] == (3 if stop_at == 13 else 0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_non_finite_updates_are_skipped_in_half_precision_too(tiny, precision):
    """lr=1e30 under bf16 autocast and under fp16 (where the GradScaler alone would skip the
    overflowing steps forever): the NaN steps are skipped and five in a row stop the run."""
    cfg = tiny(train={"lr": 1e30, "warmup_steps": 0}, precision=precision)
    with pytest.raises(TrainingError, match=r"5 updates in a row skipped .*steps 2-6"):
        run(cfg)
    assert [r["skipped"] for r in metrics(cfg["run"]["dir"]).values()] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "train, message",
    [
        ({"z_loss": -1e-4}, "train.z_loss=-0.0001: must be >= 0"),
        ({"skip_spike_factor": 0.5}, "train.skip_spike_factor=0.5: must be 0 (off) or above 1"),
        ({"skip_spike_window": 0}, "train.skip_spike_window=0: must be a positive number"),
        ({"max_consecutive_skips": 0}, "train.max_consecutive_skips=0: must be a positive number"),
    ],
)
def test_bad_stability_keys_are_one_line_naming_the_key(train, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config({"data": {"kind": "dummy", "vocab_size": 257}, "train": train})


# ---------------------------------------------------------------------- several processes

# Global batch 2 per step in every layout (tiny_config: micro_batch_size 2).
MULTI = {
    "pp2_z": {"parallel": {"pp": 2, "pp_microbatches": 2, "pp_schedule": "1f1b"}},
    "tp2_z": {"parallel": {"tp": 2}},
    "fsdp2_z": {"parallel": {"dp_shard": 2}, "train": {"micro_batch_size": 1}},
    "ddp2_spikes": {"parallel": {"dp_replicate": 2}, "train": {"micro_batch_size": 1}},
}


@pytest.mark.multiproc
def test_z_loss_and_skipping_match_one_process_on_two(tiny, tmp_path):
    """pp=2 (the pipeline's own loss function), tp=2 and FSDP with z-loss on train like one
    process (losses, z terms, gradient norms, validation); DDP skips the same steps as one
    process."""
    z_sections = {"train": {"z_loss": Z}, "eval": {"interval": 6, "steps": 1}}
    single_z = run(tiny("single_z", **z_sections)).run_dir
    single_spikes = run(tiny("single_spikes", train=SPIKES)).run_dir
    jobs = []
    for name, sections in MULTI.items():
        base = {"train": dict(SPIKES)} if "spikes" in name else dict(z_sections)
        cfg = tiny(name, **base, parallel=sections["parallel"])
        cfg["train"].update(sections.get("train", {}))
        jobs.append((name, cfg, None))
    assert run_jobs(2, jobs, tmp_path / "status") == {}

    want = metrics(single_z)
    for name in ("pp2_z", "tp2_z", "fsdp2_z"):
        got = metrics(tmp_path / name)
        assert sorted(got) == sorted(want) == list(range(1, 7))
        for step in got:
            for key, atol in (("loss", 1e-5), ("z_loss", 1e-6), ("grad_norm", 1e-4)):
                assert got[step][key] == pytest.approx(want[step][key], abs=atol), (name, key)
        assert got[6]["val_loss"] == pytest.approx(want[6]["val_loss"], abs=1e-5), name
    assert skipped_steps(tmp_path / "ddp2_spikes") == skipped_steps(single_spikes)
    assert skipped_steps(single_spikes) == [5, 8, 9, 11, 12, 13, 14, 15, 16]
