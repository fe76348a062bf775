"""TensorBoard and W&B continue one series across a resume; dlt-plot draws runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from jobs.plot import main as plot_main
from trainer import checkpoint
from trainer.run_dir import CHECKPOINTS, METRICS, read_jsonl
from trainer.train import run


def crash_after_step_5(cfg: dict) -> Path:
    """Train to step 5 with checkpoints every 2 steps, then lose step 5's checkpoint: as if
    the job died after logging step 5 but before saving it."""
    run(cfg, stop_requested=lambda step: step == 5)
    run_dir = Path(cfg["run"]["dir"])
    shutil.rmtree(run_dir / CHECKPOINTS / "step_5")
    return run_dir


def test_tensorboard_series_is_continuous_across_a_resume(tiny):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny(checkpoint={"interval": 2}, log={"interval": 1, "tensorboard": True})
    run_dir = crash_after_step_5(cfg)
    resumed = run(cfg)  # from step 4: steps 5 and 6 again
    assert resumed.resumed_from.name == "step_4"
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("loss")]
    assert steps == [1, 2, 3, 4, 5, 6]  # strictly increasing, step 5 not duplicated
    losses = [e.value for e in events.Scalars("loss")]
    assert losses[-1] == pytest.approx(resumed.losses[6])


def test_wandb_offline_resume_reuses_the_stored_run_id(tiny, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny(checkpoint={"interval": 2}, log={"interval": 1, "wandb": {"mode": "offline"}})
    run_dir = crash_after_step_5(cfg)
    saved_ids = checkpoint.read_trainer_state(checkpoint.latest(run_dir))["logger_ids"]
    run(cfg)
    final_state = checkpoint.read_trainer_state(checkpoint.latest(run_dir))
    assert final_state["logger_ids"] == saved_ids and final_state["restarts"] == 1
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # one per attempt ...
    assert {r.name.rsplit("-", 1)[-1] for r in runs} == {saved_ids["wandb"]}  # ... one run id


def test_metrics_report_restarts_and_time_split(tiny):
    cfg = tiny(checkpoint={"interval": 2})
    run(cfg, stop_requested=lambda step: step == 2)
    run(cfg)
    rows = read_jsonl(Path(cfg["run"]["dir"]) / METRICS)
    assert [r["restarts"] for r in rows] == [0, 0, 1, 1, 1, 1]
    for r in rows:
        assert 0 <= r["time_data_s"] <= r["time_step_s"]
        assert 0 < r["time_optimizer_s"] <= r["time_step_s"]
        assert r["time_checkpoint_s"] >= 0 and len(r["memory_gib_per_device"]) == 1


def test_plot_draws_pngs_from_real_runs(tiny, tmp_path, capsys):
    a = tiny("a", eval={"interval": 3, "steps": 1})
    b = tiny("b", train={"lr": 3e-3})
    run(a)
    run(b)
    out = tmp_path / "plots"
    plot_main([a["run"]["dir"], b["run"]["dir"], f"out={out}"])
    for name in ("loss.png", "throughput.png", "memory.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000


GOOD = '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'


@pytest.mark.parametrize(
    "content, warning",
    [
        (GOOD + '{"step": 3, "lo', f"{METRICS}:3: not JSON"),  # torn by a crash
        (GOOD + "not json\n" + GOOD, f"{METRICS}:3: not JSON"),
        ("[1, 2]\n" + GOOD, f"{METRICS}:1: not a JSON object"),
        (GOOD + '{"step": "3", "loss": 1.0}\n', f"{METRICS}:3: step '3' is not an integer"),
        ('\n{"loss": 1.0}\n' + GOOD, f"{METRICS}:2: step None is not an integer"),
    ],
    ids=["torn", "not-json", "not-an-object", "string-step", "no-step"],
)
def test_plot_skips_a_bad_line_with_one_warning_and_still_plots(tmp_path, capsys, content, warning):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / METRICS).write_text(content)
    plot_main([str(run_dir), f"out={tmp_path / 'plots'}"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dlt-plot: warning: ") and warning in err
    assert (tmp_path / "plots" / "loss.png").read_bytes().startswith(b"\x89PNG")


def test_plot_warns_about_several_bad_lines_in_line_order(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / METRICS).write_text(GOOD + '{"step": 2.5, "loss": 1.0}\n' + GOOD + '{"step": 9, "lo')
    plot_main([str(run_dir), f"out={tmp_path / 'plots'}"])
    err = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[2] for line in err] == [
        f"{run_dir / METRICS}:3",
        f"{run_dir / METRICS}:6",
    ]


@pytest.mark.parametrize("content", ["", "not json\n", '{"step": 1.5, "loss": 2.0}\n'])
def test_plot_of_no_plottable_step_is_a_one_line_error(tmp_path, capsys, content):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / METRICS).write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        plot_main([str(run_dir)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == f"dlt-plot: error: {run_dir / METRICS}: no logged steps (yet)"
    assert len(err) == 1 + bool(content)  # the skipped line's warning, then the error


def test_plot_into_an_existing_file_is_a_one_line_error(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / METRICS).write_text(GOOD)
    (tmp_path / "plots").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        plot_main([str(run_dir), f"out={tmp_path / 'plots'}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"dlt-plot: error: out={tmp_path / 'plots'}: is a file, expected a folder\n"
    )


def test_plot_rejects_a_folder_that_is_not_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        plot_main([str(tmp_path)])
    assert "no such file" in capsys.readouterr().err
