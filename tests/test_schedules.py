"""Learning-rate schedules (train.lr_schedule): their shapes, their checks, exact resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import DUMMY_DATA

from trainer.config import ConfigError, load_config
from trainer.optim import lr_at
from trainer.run_dir import METRICS, read_jsonl
from trainer.train import run

pytestmark = pytest.mark.usefixtures("one_thread")


def train_config(**train):
    return load_config({"data": dict(DUMMY_DATA), "train": train}).train


BASE = {"lr": 1.0, "min_lr": 0.1, "warmup_steps": 4, "max_steps": 20}
WARMUP = [0.25, 0.5, 0.75, 1.0]


def test_cosine_is_the_default_and_unchanged():
    """Linear warmup, then cosine to min_lr at max_steps, exactly as before the schedules."""
    t = train_config(**BASE)
    assert t.lr_schedule == "cosine"
    for step in range(30):
        if step < 4:
            want = (step + 1) / 4
        else:
            progress = min(1.0, (step - 4) / 16)
            want = 0.1 + 0.5 * (1.0 + math.cos(math.pi * progress)) * 0.9
        assert lr_at(step, t) == want, step


@pytest.mark.parametrize(
    "shape, remaining",
    [("linear", lambda p: 1 - p), ("1-sqrt", lambda p: 1 - math.sqrt(p))],
)
def test_wsd_warms_up_stays_then_decays_over_the_last_fraction(shape, remaining):
    """decay_fraction 0.25 of 20 steps: steps 15..19 decay, min_lr is reached at step 20."""
    t = train_config(**BASE, lr_schedule="wsd", decay_fraction=0.25, decay_shape=shape)
    lrs = [lr_at(step, t) for step in range(21)]
    assert lrs[:4] == WARMUP
    assert lrs[4:16] == [1.0] * 12  # stable, and the decay's first step starts at lr
    for step in range(15, 21):
        progress = (step - 15) / 5
        assert lrs[step] == pytest.approx(0.1 + 0.9 * remaining(progress)), step
    assert lrs[20] == pytest.approx(0.1) and lr_at(25, t) == pytest.approx(0.1)
    # 1-sqrt falls fast first: after one decay step it has lost 45% of the way, linear 20%
    assert lrs[16] == pytest.approx(1 - 0.9 * (0.2 if shape == "linear" else math.sqrt(0.2)))


def test_wsd_decay_may_be_the_whole_run_after_warmup():
    t = train_config(**BASE, lr_schedule="wsd", decay_fraction=0.8, decay_shape="linear")
    assert [lr_at(s, t) for s in range(5)] == [*WARMUP, 1.0]
    assert lr_at(12, t) == pytest.approx(0.1 + 0.9 * (1 - 8 / 16))


def test_constant_stays_at_lr_after_warmup():
    t = train_config(**BASE, lr_schedule="constant")
    assert [lr_at(s, t) for s in range(8)] == [*WARMUP, 1.0, 1.0, 1.0, 1.0]
    assert lr_at(19, t) == lr_at(1000, t) == 1.0


@pytest.mark.parametrize(
    "train, message",
    [
        (
            {"lr_schedule": "linear"},
            "train.lr_schedule='linear': expected one of cosine, wsd, constant",
        ),
        ({"decay_shape": "sqrt"}, "train.decay_shape='sqrt': expected one of linear, 1-sqrt"),
        ({"decay_fraction": 0.0}, "train.decay_fraction=0.0: must be in (0, 1]"),
        ({"decay_fraction": 1.5}, "train.decay_fraction=1.5: must be in (0, 1]"),
        (
            {"lr_schedule": "wsd", "decay_fraction": 0.9},
            "train.warmup_steps=4 + the decay (train.decay_fraction=0.9: 18 steps) exceed "
            "train.max_steps=20",
        ),
        (
            {"lr_schedule": "wsd", "decay_fraction": 0.01},
            "train.decay_fraction=0.01: decays over no step of train.max_steps=20",
        ),
    ],
)
def test_bad_schedules_are_one_line_naming_the_key(train, message):
    with pytest.raises(ConfigError) as err:
        train_config(**BASE, **train)
    assert str(err.value) == message


def test_wsd_run_resumed_in_its_decay_is_bitwise_exact(tiny):
    """Stopped in the decay phase and resumed, a WSD run has the uninterrupted run's losses
    and learning rates: the schedule is a function of the step alone."""
    sections = {
        "train": {
            "max_steps": 8,
            "warmup_steps": 2,
            "lr_schedule": "wsd",
            "decay_fraction": 0.5,
            "min_lr": 1e-4,
        }
    }
    whole = run(tiny("whole", **sections))
    cfg = tiny("split", **sections)
    first = run(cfg, stop_requested=lambda step: step == 5)
    second = run(cfg)
    assert first.step == 5 and second.resumed_from is not None
    assert {**first.losses, **second.losses} == whole.losses
    lrs = [r["lr"] for r in read_jsonl(Path(cfg["run"]["dir"]) / METRICS)]
    t = load_config(cfg).train
    assert lrs == [lr_at(step, t) for step in range(8)]
    assert lrs[2:5] == [1e-3] * 3 and lrs[5] < 1e-3  # stable, then the decay (steps 5..8)
