"""Checkpoints: exact resume, atomicity, retention, and refusing broken checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from trainer import checkpoint, resume
from trainer.checkpoint import CheckpointError
from trainer.config import ConfigError
from trainer.run_dir import CHECKPOINTS, CONFIG, METRICS, read_jsonl
from trainer.train import run


def metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / METRICS)


@pytest.mark.parametrize(
    "stop_at, sections",
    [
        (1, {}),
        (3, {}),
        (4, {"train": {"grad_accum": 2}}),  # accumulation state crosses nothing between steps
        (2, {"model": {"dropout": 0.1}}),  # dropout: the RNG state must be restored
        (3, {"train": {"grad_clip": 0.0, "weight_decay": 0.0}}),
    ],
)
def test_resume_is_bitwise_exact(tiny, stop_at, sections):
    """Stopped at step k and resumed, a run has exactly the losses of an uninterrupted one."""
    whole = run(tiny("whole", **sections))
    cfg = tiny("split", **sections)
    first = run(cfg, stop_requested=lambda step: step == stop_at)
    assert first.step == stop_at
    second = run(cfg)
    assert second.resumed_from == Path(cfg["run"]["dir"]) / CHECKPOINTS / f"step_{stop_at}"
    assert len(whole.losses) == 6
    assert {**first.losses, **second.losses} == whole.losses  # float equality: bitwise
    # metrics.jsonl reads as one uninterrupted run
    assert [r["loss"] for r in metrics(Path(cfg["run"]["dir"]))] == list(whole.losses.values())


def test_resume_drops_metrics_logged_after_the_checkpoint(tiny):
    cfg = tiny(checkpoint={"interval": 2})
    run(cfg, stop_requested=lambda step: step == 3)
    shutil.rmtree(Path(cfg["run"]["dir"]) / CHECKPOINTS / "step_3")  # as if step 3 never saved
    result = run(cfg)
    assert result.resumed_from.name == "step_2"
    assert [r["step"] for r in metrics(Path(cfg["run"]["dir"]))] == [1, 2, 3, 4, 5, 6]


def test_checkpoint_holds_state_and_keeps_last_k(tiny):
    cfg = tiny(checkpoint={"interval": 1, "keep": 2})
    result = run(cfg)
    run_dir = Path(cfg["run"]["dir"])
    kept = checkpoint.list_complete(run_dir)
    assert [p.name for p in kept] == ["step_5", "step_6"]
    assert not list((run_dir / CHECKPOINTS).glob(".step_*"))  # no temporary leftovers
    state = checkpoint.read_trainer_state(result.last_checkpoint)
    assert state["step"] == 6
    assert state["data"]["samples_consumed"] == 6 * 2
    assert state["config"]["model"]["n_embd"] == 32
    assert (run_dir / CONFIG).is_file()


def _break_last(run_dir: Path, how: str) -> Path:
    newest = checkpoint.latest(run_dir)
    if how == "no_mark":
        (newest / checkpoint.COMPLETE_MARK).unlink()
    elif how == "truncated":
        data = next(newest.glob("*.distcp"))
        data.write_bytes(data.read_bytes()[:-100])
    elif how == "missing_file":
        next(newest.glob("*.distcp")).unlink()
    return newest


@pytest.mark.parametrize("how", ["no_mark", "truncated", "missing_file"])
def test_broken_checkpoint_is_never_picked_and_fails_clearly(tiny, how):
    cfg = tiny(checkpoint={"interval": 3})
    run(cfg)
    run_dir = Path(cfg["run"]["dir"])
    broken = _break_last(run_dir, how)
    assert broken.name == "step_6"
    assert checkpoint.latest(run_dir).name == "step_3"  # resume=auto skips it
    with pytest.raises(CheckpointError, match="step_6") as err:
        resume.resolve(broken)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError):
        run({**cfg, "resume": str(broken)})
    resumed = run(cfg)  # auto: continues from step 3 and redoes 4..6
    assert resumed.resumed_from.name == "step_3"
    assert sorted(resumed.losses) == [4, 5, 6]


def test_abandoned_temporary_checkpoint_is_ignored(tiny):
    cfg = tiny()
    run(cfg)
    run_dir = Path(cfg["run"]["dir"])
    partial = run_dir / CHECKPOINTS / ".step_9.tmp"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"partial")
    assert checkpoint.latest(run_dir).name == "step_6"


def test_resume_none_refuses_a_run_dir_with_checkpoints(tiny):
    cfg = tiny()
    run(cfg)
    with pytest.raises(ConfigError, match="resume=none"):
        run({**cfg, "resume": "none"})


def test_resume_with_another_model_shape_fails_clearly(tiny):
    cfg = tiny()
    run(cfg, stop_requested=lambda step: step == 2)
    other = tiny(model={"n_embd": 64})
    with pytest.raises(ConfigError, match="model.n_embd=64"):
        run(other)


def test_explicit_resume_path_continues_in_a_new_run_dir(tiny):
    first = tiny("first")
    run(first, stop_requested=lambda step: step == 2)
    whole = run(tiny("whole"))
    ckpt = str(Path(first["run"]["dir"]) / CHECKPOINTS / "step_2")
    second = run(tiny("second", resume=ckpt))
    assert second.losses == {k: v for k, v in whole.losses.items() if k > 2}


def test_async_checkpoints_resume_exactly(tiny):
    """Checkpoints written in the background are complete and resume bitwise exactly."""
    whole = run(tiny("whole"))
    cfg = tiny("async", checkpoint={"interval": 2, "async_save": True})
    first = run(cfg, stop_requested=lambda step: step == 3)
    run_dir = Path(cfg["run"]["dir"])
    assert [p.name for p in checkpoint.list_complete(run_dir)] == ["step_2", "step_3"]
    assert first.last_checkpoint.name == "step_3"
    second = run(cfg)
    assert {**first.losses, **second.losses} == whole.losses
