"""The README's commands are the ones that work: the demo runs, CI runs the test command; the
README and docs/*.md render as written (every code block closed, nothing stray inside one)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE_LINE = re.compile(r"^\s*(```|~~~)")
SHELL = {"bash", "sh", "shell", "console"}


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


def fence_problems(text: str, name: str = "doc.md") -> list[str]:
    """`name:line: what` for each code block that is not closed, holds a fence line (a fence
    that was meant to close it), or, in a shell block, holds Markdown prose (a `code span`
    outside a comment)."""
    lines = text.splitlines()
    problems = []
    for block in MarkdownIt("commonmark").parse(text):
        if block.type != "fence":
            continue
        start, end = block.map
        closing = lines[end - 1].strip() if end - 1 > start else ""
        if not (closing.startswith(block.markup) and not closing.strip(block.markup[0])):
            problems.append(f"{name}:{start + 1}: code block never closed")
        for number, line in enumerate(block.content.splitlines(), start=start + 2):
            if FENCE_LINE.match(line):
                problems.append(f"{name}:{number}: a fence line inside a code block")
            elif block.info.strip() in SHELL and "`" in line.split("#", 1)[0]:
                problems.append(f"{name}:{number}: Markdown prose inside a shell block")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_code_blocks_are_closed_and_hold_no_stray_fence_or_prose(doc):
    assert fence_problems(doc.read_text(), doc.name) == []


@pytest.mark.parametrize(
    "text, problem",
    [
        ("```bash\ndlt-bench\n``` `trainer` is a library.\n```\n", "doc.md:3: a fence line"),
        ("```bash\ndlt-bench\n", "doc.md:1: code block never closed"),
        ("```bash\ndlt-bench\nThe `trainer` library.\n```\n", "doc.md:3: Markdown prose"),
    ],
)
def test_fence_check_finds_each_kind_of_break(text, problem):
    assert any(p.startswith(problem) for p in fence_problems(text)), fence_problems(text)


TRAINING = re.compile(r"(^|&& )(dlt-train|torchrun .*-m jobs\.train|python -m jobs\.train)\b")


def shell_commands(text: str) -> list[str]:
    """The commands of the shell blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in MarkdownIt("commonmark").parse(text):
        if block.type == "fence" and block.info.strip() in SHELL:
            for line in block.content.replace("\\\n", " ").splitlines():
                commands.append(" ".join(line.split(" #", 1)[0].split()))
    return commands


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_training_command_names_its_run_dir(doc):
    """Without its own run.dir a command resumes the run of another one (runs/<model>)."""
    missing = [
        c
        for c in shell_commands(doc.read_text())
        if TRAINING.search(c) and "run.dir=" not in c and "dry_run=true" not in c
    ]
    assert missing == []
