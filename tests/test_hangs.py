"""A rank that stops answering ends the run within `dist.timeout_s` (plus a short grace) with one
line naming the timeout and the rank, as a failure; NCCL's watchdog and flight recorder are set
up for GPU runs; the per-step stop agreement never touches a GPU; checkpoints of GPU runs are
written in the background by default."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_preemption import TRAIN, wait_for_steps, worker_pids

from jobs.node import FLIGHT_RECORDER, nccl_environment, prepare_nccl
from trainer import distributed
from trainer.checkpoint import saves_in_background
from trainer.config import ConfigError, load_config
from trainer.hangs import grace_s
from trainer.preemption import StopController, StopOnSignal
from trainer.run_dir import TRAIN_LOG
from trainer.train import run

TIMEOUT_S = 4
NCCL_OLD_NAMES = (
    "NCCL_ASYNC_ERROR_HANDLING",
    "TORCH_NCCL_TRACE_BUFFER_SIZE",
    "TORCH_NCCL_DEBUG_INFO_TEMP_FILE",
)


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("stopped_rank", [1, 0])
def test_a_stopped_rank_ends_the_run_within_the_timeout(tmp_path, stopped_rank):
    """SIGSTOP one rank of a 2-rank DDP run: the other waits dist.timeout_s in its next
    collective, then the job fails with one line naming the timeout and the stopped rank (no
    hang, no requeue). (Rank 0 too: under a local torchrun the store lives in torchrun.)"""
    waiting = 1 - stopped_rank
    run_dir = tmp_path / "ddp"
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"),
        *("-m", "jobs.train", *TRAIN, "parallel=ddp", "train.micro_batch_size=1"),
        *("train.max_steps=100000", f"dist.timeout_s={TIMEOUT_S}", f"run.dir={run_dir}"),
    ]
    err_file = tmp_path / "stderr.txt"
    with open(err_file, "w") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, text=True)
    stopped = None
    try:
        wait_for_steps(run_dir, proc, 5)
        stopped = worker_pids(proc.pid)[stopped_rank]  # a child of the torchrun we started
        os.kill(stopped, signal.SIGSTOP)
        started = time.monotonic()
        line = wait_for_line(err_file, "dlt-train: error: collective timed out", proc)
        took = time.monotonic() - started
    finally:
        if stopped is not None:  # torchrun would SIGKILL it only 30 s after the SIGTERM
            os.kill(stopped, signal.SIGKILL)
        returncode = proc.wait(timeout=60)
    assert returncode != 0  # a failure: the batch script and submitit do not requeue it
    assert f"(dist.timeout_s={TIMEOUT_S}) on rank {waiting}, after step " in line, line
    assert line.endswith(f": rank {stopped_rank} of 2 did not answer"), line
    # the timeout, the grace for the others to say they timed out too, a loaded 2-core margin
    assert took < TIMEOUT_S + grace_s(TIMEOUT_S) + 10, took


def wait_for_line(path: Path, start: str, proc: subprocess.Popen, timeout: float = 60) -> str:
    """The first line of `path` that begins with `start`, once it is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in path.read_text().splitlines():
            if line.startswith(start):
                return line
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"no line {start!r} in {path}:\n{path.read_text()[-3000:]}")


# ------------------------------------------------------------------ NCCL's watchdog and trace


def test_nccl_environment_sets_error_handling_and_the_flight_recorder(tmp_path):
    added = nccl_environment(tmp_path, {})
    assert added == {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
        "TORCH_FR_BUFFER_SIZE": "2000",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_FR_DUMP_TEMP_FILE": str(tmp_path / FLIGHT_RECORDER / "rank_"),
    }


