"""The profiler window (`profile.*`), the GPU benchmark suite at smoke size, and the
vectorised dummy data."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu, suite
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


@pytest.mark.multiproc
def test_every_rank_writes_its_own_trace(tiny, tmp_path):
    from multiproc import run_jobs

    cfg = tiny(
        "ddp",
        parallel={"dp_replicate": 2},
        train={"max_steps": 3, "micro_batch_size": 1},
        profile={"enabled": True, "start_step": 2, "steps": 2},
    )
    assert run_jobs(2, [("ddp", cfg, None)], tmp_path / "status") == {}
    folder = Path(cfg["run"]["dir"]) / FOLDER
    names = ["trace_rank0_steps_2-3.json", "trace_rank1_steps_2-3.json"]
    assert sorted(p.name for p in folder.iterdir()) == names
    for name in names:
        assert "train_step 3" in trace_names(folder / name)
    log = (Path(cfg["run"]["dir"]) / TRAIN_LOG).read_text()
    assert log.count("profile: steps 2-3 recorded into") == 1  # rank 0 says it once


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


# ----------------------------------------------------------------- dlt-bench suite=gpu

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results.md"


def table_rows(out: str) -> dict[str, str]:
    """The rows of the printed table by their first cell."""
    return {
        line.split("|")[1].strip(): line
        for line in out.splitlines()
        if line.startswith("| ") and not line.startswith("| case ")
    }


@pytest.mark.slow
def test_dlt_bench_suite_gpu_smoke_prints_every_row(tmp_path):
    before = RESULTS.read_bytes()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.suite", "suite=gpu", "size=smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "=== [1/1] gpu (size=smoke) ===" in out and suite.SMOKE_CAVEAT in out
    rows = table_rows(out)
    assert list(rows) == [case.label for case in gpu.active_cases(gpu.SIZES["smoke"])]
    for label, row in rows.items():
        cells = [c.strip() for c in row.split("|")[2:-1]]
        assert all(cells[:6]), f"{label}: {row}"  # tokens/s ... peak memory, no error
        assert float(cells[0].replace(",", "")) > 0 and float(cells[1]) > 0
    # the default attention=auto is the base row itself: measured once
    assert rows["item 3 after: model.attention=auto"].endswith(
        "| same config as: gpt2_small mb16 compiled |"
    )
    assert "bf16 matmul peak: " in out and " TFLOP/s measured" in out
    assert RESULTS.read_bytes() == before  # smoke figures never land in results.md
    assert list(tmp_path.iterdir()) == []  # nor anything else


def test_every_row_resolves_at_full_size():
    """Every row of the GPU run is a valid config: bf16 on CUDA, GPT-2's shapes, and the
    before/after rows change only the key they name."""
    full = gpu.SIZES["full"]
    base = gpu.resolve(gpu.overrides_of(gpu.CASES[0], full))
    for case in gpu.CASES:
        cfg = gpu.resolve(gpu.overrides_of(case, full))
        assert cfg.precision == "bf16" and cfg.model.block_size == 1024, case.label
        assert cfg.model.vocab_size == 50257 and cfg.train.compile == case.compiled
    first_of = {c.overrides[0].partition("=")[0]: c for c in gpu.CASES if c.overrides}
    assert set(first_of) == {
        "train.compile_loss",
        "model.loss_chunk_size",
        "model.pad_vocab_to_multiple",
        "model.attention",
    }
    for key, case in first_of.items():
        section, name = key.split(".")
        cfg = gpu.resolve(gpu.overrides_of(case, full))
        value = case.overrides[0].partition("=")[2]
        assert str(getattr(getattr(cfg, section), name)).lower() == value, case.label
        assert cfg.model.n_layer == base.model.n_layer


def test_the_cases_cover_the_grid_the_issue_asks_for():
    grid = {
        (c.micro_batch, c.compiled, c.checkpointing)
        for c in gpu.CASES
        if c.model == "gpt2_small" and not c.overrides
    }
    assert grid == {(m, c, a) for m in (16, 32) for c in (False, True) for a in (False, True)}
    assert any(c.model == "gpt2_medium" and c.compiled for c in gpu.CASES)


def test_a_failing_case_is_a_row_not_a_crash(monkeypatch):
    smoke = gpu.SIZES["smoke"]
    bad = gpu.overrides_of(gpu.CASES[0], smoke) + ["model.n_head=3"]
    error = gpu.run_case({"kind": "train", "overrides": bad}, smoke)["error"]
    assert error.startswith("failed: ConfigError: model.n_head=3 must divide model.n_embd")

    def out_of_memory(overrides, size):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    monkeypatch.setattr(gpu, "measure", out_of_memory)
    assert gpu.run_case({"kind": "train", "overrides": []}, smoke) == {"error": "out of memory"}
    cases = gpu.CASES[:2]
    results = {0: {"tflops": 1.0, "n": 8, "sizes": [8]}, 1: {"error": "out of memory"}}
    text = gpu.table(cases, {1: 1, 2: 1}, results, results[0])
    assert text.count("| out of memory |") == 2  # the case and the one that shares its config


def test_a_worker_out_of_time_leaves_timed_out_rows():
    jobs = [{"id": 0, "kind": "matmul", "label": "peak"}]
    assert gpu.run_jobs(jobs, "smoke", timeout=0.5) == {0: {"error": "timed out after 0 s"}}


def test_full_size_runs_each_case_in_its_own_process_within_the_budget():
    """size=full's way (here with smoke's tiny cases on the CPU): one worker per job, each
    job's result back; jobs the budget has no time left for are rows that say so."""
    jobs, _ = gpu.plan(gpu.CASES[:1], gpu.SIZES["smoke"])  # the matmul, the case
    results = gpu.run_all(jobs[1:], "smoke", budget_s=300, one_process=False)
    assert results[1]["tokens_per_s"] > 0 and results[1]["ms_per_step"] > 0
    spent = gpu.run_all(jobs, "smoke", budget_s=1, one_process=False)
    assert spent == {i: {"error": "not run: the 1 s budget was spent"} for i in (0, 1)}


def test_suite_all_leaves_the_gpu_suite_out(calls):
    suite.main([])
    assert "gpu" not in calls and list(calls) == suite.ALL
    suite.main(["suite=gpu"])
    assert calls["gpu"] == ["--no-write", "--size", "smoke"]


def test_gpu_full_size_without_cuda_is_refused_in_one_line(calls, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        suite.main(["suite=gpu", "size=full", "write=true"])
    assert exit_info.value.code == 2 and not calls
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "suite=gpu size=full needs a CUDA GPU" in err
