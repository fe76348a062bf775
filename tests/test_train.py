"""The training loop: learning, precision modes, accumulation, memory knobs, run directory."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from trainer.config import load_config
from trainer.data import DummyTokens
from trainer.hf import load_hf_state_dict, save_hf
from trainer.models.gpt2.model import GPT
from trainer.optim import lr_at
from trainer.run_dir import METRICS, TRAIN_LOG, read_jsonl
from trainer.train import run


def records(run_dir: str | Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / METRICS)


def test_loss_falls_and_metrics_have_every_field(tiny):
    cfg = tiny(
        model={"vocab_size": 16},
        data={"vocab_size": 16},
        train={"max_steps": 30, "lr": 1e-2, "micro_batch_size": 8},
        eval={"interval": 15, "steps": 2},
    )
    result = run(cfg)
    losses = list(result.losses.values())
    assert losses[0] > math.log(16) - 0.3  # starts near uniform over 16 ids
    # ... and ends more than half-way to the floor ln(4) (4 equally likely successors)
    assert losses[-1] < (math.log(16) + math.log(4)) / 2
    rows = records(cfg["run"]["dir"])
    assert [r["step"] for r in rows] == list(range(1, 31))
    for key in (
        "step",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "mfu",
        "memory_gib",
        "tokens",
        "elapsed_s",
    ):
        assert key in rows[-1]
    assert rows[-1]["tokens"] == 30 * 8 * 32
    assert rows[-1]["tokens_per_s"] > 0 and rows[-1]["memory_gib"] > 0
    assert rows[-1]["mfu"] is None  # no known peak for a CPU unless log.peak_tflops is set
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [15, 30]
    assert val[1]["val_loss"] < val[0]["val_loss"]
    assert val[1]["val_ppl"] == pytest.approx(math.exp(val[1]["val_loss"]))
    text_log = (Path(cfg["run"]["dir"]) / TRAIN_LOG).read_text()
    assert "step 30/30 | loss" in text_log and "checkpoint saved" in text_log


def test_mfu_uses_the_configured_peak(tiny):
    cfg = tiny(train={"max_steps": 2}, log={"interval": 1, "peak_tflops": 1.0})
    run(cfg)
    row = records(cfg["run"]["dir"])[-1]
    c = load_config(cfg)
    n_params = GPT(c.model).num_params()
    flops_per_token = 6 * n_params + 12 * c.model.n_layer * c.model.n_embd * c.model.block_size
    assert row["mfu"] == pytest.approx(flops_per_token * row["tokens_per_s"] / 1e12)


def test_learning_rate_schedule_warmup_then_cosine_to_floor():
    t = load_config({"train": {"lr": 1.0, "min_lr": 0.1, "warmup_steps": 4, "max_steps": 14}}).train
    assert [lr_at(s, t) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(9, t) == pytest.approx(0.55)  # half way through the decay
    assert lr_at(14, t) == pytest.approx(0.1) and lr_at(100, t) == pytest.approx(0.1)


def test_gradient_accumulation_matches_a_bigger_micro_batch(tiny):
    big = run(tiny("big", train={"micro_batch_size": 4, "grad_accum": 1}))
    accum = run(tiny("accum", train={"micro_batch_size": 2, "grad_accum": 2}))
    split = run(tiny("split", train={"micro_batch_size": 1, "global_batch_size": 4}))
    for other in (accum, split):
        assert other.losses == pytest.approx(big.losses, abs=1e-5)


def test_activation_checkpointing_does_not_change_training(tiny):
    plain = run(tiny("plain"))
    recompute = run(tiny("recompute", train={"activation_checkpointing": True}))
    assert recompute.losses == pytest.approx(plain.losses, abs=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_tracks_fp32(tiny, precision):
    small = {"model": {"vocab_size": 16}, "data": {"vocab_size": 16}}
    fp32 = run(tiny("fp32", train={"max_steps": 10, "lr": 1e-2, "micro_batch_size": 8}, **small))
    mixed = run(
        tiny(
            precision,
            precision=precision,
            train={"max_steps": 10, "lr": 1e-2, "micro_batch_size": 8},
            **small,
        )
    )
    assert all(math.isfinite(v) for v in mixed.losses.values())
    assert mixed.losses[10] < mixed.losses[1] - 0.2
    assert mixed.losses[1] == pytest.approx(fp32.losses[1], abs=2e-2)


def test_fp16_resume_restores_the_grad_scaler(tiny):
    whole = run(tiny("whole", precision="fp16"))
    cfg = tiny("split", precision="fp16")
    run(cfg, stop_requested=lambda step: step == 3)
    resumed = run(cfg)
    assert resumed.losses == {k: v for k, v in whole.losses.items() if k > 3}


@pytest.mark.slow
def test_torch_compile_trains_like_eager(tiny):
    eager = run(tiny("eager", train={"max_steps": 3}))
    compiled = run(tiny("compiled", train={"max_steps": 3, "compile": True}))
    assert compiled.losses == pytest.approx(eager.losses, abs=1e-4)
    # the compiled run's checkpoint holds plain parameter names: an eager run resumes it
    resumed = run(tiny("compiled", train={"max_steps": 4}))
    assert sorted(resumed.losses) == [4]


def test_init_from_a_hugging_face_folder(tiny, tmp_path):
    c = load_config(tiny())
    torch.manual_seed(3)
    source = GPT(c.model)
    hf_dir = save_hf(source, tmp_path / "hf")
    assert set(load_hf_state_dict(hf_dir)) >= {
        "transformer.wte.weight",
        "transformer.h.0.attn.c_attn.weight",
    }
    cfg = tiny("from_hf", model={"init_from": str(hf_dir)}, train={"max_steps": 1})
    started = run(cfg)
    first_batch = DummyTokens(257, 32, 4, c.train.seed, "train")
    x = torch.stack([first_batch.sample(i) for i in range(c.train.micro_batch_size)])
    with torch.no_grad():
        expected = source(x[:, :-1], x[:, 1:]).item()
    assert started.losses[1] == pytest.approx(expected, abs=1e-6)


def test_precision_can_change_on_resume(tiny):
    """An fp32 checkpoint (no grad-scaler state) resumes under fp16 and vice versa."""
    cfg = tiny()
    run(cfg, stop_requested=lambda step: step == 2)
    run({**cfg, "precision": "fp16"}, stop_requested=lambda step: step == 4)
    resumed = run({**cfg, "precision": "bf16"})
    assert sorted(resumed.losses) == [5, 6]
