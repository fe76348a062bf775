"""One trainer per run directory, no checkpoint of a diverged run, visible resumes, Ctrl-C,
a full disk, and checks that fire before the first step instead of after the work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_loader import docs_with_total, make_dataset

from jobs.train import main as train_main
from trainer import checkpoint, distributed
from trainer.config import ConfigError
from trainer.errors import TrainingError
from trainer.run_dir import (
    CHECKPOINTS,
    JOBS,
    METRICS,
    TRAIN_LOG,
    RunDirError,
    RunDirLock,
    read_jsonl,
)
from trainer.train import run
from trainer.trained import load_model

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


def one_error_line(capsys, prog: str = "dlt-train") -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def cli_args(cfg: dict, *extra: str) -> list[str]:
    m = cfg["model"]
    return [
        "data=dummy",
        f"run.dir={cfg['run']['dir']}",
        "device=cpu",
        "log.progress=false",
        "eval.interval=0",
        *(f"model.{k}={v}" for k, v in m.items()),
        *extra,
    ]


def hold_lock_in_another_process(run_dir: Path) -> subprocess.Popen:
    code = (
        "import sys, time; from trainer.run_dir import RunDirLock; "
        "RunDirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_second_trainer_is_refused_and_a_killed_holder_does_not_block(tiny, capsys):
    cfg = tiny("locked")
    run_dir = Path(cfg["run"]["dir"])
    holder = hold_lock_in_another_process(run_dir)
    try:
        with pytest.raises(SystemExit) as exit_info:
            train_main(cli_args(cfg))
        assert exit_info.value.code == 2
        line = one_error_line(capsys)
        assert f"run.dir {run_dir} is in use by another trainer (pid {holder.pid} on " in line
        assert not (run_dir / JOBS).exists()  # the holder's records are left alone
        assert not (run_dir / CHECKPOINTS).exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # as a preempted node or kill -9 would
        holder.wait()
    result = run(cfg)  # the requeued job: the lock died with its holder
    assert result.step == 6


def test_lock_is_released_when_the_run_ends(tiny):
    cfg = tiny("released")
    run(cfg)
    with RunDirLock(cfg["run"]["dir"]):
        pass
    with pytest.raises(RunDirError, match="in use by another trainer"):
        with RunDirLock(cfg["run"]["dir"]), RunDirLock(cfg["run"]["dir"]):
            pass


def test_a_refused_run_leaves_the_signal_handlers_as_they_were(tiny):
    """Ctrl-C and SIGTERM still work in the calling process (a notebook, a sweep) after a run
    refused for a locked run directory, and after one that finished."""
    cfg = tiny("handlers", train={"max_steps": 1})
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with RunDirLock(cfg["run"]["dir"]), pytest.raises(RunDirError):
        run(cfg)
    assert {sig: signal.getsignal(sig) for sig in before} == before
    run(cfg)
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_diverged_run_skips_its_updates_then_stops_in_one_line(tiny, capsys):
    """lr=1e30: step 1's update makes the loss NaN from step 2 on. Those updates are skipped
    (the weights stay those of step 1); after train.max_consecutive_skips=5 in a row the run
    stops with one line, writing no checkpoint from the step that stopped it."""
    cfg = tiny(
        "diverged", train={"lr": 1e30, "warmup_steps": 0}, checkpoint={"interval": 1, "keep": 6}
    )
    with pytest.raises(TrainingError, match=r"5 updates in a row skipped .*steps 2-6") as err:
        run(cfg)
    run_dir = Path(cfg["run"]["dir"])
    last = run_dir / CHECKPOINTS / "step_5"
    assert f"the last good one is {last} (the weights since step 1 are unchanged)" in str(err.value)
    assert [p.name for p in checkpoint.step_folders(run_dir)] == [f"step_{i}" for i in range(1, 6)]
    after_1, after_5 = (load_model(run_dir / CHECKPOINTS / f"step_{i}")[0] for i in (1, 5))
    for (name, a), b in zip(
        after_1.state_dict().items(), after_5.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    log = (run_dir / TRAIN_LOG).read_text()
    assert all(f"step {i}: update skipped: loss nan is not finite" in log for i in range(2, 7))
    assert [r["skipped"] for r in read_jsonl(run_dir / METRICS)] == [0, 1, 2, 3, 4]
    with pytest.raises(SystemExit) as exit_info:  # the same through dlt-train: one line
        train_main(cli_args(tiny("diverged2"), "train.lr=1e30", "train.warmup_steps=0"))
    assert exit_info.value.code == 2
    assert "5 updates in a row skipped" in one_error_line(capsys)


def test_non_finite_weights_are_never_checkpointed(tiny, monkeypatch):
    """An update that makes a weight infinite from finite gradients (here: an optimizer step
    that writes one) is not caught by skipping; the checkpoint of that step is refused."""
    step = torch.optim.AdamW.step

    def overflowing_step(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        self.param_groups[0]["params"][0].data[0, 0] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    cfg = tiny("overflow", checkpoint={"interval": 1})
    with pytest.raises(TrainingError, match="the weights are no longer finite at step 1") as err:
        run(cfg)
    assert "the last good one is none" in str(err.value)
    assert checkpoint.step_folders(cfg["run"]["dir"]) == []


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=inf", "train.lr=inf: must be a finite number"),
        ("train.lr=nan", "train.lr=nan: must be a positive number"),
        ("model.layer_norm_eps=-1", "model.layer_norm_eps=-1.0: must be a positive number"),
        ("train.cpu_threads=-2", "train.cpu_threads=-2: must be >= 0"),
        ("train.seed=-1", "train.seed=-1: must be >= 0"),
    ],
)
def test_values_that_cannot_train_are_refused(tiny, capsys, override, message):
    with pytest.raises(SystemExit):
        train_main(cli_args(tiny(), override))
    assert message in one_error_line(capsys)


def test_resume_lists_what_changed(tiny):
    cfg = tiny("changes", train={"max_steps": 4})
    run(cfg)
    cfg["train"] = dict(cfg["train"], max_steps=6, lr=5e-4, grad_accum=2)
    cfg["parallel"] = {"dp_shard": 1}
    run(cfg)
    log = (Path(cfg["run"]["dir"]) / TRAIN_LOG).read_text()
    line = next(x for x in log.splitlines() if "resuming with changes:" in x)
    for change in (
        "train.max_steps 4 -> 6",
        "train.lr 0.001 -> 0.0005",
        "train.grad_accum 1 -> 2",
        "global batch 2 -> 4 sequences per step",
    ):
        assert change in line


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.n_layer=3", "model.n_layer=3 but checkpoint"),
        ("data.dummy_branching=3", "data.dummy_branching=3 but run.dir="),
    ],
)
def test_resume_refuses_another_model_or_data(tiny, capsys, override, message):
    cfg = tiny("refused", train={"max_steps": 2})
    run(cfg)
    with pytest.raises(SystemExit):
        train_main(cli_args(cfg, override))
    line = one_error_line(capsys)
    assert message in line and ("another run.dir" in line or "start a new run" in line)


def test_explicit_resume_onto_other_data_is_allowed_and_said(tiny):
    cfg = tiny("source", train={"max_steps": 2})
    run(cfg)
    other = tiny("finetune", train={"max_steps": 3}, data={"dummy_branching": 3})
    other["resume"] = cfg["run"]["dir"]
    result = run(other)
    assert result.step == 3
    log = (Path(other["run"]["dir"]) / TRAIN_LOG).read_text()
    assert "data.dummy_branching 4 -> 3" in log


def test_validation_split_is_checked_before_the_first_step(tiny, tmp_path):
    """A validation split too short for one window fails before training, not at the first
    evaluation (a dataset without one trains with validation off: test_data_sources.py)."""
    short = tmp_path / "short_val.txt"
    short.write_text("ten bytes.")
    ds = make_dataset(tmp_path / "shortval", docs_with_total(4000, seed=1), val_input=[str(short)])
    data = {"kind": "shards", "path": str(ds), "tokenizer": None, "vocab_size": None}
    cfg = tiny("shortval", data=data, model={"vocab_size": None}, eval={"interval": 50})
    with pytest.raises(ConfigError, match="eval.interval=50: .*val split has 11 tokens, fewer"):
        run(cfg)
    assert not (Path(cfg["run"]["dir"]) / CHECKPOINTS).exists()


def test_cpu_threads_auto_uses_the_free_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert distributed.cpu_threads(0, local_size=1) == 15  # one core left for the loader
    assert distributed.cpu_threads(0, local_size=4) == 4
    assert distributed.cpu_threads(0, local_size=32) == 1
    assert distributed.cpu_threads(5, local_size=4) == 5  # asked for
    monkeypatch.setattr(os, "getloadavg", lambda: (14.2, 0.0, 0.0))  # a busy machine
    assert distributed.cpu_threads(0, local_size=1) == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.0, 0.0))
    assert distributed.cpu_threads(0, local_size=1) == 2  # quiet 2 cores: both
    monkeypatch.setattr(os, "getloadavg", lambda: (1.6, 0.0, 0.0))
    assert distributed.cpu_threads(0, local_size=1) == 1  # loaded 2 cores: one
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert distributed.cpu_threads(0, local_size=1) == 3


def test_the_thread_choice_is_in_the_first_line(tiny):
    cfg = tiny("threads", train={"cpu_threads": 3, "max_steps": 1})
    before = torch.get_num_threads()
    try:
        run(cfg)
    finally:
        torch.set_num_threads(before)
    first = (Path(cfg["run"]["dir"]) / TRAIN_LOG).read_text().splitlines()[0]
    assert "1 x cpu (3 threads each)" in first


# --- a full disk (a real one: a small tmpfs) ------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)])
    if done.returncode != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk: Path, leave_bytes: int) -> Path:
    filler = disk / "filler"
    stat = os.statvfs(disk)
    free = stat.f_bavail * stat.f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))
    return filler


def test_full_disk_is_one_line_and_loses_nothing(tiny, small_disk, capsys):
    cfg = tiny("full", checkpoint={"interval": 2})
    cfg["run"]["dir"] = str(small_disk / "run")
    whole = run(tiny("whole"))
    run(cfg, stop_requested=lambda step: step == 2)
    filler = fill(small_disk, leave_bytes=64 << 10)  # the next checkpoint cannot fit
    with pytest.raises(SystemExit) as exit_info:
        train_main(cli_args(cfg))
    assert exit_info.value.code == 2
    line = one_error_line(capsys)
    assert "No space left on device" in line and str(small_disk / "run") in line
    good = Path(cfg["run"]["dir"]) / CHECKPOINTS / "step_2"
    assert checkpoint.check(good) is None  # the last checkpoint is intact
    filler.unlink()  # space again: the run resumes from it and ends as if never stopped
    result = run(cfg)
    assert result.resumed_from == good and result.step == 6
    losses = {r["step"]: r["loss"] for r in read_jsonl(Path(cfg["run"]["dir"]) / METRICS)}
    assert losses == whole.losses


def test_read_only_run_dir_is_found_before_the_first_step(tiny, small_disk, capsys):
    cfg = tiny("read_only")
    cfg["run"]["dir"] = str(small_disk / "run")
    (small_disk / "run").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(SystemExit) as exit_info:
        train_main(cli_args(cfg))
    assert exit_info.value.code == 2
    line = one_error_line(capsys)
    assert "Read-only file system" in line and str(small_disk / "run") in line


# --- Ctrl-C ---------------------------------------------------------------------------------


SMALL = ("model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32")
# steps and checkpoints slow enough (~0.1 s, ~0.5 s) for a second signal to land inside them
SLOWER = ("model.n_layer=4", "model.n_embd=256", "model.n_head=4", "model.block_size=128")


def start_training(
    run_dir: Path, *launcher: str, model: tuple[str, ...] = SMALL, extra: tuple[str, ...] = ()
) -> subprocess.Popen:
    args = [
        *launcher,
        "-m",
        "jobs.train",
        "data=dummy",
        *model,
        "train.micro_batch_size=2",
        "train.max_steps=100000",
        "log.interval=1",
        "eval.interval=0",
        "checkpoint.interval=0",
        "log.progress=false",
        "device=cpu",
        f"run.dir={run_dir}",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_for_steps(run_dir: Path, proc: subprocess.Popen, steps: int = 3) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(read_jsonl(run_dir / METRICS)) >= steps:
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"training did not start: {proc.communicate()[0][-3000:]}")


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_says_one_line(tmp_path):
    run_dir = tmp_path / "ctrl_c"
    proc = start_training(run_dir, sys.executable)
    wait_for_steps(run_dir, proc)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    last = read_jsonl(run_dir / METRICS)[-1]["step"]
    assert f"stopping at step {last} (signal SIGINT)" in out
    assert checkpoint.latest(run_dir).name == f"step_{last}"
    assert read_jsonl(run_dir / JOBS)[-1]["outcome"] == "stopped"


@pytest.mark.slow
def test_second_ctrl_c_aborts_at_once(tmp_path):
    run_dir = tmp_path / "ctrl_c_twice"
    proc = start_training(run_dir, sys.executable, model=SLOWER)
    wait_for_steps(run_dir, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)  # two signals at once would reach Python's handler as one
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    assert "Traceback" not in out
    assert "interrupted (second Ctrl-C): stopped without a checkpoint" in out


@pytest.mark.slow
@pytest.mark.multiproc
def test_ctrl_c_under_torchrun_checkpoints_on_every_rank(tmp_path):
    """Ctrl-C reaches torchrun (its workers run in their own session); it passes SIGINT on
    and gives them 30 s: they agree on a step, write one checkpoint together and exit."""
    run_dir = tmp_path / "ctrl_c_torchrun"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    proc = start_training(
        run_dir, *torchrun, "--no-python", sys.executable, extra=("parallel=ddp",)
    )
    wait_for_steps(run_dir, proc)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert "KeyboardInterrupt" not in out  # the workers stop cleanly (torchrun reports itself)
    last = read_jsonl(run_dir / METRICS)[-1]["step"]
    assert out.count(f"stopping at step {last} (signal SIGINT)") == 1  # rank 0 only
    ckpt = checkpoint.latest(run_dir)
    assert ckpt.name == f"step_{last}" and checkpoint.check(ckpt) is None