def test_nccl_environment_keeps_what_the_user_set_under_any_name(tmp_path):
    user = {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "50",  # the older name of TORCH_FR_BUFFER_SIZE
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "/scratch/fr_",  # ... of TORCH_FR_DUMP_TEMP_FILE
    }
    assert nccl_environment(tmp_path, user) == {"TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}


def test_prepare_nccl_creates_the_dump_folder(tmp_path, monkeypatch):
    for name in [*nccl_environment(tmp_path, {}), *NCCL_OLD_NAMES]:
        monkeypatch.setenv(name, "")  # so that monkeypatch removes what prepare_nccl adds
        monkeypatch.delenv(name)
    prepare_nccl(tmp_path / "run")
    assert os.environ["TORCH_FR_DUMP_TEMP_FILE"] == str(
        tmp_path / "run" / FLIGHT_RECORDER / "rank_"
    )
    assert (tmp_path / "run" / FLIGHT_RECORDER).is_dir()


# ------------------------------------------------------------------ the per-step stop agreement


def test_the_stop_flag_is_agreed_on_a_cpu_tensor(monkeypatch):
    """The all-reduce after every step gets a CPU tensor (gloo on a CUDA run's default group),
    so the GPU stream never waits for it; the controller remembers the step it was asked at."""
    reduced: list[torch.Tensor] = []
    monkeypatch.setattr(distributed, "all_reduce_max", lambda t: reduced.append(t) or t)
    signals = StopOnSignal(signals=())
    stop = StopController(world_size=2, requested=lambda step: step >= 3, signals=signals)
    assert [stop(1), stop(2), stop(3)] == [False, False, True]
    assert [t.device.type for t in reduced] == ["cpu"] * 3
    assert stop.last_step == 3 and stop.reason == "stop requested"


# ------------------------------------------------------------------ config and checkpoint default


def test_a_cpu_run_saves_synchronously_by_default(tiny):
    """checkpoint.async_save=auto on CPU: written at the step (true: in the background)."""
    auto = run(tiny("auto", checkpoint={"interval": 2})).run_dir
    forced = run(tiny("forced", checkpoint={"interval": 2, "async_save": True})).run_dir
    assert "(written in " in (auto / TRAIN_LOG).read_text()
    assert "(async, complete " in (forced / TRAIN_LOG).read_text()


def test_async_checkpoints_by_default_on_cuda_only():
    cfg = load_config({})
    assert cfg.checkpoint.async_save == "auto" and cfg.dist.timeout_s == 1800
    assert saves_in_background("auto", torch.device("cuda", 0))
    assert not saves_in_background("auto", torch.device("cpu"))
    assert saves_in_background(True, torch.device("cpu"))
    assert not saves_in_background(False, torch.device("cuda", 0))


@pytest.mark.parametrize(
    "override, key",
    [
        ({"dist": {"timeout_s": 0}}, "dist.timeout_s=0"),
        ({"dist": {"timeout_s": -5}}, "dist.timeout_s=-5"),
        ({"checkpoint": {"async_save": "sometimes"}}, "checkpoint.async_save='sometimes'"),
    ],
)
def test_bad_timeout_or_async_setting_is_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(override)
    assert str(err.value).startswith(key) and "\n" not in str(err.value), err.value


def test_groups_made_after_init_wait_as_long_as_dist_timeout_s():
    """The device mesh's dimensions and the async-checkpoint group are made after
    init_process_group without a timeout of their own: they wait dist.timeout_s too, not
    torch's defaults (30 min on gloo, 10 on NCCL)."""
    c10d = torch.distributed.distributed_c10d
    before = c10d.default_pg_timeout, c10d.default_pg_nccl_timeout
    torch.distributed.init_process_group(
        "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1
    )
    try:
        distributed.set_default_timeout(datetime.timedelta(seconds=7))
        group = torch.distributed.new_group(backend="gloo")
        waits = group._get_backend(torch.device("cpu")).options._timeout
        assert waits == datetime.timedelta(seconds=7)
    finally:
        torch.distributed.destroy_process_group()
        c10d.default_pg_timeout, c10d.default_pg_nccl_timeout = before
