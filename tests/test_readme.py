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
def test_readme_demo_command_prepares_trains_and_generates(tmp_path):
    """Run the README's demo (minus the install, which CI has done) with fewer steps."""
    steps = readme_command("demo-command").split(" && ")
    assert steps[0].startswith("pip install torch==2.13.0")
    commands = [shlex.split(s) for s in steps if s.startswith("dlt-")]
    assert [c[0] for c in commands] == ["dlt-prep", "dlt-train", "dlt-generate"]
    prep, train, generate = commands
    modules = {"dlt-prep": "jobs.prep", "dlt-train": "jobs.train", "dlt-generate": "jobs.generate"}

    def run(args: list[str], *extra: str) -> subprocess.CompletedProcess:
        # The same command as `python -m` (the same entry point), in an empty folder.
        command = [sys.executable, "-m", modules[args[0]], *args[1:], *extra]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return done

    run(prep)
    assert (tmp_path / "data" / "sample" / "manifest.json").is_file()
    trained = run(train, "train.max_steps=60", "train.warmup_steps=5", "log.interval=5")
    lines = [line for line in trained.stdout.splitlines() if "| loss " in line]
    losses = [float(re.search(r"\| loss ([\d.]+)", line).group(1)) for line in lines]
    assert len(losses) >= 10 and losses[-1] < losses[0] - 1.0  # visibly learning
    generated = run(generate).stdout
    assert generated.startswith("Once upon a time,")
    words = re.findall(r"[A-Za-z]+", generated[len("Once upon a time,") :])
    assert len(words) >= 10  # a trained BPE decodes to words, not byte noise
