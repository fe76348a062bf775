"""The README's commands are the ones that work: the demo runs, CI runs the test command."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_command(marker: str) -> str:
    """The command in the ```bash block right after `<!-- marker -->` in README.md."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```bash\n(.*?)\n```", text, re.S)
    assert match, f"README.md has no ```bash block after <!-- {marker} -->"
    return match.group(1).strip()


def test_ci_runs_exactly_the_readme_test_command():
    command = readme_command("test-command")
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines


@pytest.mark.slow
def test_readme_demo_command_trains_and_generates(tmp_path):
    """Run the README's demo (minus the install, which CI has done) with fewer steps."""
    steps = readme_command("demo-command").split(" && ")
    assert steps[0].startswith("pip install torch==2.13.0")
    train, generate = (shlex.split(s) for s in steps if s.startswith(("dlt-train", "dlt-gen")))
    run_dir = tmp_path / "demo"

    def fix(args: list[str]) -> list[str]:
        # Same command, but the run goes under tmp_path; as `python -m` (same entry point).
        module = {"dlt-train": "jobs.train", "dlt-generate": "jobs.generate"}[args[0]]
        rest = [a.replace("runs/demo", str(run_dir)) for a in args[1:]]
        return [sys.executable, "-m", module, *rest]

    trained = subprocess.run(
        [*fix(train), "train.max_steps=80", "train.warmup_steps=5", "log.interval=5"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert trained.returncode == 0, trained.stderr
    lines = [line for line in trained.stdout.splitlines() if "| loss " in line]
    losses = [float(re.search(r"\| loss ([\d.]+)", line).group(1)) for line in lines]
    assert len(losses) >= 3 and losses[-1] < losses[0] - 1.0  # visibly learning
    generated = subprocess.run(fix(generate), capture_output=True, text=True, timeout=300)
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.startswith("Once upon a time,")
    assert len(generated.stdout) > len("Once upon a time,") + 10
