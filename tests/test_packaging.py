"""A plain install works: `pip install .` (not editable, no extras) into a fresh virtual
environment without system site packages, then the README's demo (prep, train, generate) with
the installed console scripts, run outside the repository.

This is what catches package data left out of the wheel (the sample corpus, the Hydra configs,
the sbatch scripts) and third-party imports missing from `dependencies` (an editable
`.[dev]` install, as CI and the other tests use, hides both).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "data_prep", "jobs", "cluster_configs", "benchmarks", "sbatch")
PROMPT = "Once upon a time,"


def demo_steps() -> list[str]:
    """The README's demo command, split at `&&`."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- demo-command -->\s*```bash\n(.*?)\n```", text, re.S)
    assert match, "README.md has no ```bash block after <!-- demo-command -->"
    return [step.strip() for step in match.group(1).split("&&")]


def tracked_files() -> list[str]:
    """The repository's tracked files that exist in the working tree (no untracked junk)."""
    done = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"not a git checkout, cannot list the tracked files: {done.stderr.strip()}")
    return [name for name in done.stdout.split("\0") if name and (ROOT / name).is_file()]


def clean_env(venv: Path) -> dict[str, str]:
    """The environment for the venv's commands: nothing from outside it is importable."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE", "VIRTUAL_ENV"}
    }
    env.update(
        VIRTUAL_ENV=str(venv),
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        PYTHONNOUSERSITE="1",  # no ~/.local site packages either
        PIP_NO_CACHE_DIR="1",  # cache nothing outside this test's tmp dirs
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="offline",
    )
    return env


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> str:
    """Run `command` and return its stdout; on failure, fail with the command and the end of
    its stdout and stderr."""
    shown = shlex.join(command)
    try:
        done = subprocess.run(
            command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        out, err = (
            (x.decode(errors="replace") if isinstance(x, bytes) else x or "")
            for x in (e.stdout, e.stderr)
        )
        pytest.fail(
            f"timed out after {timeout} s: {shown} (in {cwd})\n--- stdout (end) ---\n"
            f"{out[-4000:]}\n--- stderr (end) ---\n{err[-6000:]}"
        )
    if done.returncode != 0:
        pytest.fail(
            f"exit status {done.returncode}: {shown} (in {cwd})\n--- stdout (end) ---\n"
            f"{done.stdout[-4000:]}\n--- stderr (end) ---\n{done.stderr[-6000:]}"
        )
    return done.stdout


@pytest.mark.slow
def test_plain_install_runs_the_readme_demo(tmp_path_factory):
    base = tmp_path_factory.mktemp("packaging")
    src, venv, work = base / "src", base / "venv", base / "work"
    files = tracked_files()
    for name in files:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    work.mkdir()

    # A fresh venv that sees no system site packages (the default), so a missing dependency
    # really is missing.
    run([sys.executable, "-m", "venv", str(venv)], base, dict(os.environ), timeout=300)
    env = clean_env(venv)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q"]

    steps = demo_steps()
    torch_step = shlex.split(steps[0])
    assert torch_step[:2] == ["pip", "install"] and torch_step[2].startswith("torch=="), steps[0]
    run([*pip, *torch_step[2:]], base, env)  # the README's torch first: the CPU build
    version = "import importlib.metadata as m; print(m.version('torch'))"
    torch_version = run([python, "-c", version], base, env).strip()
    # Keep exactly that torch while the project's dependencies resolve (no CUDA build pulled).
    (base / "constraints.txt").write_text(f"torch=={torch_version}\n")
    run([*pip, "-c", str(base / "constraints.txt"), str(src)], base, env)  # not editable
    run([python, "-m", "pip", "check"], base, env)

    # The installed packages are the ones imported, from site-packages, with every tracked
    # data file they hold (the README/markdown notes excepted); the dev extras are absent.
    probe = (
        "import importlib, importlib.util, json, sysconfig; "
        f"mods = {list(PACKAGES)!r}; "
        "print(json.dumps({'site': sysconfig.get_paths()['purelib'], "
        "'files': {m: importlib.import_module(m).__file__ for m in mods}, "
        "'extras': [m for m in ('transformers', 'wandb', 'pytest') "
        "if importlib.util.find_spec(m)]}))"
    )
    found = json.loads(run([python, "-c", probe], work, env))
    site = Path(found["site"]).resolve()
    for module, file in found["files"].items():
        assert Path(file).resolve().is_relative_to(site), f"{module} imported from {file}"
    assert found["extras"] == [], f"a plain install has dev extras: {found['extras']}"
    missing = [
        name
        for name in files
        if name.split("/", 1)[0] in PACKAGES
        and not name.endswith(".md")
        and not (site / name).is_file()
    ]
    assert missing == [], f"tracked package files not installed: {missing}"

    # The README demo with the installed console scripts, in a folder outside the repository:
    # the real default dlt-prep (KJV corpus, BPE training), a 4-step training, generation.
    commands = [shlex.split(step) for step in steps if step.startswith("dlt-")]
    assert [c[0] for c in commands] == ["dlt-prep", "dlt-train", "dlt-generate"], steps
    prep, train, generate = ([str(venv / "bin" / c[0]), *c[1:]] for c in commands)
    prepared = run(prep, work, env)
    manifest = json.loads((work / "data" / "sample" / "manifest.json").read_text())
    assert manifest["tokenizer"]["name"] == "bpe", prepared
    assert (work / "data" / "sample" / manifest["tokenizer"]["file"]).is_file(), prepared
    short = ["train.max_steps=4", "eval.interval=0", "checkpoint.interval=0", "log.interval=1"]
    trained = run([*train, *short], work, env)
    assert "step 4/4" in trained, trained
    run_dir = next(a.split("=", 1)[1] for a in commands[1] if a.startswith("run.dir="))
    assert (work / run_dir / "checkpoints" / "step_4" / "complete.json").is_file(), trained
    generated = run(generate, work, env)
    assert generated.startswith(PROMPT) and len(generated) > len(PROMPT), generated
