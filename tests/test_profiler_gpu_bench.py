"""The profiler window (`profile.*`), the GPU benchmark suite at smoke size, and the
vectorised dummy data."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from trainer.config import ConfigError, load_config
from trainer.data import DummyTokens
from trainer.profiling import FOLDER
from trainer.run_dir import TRAIN_LOG
from trainer.train import run

# ----------------------------------------------------------------------------- profiler


def trace_names(path: Path) -> list[str]:
    """The event names of a Chrome trace (it must load as JSON)."""
    return [e.get("name", "") for e in json.loads(path.read_text())["traceEvents"]]


def no_cuda_memory_calls(monkeypatch) -> None:
    """The CUDA memory history must never be touched on a CPU run."""

    def refuse(*args, **kwargs):
        raise AssertionError("a CPU run called the CUDA memory history")

    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", refuse)
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", refuse)


def test_profile_window_writes_a_trace_of_those_steps_and_changes_no_loss(tiny, monkeypatch):
    no_cuda_memory_calls(monkeypatch)
    plain = run(tiny("plain"))
    cfg = tiny("profiled", profile={"enabled": True, "start_step": 2, "steps": 2})
    profiled = run(cfg)
    assert profiled.losses == plain.losses  # bitwise: profiling only observes

    folder = Path(cfg["run"]["dir"]) / FOLDER
    assert sorted(p.name for p in folder.iterdir()) == ["trace_rank0_steps_2-3.json"]
    names = trace_names(folder / "trace_rank0_steps_2-3.json")
    steps = sorted({n for n in names if n.startswith("train_step ")})
    assert steps == ["train_step 2", "train_step 3"]  # the window, and nothing around it
    assert names.count("Optimizer.step#AdamW.step") == 2  # one optimizer step each
    assert "aten::embedding" in names  # the forward ...
    assert "EmbeddingBackward0" in names  # ... and the backward
    log = (Path(cfg["run"]["dir"]) / TRAIN_LOG).read_text()
    assert log.count("profile: steps 2-3 recorded into") == 1


def test_a_run_resumed_after_the_window_does_not_profile_again(tiny):
    cfg = tiny(profile={"enabled": True, "start_step": 2, "steps": 1})
    run(cfg, stop_requested=lambda step: step == 3)
    folder = Path(cfg["run"]["dir"]) / FOLDER
    first = (folder / "trace_rank0_steps_2-2.json").read_bytes()
    resumed = run(cfg)
    assert resumed.resumed_from is not None and sorted(resumed.losses) == [4, 5, 6]
    assert [p.name for p in folder.iterdir()] == ["trace_rank0_steps_2-2.json"]
    assert (folder / "trace_rank0_steps_2-2.json").read_bytes() == first
    log = (Path(cfg["run"]["dir"]) / TRAIN_LOG).read_text()
    assert "profile: not profiling: the window (steps 2-2) starts before this run's first " in log


def test_a_run_that_stops_inside_the_window_writes_no_trace(tiny):
    cfg = tiny(profile={"enabled": True, "start_step": 2, "steps": 3})
    stopped = run(cfg, stop_requested=lambda step: step == 3)
    assert stopped.step == 3
    assert not (Path(cfg["run"]["dir"]) / FOLDER).exists()
    log = (Path(cfg["run"]["dir"]) / TRAIN_LOG).read_text()
    assert "profile: the run stopped inside steps 2-4: no trace" in log


@pytest.mark.parametrize(
    "profile, message",
    [
        ({"start_step": 0}, "profile.start_step=0: must be a positive number"),
        ({"steps": 0}, "profile.steps=0: must be a positive number"),
        (
            {"enabled": True, "start_step": 5, "steps": 3},
            "profile.start_step=5 + profile.steps=3: the window ends at step 7, after "
            "train.max_steps=6",
        ),
    ],
)
def test_bad_profile_keys_are_one_line_naming_the_key(tiny, profile, message):
    with pytest.raises(ConfigError, match="^" + message.replace("+", r"\+") + "$"):
        load_config(tiny(profile=profile))


def test_a_window_past_the_end_is_fine_while_profiling_is_off(tiny):
    assert not load_config(tiny(profile={"start_step": 50})).profile.enabled


# --------------------------------------------------------------------------- dummy data


def test_dummy_sample_is_a_pure_function_of_seed_split_and_index():
    a = DummyTokens(257, 64, 4, seed=3, split="train")
    b = DummyTokens(257, 64, 4, seed=3, split="train")
    sample = a.sample(12345)
    assert sample.dtype == torch.int64 and sample.shape == (65,)
    assert torch.equal(sample, b.sample(12345))  # any process makes any sample
    assert torch.equal(a.sample(7), DummyTokens(257, 64, 4, 3, "train").sample(7))
    assert not torch.equal(sample, a.sample(12346))
    assert not torch.equal(sample, DummyTokens(257, 64, 4, 3, "val").sample(12345))
    assert not torch.equal(sample, DummyTokens(257, 64, 4, 4, "train").sample(12345))


def test_dummy_tokens_have_exactly_branching_successors_each():
    """The stream is learnable down to ln(branching): from every token exactly `branching`
    successors occur (over enough samples), all ids inside the vocabulary."""
    source = DummyTokens(16, 256, 3, seed=1, split="train")
    successors: dict[int, set[int]] = {}
    for i in range(20):
        tokens = source.sample(i).tolist()
        assert min(tokens) >= 0 and max(tokens) < 16
        for now, after in itertools.pairwise(tokens):
            successors.setdefault(now, set()).add(after)
    assert sorted(successors) == list(range(16))  # the walk visits the whole vocabulary
    assert {len(s) for s in successors.values()} == {3}


def test_dummy_branching_above_the_vocabulary_is_refused(tiny):
    with pytest.raises(ConfigError, match=r"^data\.dummy_branching=300: must be at most data"):
        load_config(tiny(data={"dummy_branching": 300}))
