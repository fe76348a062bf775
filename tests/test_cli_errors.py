"""`errors_as_one_line`: OS errors, huge numbers, run-directory errors and torchrun ranks."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import eval as eval_cli
from jobs import export, generate, plot, prep, status, train
from jobs.cli import errors_as_one_line
from trainer.checkpoint import CheckpointError
from trainer.config import ConfigError
from trainer.run_dir import RunDirError
from trainer.train import run

LONG = "x" * 300  # one path component longer than any file system allows (255)


def one_error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
    return err.strip()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.ENAMETOOLONG])
def test_os_error_is_one_line_naming_the_file(code, capsys):
    with pytest.raises(SystemExit) as exit_info, errors_as_one_line("dlt-x"):
        raise OSError(code, os.strerror(code), "/runs/a/metrics.jsonl")
    assert exit_info.value.code == 2
    line = one_error_line(capsys, "dlt-x")
    assert line == f"dlt-x: error: /runs/a/metrics.jsonl: {os.strerror(code)}"


def test_os_error_of_a_rename_names_both_files(capsys):
    with pytest.raises(SystemExit), errors_as_one_line("dlt-x"):
        os.rename("/nonexistent/a", "/nonexistent/b")
    assert "/nonexistent/a -> /nonexistent/b: No such file" in one_error_line(capsys, "dlt-x")


def test_run_dir_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info, errors_as_one_line("dlt-train"):
        raise RunDirError("run.dir runs/a is in use by another trainer (pid 1 on h)")
    assert exit_info.value.code == 2
    assert "in use by another trainer" in one_error_line(capsys, "dlt-train")


@pytest.mark.parametrize("mode", [[], ["--multirun"]], ids=["run", "sweep"])
def test_huge_integer_override_is_one_line_naming_it(tmp_path, capsys, mode):
    with pytest.raises(SystemExit) as exit_info:
        train.main([*mode, "data=dummy", f"run.dir={tmp_path}", "train.max_steps=" + "9" * 5000])
    assert exit_info.value.code == 2
    line = one_error_line(capsys, "dlt-train")
    assert "train.max_steps=999" in line and "5000 digits" in line and len(line) < 200


@pytest.mark.parametrize(
    "error, printed_on_rank_1",
    [
        (ConfigError("model.n_head=5 must divide model.n_embd=192"), False),
        (CheckpointError("step_4: incomplete"), True),
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "ckpt/x.distcp"), True),
    ],
)
def test_config_errors_are_printed_by_rank_0_only(error, printed_on_rank_1, monkeypatch, capsys):
    for rank, printed in (("0", True), ("1", printed_on_rank_1)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exit_info, errors_as_one_line("dlt-train"):
            raise error
        assert exit_info.value.code == 2  # every rank exits 2
        assert bool(capsys.readouterr().err) == printed, rank


@pytest.mark.multiproc
def test_config_error_under_torchrun_is_printed_once(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
         "jobs.train", "data=dummy", "model.n_head=5", f"run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dlt-train: error:")]
    assert errors == ["dlt-train: error: model.n_head=5 must divide model.n_embd=192"]


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory) -> Path:
    from conftest import tiny_config

    cfg = tiny_config(tmp_path_factory.mktemp("runs") / "run", train={"max_steps": 2})
    run(cfg)
    return Path(cfg["run"]["dir"])


COMMANDS = {
    "dlt-train": lambda d, long: train.main(["data=dummy", f"run.dir={long}"]),
    "dlt-prep": lambda d, long: prep.main([f"data.out={long}"]),
    "dlt-generate": lambda d, long: generate.main([f"checkpoint={long}"]),
    "dlt-eval": lambda d, long: eval_cli.main([f"checkpoint={d}", f"eval.hellaswag={long}"]),
    "dlt-export": lambda d, long: export.main([f"checkpoint={d}", f"out={long}"]),
    "dlt-plot": lambda d, long: plot.main([str(d), f"out={long}"]),
    "dlt-status": lambda d, long: status.main([str(long)]),
}


@pytest.mark.parametrize("prog", list(COMMANDS))
def test_a_too_long_file_name_is_one_line_in_every_command(
    prog, checkpointed_run, tmp_path, capsys
):
    long = tmp_path / LONG / "more"
    with pytest.raises(SystemExit) as exit_info:
        COMMANDS[prog](checkpointed_run, long)
    assert exit_info.value.code == 2
    line = one_error_line(capsys, prog)
    assert LONG in line and "File name too long" in line
