"""Checkpoints from elsewhere: nothing in them executes, damage is found before loading, and
resuming never silently loses, mixes or restarts a run."""

from __future__ import annotations

import json
import operator
import os
import pickle
import shutil
from pathlib import Path

import pytest

from jobs import export as export_cli
from jobs import generate as generate_cli
from jobs.train import main as train_main
from trainer import resume
from trainer.checkpoint import CheckpointError
from trainer.checkpoint_files import (
    CHECKSUM,
    COMPLETE_MARK,
    METADATA,
    TRAINER_STATE,
    checksum_file,
    read_metadata,
)
from trainer.run_dir import CHECKPOINTS, METRICS, TRAIN_LOG, read_jsonl
from trainer.train import run

pytestmark = pytest.mark.usefixtures("one_thread")


def step_dir(cfg: dict, step: int) -> Path:
    return Path(cfg["run"]["dir"]) / CHECKPOINTS / f"step_{step}"


def reseal(folder: Path) -> None:
    """Recompute complete.json for the files as they are now (what an attacker would do)."""
    mark = folder / COMPLETE_MARK
    listed = json.loads(mark.read_text())
    for name in listed["files"]:
        listed["files"][name] = {
            "size": (folder / name).stat().st_size,
            CHECKSUM: checksum_file(folder / name),
        }
    mark.write_text(json.dumps(listed))


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def one_error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


class _RunCommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Crafted:
    """Unpickles by running a command, then hands back the genuine metadata."""

    def __init__(self, marker: Path, genuine):
        self.marker, self.genuine = marker, genuine

    def __reduce__(self):
        return (operator.getitem, ((_RunCommand(self.marker), self.genuine), 1))


def plant_crafted_metadata(folder: Path, marker: Path) -> None:
    genuine = read_metadata(folder)
    (folder / METADATA).write_bytes(pickle.dumps(_Crafted(marker, genuine)))
    reseal(folder)


@pytest.fixture
def trained(tiny):
    cfg = tiny("trained", train={"max_steps": 4}, checkpoint={"interval": 2})
    run(cfg)
    return cfg


def test_the_crafted_file_really_runs_code_under_plain_pickle(trained, tmp_path):
    """The attack the unpickler stops: torch's own reader would execute it, then load fine."""
    folder = step_dir(trained, 4)
    marker = tmp_path / "pwned"
    plant_crafted_metadata(folder, marker)
    with open(folder / METADATA, "rb") as f:
        assert type(pickle.load(f)).__name__ == "Metadata"
    assert marker.exists()


@pytest.mark.parametrize("command", ["generate", "export", "resume_path", "resume_auto"])
def test_crafted_metadata_never_executes(trained, tmp_path, capsys, command):
    folder = step_dir(trained, 4)
    shutil.rmtree(step_dir(trained, 2))  # resume=auto has nothing to fall back to
    marker = tmp_path / "pwned"
    plant_crafted_metadata(folder, marker)
    run_dir = trained["run"]["dir"]
    argv = {
        "generate": (generate_cli.main, [f"checkpoint={folder}", "prompt=a", "device=cpu"]),
        "export": (export_cli.main, [f"checkpoint={folder}", f"out={tmp_path / 'x'}"]),
        "resume_path": (
            train_main,
            ["data=dummy", f"resume={folder}", f"run.dir={tmp_path / 'new'}", "device=cpu"],
        ),
        "resume_auto": (train_main, ["data=dummy", f"run.dir={run_dir}", "device=cpu"]),
    }
    main, args = argv[command]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    line = one_error_line(capsys, "dlt-train" if main is train_main else f"dlt-{command}")
    assert f"{folder / METADATA}: not valid DCP metadata (it refers to _operator.getitem" in line
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage",
    [
        "distcp",
        "metadata_byte",
        "metadata_garbage",
        "trainer_state_edit",
        "trainer_state_json",
        "mark",
    ],
)
def test_damaged_newest_checkpoint_falls_back_with_a_reason(tiny, damage):
    cfg = tiny("damaged", train={"max_steps": 4}, checkpoint={"interval": 2})
    whole = run(tiny("whole", train={"max_steps": 6}))
    run(cfg)
    newest = step_dir(cfg, 4)
    if damage == "distcp":
        flip_byte(next(newest.glob("*.distcp")))
    elif damage == "metadata_byte":
        flip_byte(newest / METADATA, offset=40)
    elif damage == "metadata_garbage":
        (newest / METADATA).write_bytes(b"\xff\xfe garbage" * 10)
        reseal(newest)  # sizes and sums match: only the parse can tell
    elif damage == "trainer_state_edit":
        state = json.loads((newest / TRAINER_STATE).read_text())
        state["data"]["samples_consumed"] = state["data"].get("samples_consumed", 0) + 1
        (newest / TRAINER_STATE).write_text(json.dumps(state))
    elif damage == "trainer_state_json":
        (newest / TRAINER_STATE).write_text("{not json")
        reseal(newest)
    else:
        (newest / COMPLETE_MARK).write_text("{")
    cfg["train"]["max_steps"] = 6
    result = run(cfg)
    assert result.resumed_from == step_dir(cfg, 2)
    log = (Path(cfg["run"]["dir"]) / TRAIN_LOG).read_text()
    assert "skipping checkpoint step_4:" in log
    moved = list((Path(cfg["run"]["dir"]) / CHECKPOINTS).glob("broken-*/step_4"))
    assert len(moved) == 1  # kept for a post-mortem, never pruned or overwritten
    assert {s: result.losses[s] for s in (3, 4, 5, 6)} == {s: whole.losses[s] for s in (3, 4, 5, 6)}


