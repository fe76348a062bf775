"""`dlt-status` reads damaged JSONL files and runs that have not logged a step yet."""

from __future__ import annotations

import json

from jobs import status
from trainer.run_dir import CONFIG, JOBS, METRICS

START = {"event": "start", "world_size": 1, "step": 0, "slurm_job_id": "7", "restart_count": 0}


def test_status_skips_a_malformed_jobs_line_with_a_warning(tmp_path, capsys):
    (tmp_path / CONFIG).write_text("{}\n")
    (tmp_path / METRICS).write_text('{"step": 5, "loss": 2.5}\n{"step": 6, "lo')  # torn
    lines = [json.dumps(START), "not json", json.dumps({"event": "end", "outcome": "stopped"})]
    (tmp_path / JOBS).write_text("\n".join(lines) + "\n")
    status.main([str(tmp_path)])
    out, err = capsys.readouterr()
    assert "state:           stopped" in out and "last step:       5 (loss 2.5000)" in out
    assert "SLURM jobs:      7" in out
    assert err.splitlines() == [
        f"dlt-status: warning: {tmp_path / METRICS}:2: not JSON (a torn or edited line), skipped",
        f"dlt-status: warning: {tmp_path / JOBS}:2: not JSON (a torn or edited line), skipped",
    ]


def test_status_before_the_first_logged_step(tmp_path, capsys):
    (tmp_path / JOBS).write_text(json.dumps(START) + "\n")
    status.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "last step:       none logged yet\n" in out
    assert "state:           running (or killed)" in out and "None" not in out
    status.main([str(tmp_path), "--json"])
    assert json.loads(capsys.readouterr().out)["last_step"] is None


def test_last_step_reads_through_torn_lines(tmp_path):
    assert status.last_step(tmp_path) == 0
    (tmp_path / METRICS).write_text('{"step": 3, "loss": 1.0}\n{"step": "x"}\n{"step": 4, "lo')
    assert status.last_step(tmp_path) == 3
