"""`dlt-status RUN_DIR...`: where a run stands — last step, last checkpoint, restarts, jobs.

Reads only the run directory (shared disk), so it works from a login node while the run is
queued, running, preempted or finished: `metrics.jsonl` (last logged step and loss),
`checkpoints/` (the newest one whose files all match their checksums: what `resume=auto` would
take, with any newer damaged one named), `jobs.jsonl` (one start/end event per attempt, with
the SLURM job id and restart count, written by `dlt-train`). `--no-verify` skips reading the
checkpoint files (sizes only).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from jobs.cli import errors_as_one_line
from trainer import checkpoint, resume
from trainer.run_dir import CONFIG, JOBS, METRICS, read_jsonl


def last_step(run_dir: Path) -> int:
    """The last step logged to `<run_dir>/metrics.jsonl` (0 before the first)."""
    steps = [r["step"] for r in read_jsonl(Path(run_dir) / METRICS) if is_step(r)]
    return steps[-1] if steps else 0


def is_step(record: dict[str, Any]) -> bool:
    step = record.get("step")
    return isinstance(step, int) and not isinstance(step, bool)


def warn(message: str) -> None:
    print(f"dlt-status: warning: {message}", file=sys.stderr)


def usable_checkpoint(run_dir: Path, verify: bool) -> tuple[Path | None, list[str]]:
    """The checkpoint `resume=auto` would take, and why each newer one would be skipped."""
    if not verify:
        return checkpoint.latest(run_dir), []
    path, damaged = resume.scan(run_dir)
    return path, [f"{p.name}: {why}" for p, why in damaged]


def run_state(run_dir: Path, verify: bool = True) -> dict[str, Any]:
    """A summary of the run in `run_dir` (raises FileNotFoundError when it is no run).

    Unreadable lines of its JSONL files are skipped, each with a warning on stderr. With
    `verify`, checkpoint files are checked against their checksums."""
    if not (run_dir / CONFIG).exists() and not (run_dir / JOBS).exists():
        raise FileNotFoundError(f"{run_dir}: no {CONFIG} or {JOBS}: not a run directory")
    metrics = [m for m in read_jsonl(run_dir / METRICS, warn) if "loss" in m and is_step(m)]
    events = read_jsonl(run_dir / JOBS, warn)
    starts = [e for e in events if e.get("event") == "start"]
    latest, damaged = usable_checkpoint(run_dir, verify)
    last = events[-1] if events else {}
    if last.get("event") == "end":
        state = last.get("outcome", "unknown")  # finished | stopped | failed
    else:
        state = "running (or killed)" if starts else "unknown"
    job_ids = list(dict.fromkeys(str(e["slurm_job_id"]) for e in events if e.get("slurm_job_id")))
    return {
        "run_dir": str(run_dir),
        "state": state,
        "last_step": metrics[-1]["step"] if metrics else None,
        "last_loss": metrics[-1]["loss"] if metrics else None,
        "last_checkpoint": str(latest) if latest else None,
        "checkpoint_step": checkpoint.step_of(latest) if latest else None,
        "checkpoint_verified": verify and latest is not None,
        "damaged_checkpoints": damaged,
        "starts": len(starts),
        "restarts": max(len(starts) - 1, 0),
        "slurm_job_ids": job_ids,
        "slurm_restart_count": starts[-1].get("restart_count") if starts else None,
    }


def format_state(s: dict[str, Any]) -> str:
    loss = f" (loss {s['last_loss']:.4f})" if isinstance(s["last_loss"], (int, float)) else ""
    step = "none logged yet" if s["last_step"] is None else f"{s['last_step']}{loss}"
    verified = " (checksums match)" if s.get("checkpoint_verified") else ""
    ckpt = (
        f"step {s['checkpoint_step']}: {s['last_checkpoint']}{verified}"
        if s["last_checkpoint"]
        else "none"
    )
    ckpt += "".join(f"\n  damaged:         {d}" for d in s.get("damaged_checkpoints", []))
    jobs = ", ".join(s["slurm_job_ids"]) or "none (not run under SLURM)"
    return (
        f"{s['run_dir']}\n"
        f"  state:           {s['state']}\n"
        f"  last step:       {step}\n"
        f"  last checkpoint: {ckpt}\n"
        f"  starts:          {s['starts']} ({s['restarts']} restarts)\n"
        f"  SLURM jobs:      {jobs}"
        + (
            f" (SLURM_RESTART_COUNT {s['slurm_restart_count']})"
            if s["slurm_job_ids"] and s["slurm_restart_count"] is not None
            else ""
        )
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or any(a in ("-h", "--help") for a in argv):
        print("usage: dlt-status RUN_DIR... [--json] [--no-verify]")
        return
    as_json, verify = "--json" in argv, "--no-verify" not in argv
    for arg in (a for a in argv if a not in ("--json", "--no-verify")):
        with errors_as_one_line("dlt-status"):
            state = run_state(Path(arg), verify)
        print(json.dumps(state) if as_json else format_state(state))


if __name__ == "__main__":
    main()