def test_all_checkpoints_broken_refuses_instead_of_starting_afresh(trained, capsys):
    for step in (2, 4):
        flip_byte(next(step_dir(trained, step).glob("*.distcp")))
    run_dir = Path(trained["run"]["dir"])
    history = (run_dir / METRICS).read_text()
    with pytest.raises(SystemExit) as exit_info:
        train_main(["data=dummy", f"run.dir={run_dir}", "device=cpu", "log.progress=false"])
    assert exit_info.value.code == 2
    line = one_error_line(capsys, "dlt-train")
    assert "none of its 2 checkpoint(s) can be resumed" in line and "step_4" in line
    assert (run_dir / METRICS).read_text() == history  # nothing erased
    assert step_dir(trained, 2).is_dir() and step_dir(trained, 4).is_dir()
    # resume=none refuses too: a fresh start needs another run.dir
    with pytest.raises(SystemExit):
        train_main(["data=dummy", f"run.dir={run_dir}", "resume=none", "device=cpu"])
    assert "already holds checkpoints" in one_error_line(capsys, "dlt-train")


def test_explicit_older_resume_moves_newer_checkpoints_aside(tiny):
    cfg = tiny("rollback", train={"max_steps": 8}, checkpoint={"interval": 2, "keep": 5})
    run(cfg)
    run_dir = Path(cfg["run"]["dir"])
    back = dict(cfg, resume=str(step_dir(cfg, 4)))
    back["train"] = dict(cfg["train"], max_steps=6, lr=5e-4)  # a different future
    result = run(back, stop_requested=lambda step: step == 5)
    assert result.resumed_from == step_dir(cfg, 4) and result.step == 5
    aside = list((run_dir / CHECKPOINTS).glob("abandoned-*"))
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["step_6", "step_8"]
    log = (run_dir / TRAIN_LOG).read_text()
    assert "moved aside" in log and "checkpoint saved: " + str(step_dir(cfg, 5)) in log
    # after a crash, resume=auto continues the new line of steps, not the abandoned one
    again = run(dict(back, resume="auto"))
    assert again.resumed_from == step_dir(cfg, 5) and again.step == 6
    assert (
        json.loads((step_dir(cfg, 6) / TRAINER_STATE).read_text())["config"]["train"]["lr"] == 5e-4
    )


def test_a_complete_run_says_so_and_trains_nothing(trained, capsys):
    run_dir = Path(trained["run"]["dir"])
    history = (run_dir / METRICS).read_text()
    result = run(trained)
    assert result.step == 4 and result.losses == {}
    assert "is already complete: step 4 of train.max_steps=4" in capsys.readouterr().out
    assert (run_dir / METRICS).read_text() == history


def test_checksums_are_recorded_for_every_file(trained):
    folder = step_dir(trained, 4)
    files = json.loads((folder / COMPLETE_MARK).read_text())["files"]
    assert set(files) == {p.name for p in folder.iterdir()} - {COMPLETE_MARK}
    for name, entry in files.items():
        assert entry == {
            "size": (folder / name).stat().st_size,
            CHECKSUM: checksum_file(folder / name),
        }


def test_other_format_version_is_refused(trained, capsys):
    folder = step_dir(trained, 4)
    state = json.loads((folder / TRAINER_STATE).read_text())
    (folder / TRAINER_STATE).write_text(json.dumps({**state, "format_version": 99}))
    reseal(folder)
    with pytest.raises(CheckpointError, match="format_version 99"):
        resume.resolve(folder)


def test_resume_path_must_name_a_step_folder(trained, tmp_path, capsys):
    odd = tmp_path / "my_checkpoint"
    shutil.copytree(step_dir(trained, 4), odd)
    with pytest.raises(SystemExit):
        train_main(["data=dummy", f"resume={odd}", f"run.dir={tmp_path / 'new'}", "device=cpu"])
    assert "named step_<N>" in one_error_line(capsys, "dlt-train")


def test_torn_metrics_line_does_not_block_resume(tiny):
    cfg = tiny("torn", checkpoint={"interval": 0})
    run(cfg, stop_requested=lambda step: step == 3)
    metrics = Path(cfg["run"]["dir"]) / METRICS
    with open(metrics, "a") as f:
        f.write('{"step": 4, "lo')  # a full disk mid-write
    result = run(cfg)
    assert result.step == 6
    assert [r["step"] for r in read_jsonl(metrics)] == [1, 2, 3, 4, 5, 6]


def test_status_reports_the_checkpoint_resume_would_take(trained, capsys):
    from jobs import status

    status.main([trained["run"]["dir"]])
    assert f"last checkpoint: step 4: {step_dir(trained, 4)} (checksums match)" in (
        capsys.readouterr().out
    )
    flip_byte(next(step_dir(trained, 4).glob("*.distcp")))
    status.main([trained["run"]["dir"]])
    out = capsys.readouterr().out
    assert f"last checkpoint: step 2: {step_dir(trained, 2)} (checksums match)" in out
    assert "damaged:         step_4: " in out and "does not match its crc32 checksum" in out
    status.main([trained["run"]["dir"], "--no-verify"])  # sizes only: the flip goes unseen
    assert f"last checkpoint: step 4: {step_dir(trained, 4)}\n" in capsys.readouterr().out


def test_a_restarted_explicit_resume_continues_instead_of_starting_over(trained, tiny):
    """sbatch requeues, submitit and torchrun restarts repeat the same resume=PATH: the run
    goes on from its own newest checkpoint that descends from PATH."""
    cfg = tiny("finetune", train={"max_steps": 8})
    cfg["resume"] = str(step_dir(trained, 2))
    first = run(cfg, stop_requested=lambda step: step == 5)
    assert first.resumed_from == step_dir(trained, 2) and first.step == 5
    again = run(cfg)  # the same command line, as a requeued job runs it
    assert again.resumed_from == step_dir(cfg, 5) and again.step == 8
    assert not list((Path(cfg["run"]["dir"]) / CHECKPOINTS).glob("abandoned-*"))
    log = (Path(cfg["run"]["dir"]) / TRAIN_LOG).read_text()
    assert "continuing this run from step_5, which descends from it" in log


def test_a_chained_explicit_resume_continues_its_own_line_when_restarted(trained, tiny):
    """A -> B (resume=A's step) -> C (resume=B's step): a restarted C continues from C's own
    checkpoint (its line descends from its own resume=PATH, not from A's)."""
    b = tiny("b", train={"max_steps": 6})
    b["resume"] = str(step_dir(trained, 2))
    run(b)
    c = tiny("c", train={"max_steps": 9})
    c["resume"] = str(step_dir(b, 6))
    assert run(c, stop_requested=lambda step: step == 7).step == 7
    again = run(c)  # the requeued job repeats the same command line
    assert again.resumed_from == step_dir(c, 7) and again.step == 9
    assert not list((Path(c["run"]["dir"]) / CHECKPOINTS).glob("abandoned-*"))


def test_a_refused_explicit_resume_moves_nothing(tiny, capsys):
    cfg = tiny("refused_rollback", train={"max_steps": 6}, checkpoint={"interval": 2})
    run(cfg)
    before = sorted(p.name for p in (Path(cfg["run"]["dir"]) / CHECKPOINTS).iterdir())
    args = ["data=dummy", f"run.dir={cfg['run']['dir']}", "device=cpu", "model.n_layer=3"]
    with pytest.raises(SystemExit):
        train_main([*args, f"resume={step_dir(cfg, 2)}"])
    assert "model.n_layer=3 but checkpoint" in one_error_line(capsys, "dlt-train")
    assert sorted(p.name for p in (Path(cfg["run"]["dir"]) / CHECKPOINTS).iterdir()) == before


def test_another_format_version_is_refused_not_skipped(trained, capsys):
    folder = step_dir(trained, 4)
    state = json.loads((folder / TRAINER_STATE).read_text())
    (folder / TRAINER_STATE).write_text(json.dumps({**state, "format_version": 2}))
    reseal(folder)
    with pytest.raises(SystemExit):
        train_main(["data=dummy", f"run.dir={trained['run']['dir']}", "device=cpu"])
    assert "format_version 2, but this trainer reads version 1" in one_error_line(
        capsys, "dlt-train"
    )
    assert folder.is_dir()  # not moved aside: it is not damaged, and the run did not go back


def test_readers_name_a_damaged_checkpoint_but_move_nothing(trained, tmp_path, capsys):
    flip_byte(next(step_dir(trained, 4).glob("*.distcp")))
    export_cli.main([f"checkpoint={trained['run']['dir']}", f"out={tmp_path / 'x'}"])
    assert "skipping checkpoint step_4" in capsys.readouterr().out
    assert step_dir(trained, 4).is_dir()  # the run directory is the trainer's to change
