"""Cluster profiles, dry runs and quoting (no SLURM needed), and `dlt-status`."""

from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import status
from jobs.cli import compose_config, to_schema
from jobs.prep import chunk_range
from jobs.profile import ClusterProfile, check_profile
from jobs.submit import BODY_MARKER, submitit_parameters, train_script
from trainer.config import ConfigError

HOSTILE = "x'\"$(touch {canary})`touch {canary}`;touch {canary}"


def profile(**values) -> ClusterProfile:
    """The profile of cluster/slurm.yaml (the YAML holds the values) with `values` changed."""
    slurm = to_schema(ClusterProfile, compose_config("train", ["cluster=slurm"]).cluster)
    return dataclasses.replace(slurm, **values)


def dlt(command: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"jobs.{command}", *args], capture_output=True, text=True, cwd=cwd
    )


def test_dry_run_prints_the_filled_sbatch_script(tmp_path):
    out = dlt(
        "train",
        ["cluster=dlt_local", "cluster.launcher=sbatch", "dry_run=true", "cluster.nodes=3",
         "cluster.gpus_per_node=4", "cluster.sbatch_extra=[--exclusive]", "parallel=ddp", "data=dummy"],
        tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    script = out.stdout
    for line in [
        "#SBATCH --nodes=3",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --partition=normal",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --signal=USR1@30",
        "#SBATCH --requeue",
        "#SBATCH --exclusive",
        "export DLT_PROCS_PER_NODE=4",
        "set -- parallel=ddp data=dummy",  # the overrides, passed on to the job
    ]:
        assert line in script.splitlines(), line
    assert BODY_MARKER in script and "-m jobs.node" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert not list(tmp_path.glob("logs/*.sbatch"))  # nothing written, nothing submitted


def test_dry_run_of_the_submitit_route_prints_its_parameters(tmp_path):
    out = dlt(
        "train",
        ["cluster=dlt_local", "dry_run=true", "cluster.qos=high", "parallel=ddp", "data=dummy"],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "slurm_partition: normal" in out.stdout
    assert "slurm_qos: high" in out.stdout
    assert "nodes: 2" in out.stdout and "tasks_per_node: 1" in out.stdout
    params = submitit_parameters(
        profile(name="x", sbatch_extra=["--constraint=a100", "--exclusive"])
    )
    extra = params["slurm_additional_parameters"]
    assert extra == {"requeue": True, "constraint": "a100", "exclusive": True}
    assert "slurm_python:" in out.stdout


def test_hostile_profile_and_override_values_stay_data(tmp_path):
    """Quotes, $(), backticks and ; in values reach the job literally; nothing runs."""
    canary = tmp_path / "pwned"
    hostile = HOSTILE.format(canary=canary)
    evil = profile(
        name="evil", job_name=hostile, partition=hostile, log_dir=str(tmp_path / hostile),
        python=hostile, setup=[], sbatch_extra=[f"--comment={hostile}"],
    )  # fmt: skip
    check_profile(evil)
    script = train_script(evil, [f"run.name={hostile}", "model=tiny"])
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    # Run the script's shell part up to the body: the settings and arguments it gives the job.
    head = script.split(BODY_MARKER)[0]
    probe = head + 'printf "%s\\n" "$@"; printf "%s\\n" "$DLT_PYTHON" "$DLT_LOG_DIR"\n'
    out = subprocess.run(["bash"], input=probe, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"run.name={hostile}",
        "model=tiny",
        hostile,
        str(tmp_path / hostile),
    ]
    assert not canary.exists()
    # #SBATCH lines: sbatch splits them like a shell (without running anything), so every
    # value is shell-quoted to stay one value; bash reads the line back as exactly that.
    sbatch_lines = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    job_name = next(line for line in sbatch_lines if line.startswith("#SBATCH --job-name="))
    words = shlex.split(job_name.removeprefix("#SBATCH "))
    assert words == [f"--job-name={hostile}"]
    comment = next(line for line in sbatch_lines if line.startswith("#SBATCH --comment="))
    assert shlex.split(comment.removeprefix("#SBATCH ")) == [f"--comment={hostile}"]


@pytest.mark.parametrize("key", ["partition", "job_name", "account", "log_dir"])
def test_a_value_with_a_newline_is_refused_naming_the_key(key):
    with pytest.raises(ConfigError, match=f"cluster.{key}=.*one line"):
        check_profile(profile(name="x", **{key: "gpu\nrm -rf ~"}))
    with pytest.raises(ConfigError, match="cluster.setup=.*one line"):
        check_profile(profile(name="x", setup=["module load x\rrm -rf ~"]))


def test_a_layout_that_does_not_fit_the_profile_is_refused_before_submitting(tmp_path):
    out = dlt("train", ["cluster=dlt_local", "parallel=tp", "parallel.tp=4"], tmp_path)
    assert out.returncode == 2
    assert "must equal the world size 2 (cluster.nodes=2 x 1 processes per node)" in out.stderr
    assert not (tmp_path / "logs").exists() or not list((tmp_path / "logs").iterdir())


def test_newline_override_on_the_command_line_is_a_one_line_error(tmp_path):
    out = dlt("train", ["cluster=dlt_local", "dry_run=true", "cluster.partition=a\nb"], tmp_path)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "cluster.partition" in out.stderr


@pytest.mark.parametrize(
    "change, message",
    [
        ({"launcher": "pbs"}, "cluster.launcher='pbs': expected one of submitit, sbatch"),
        ({"nodes": 0}, "cluster.nodes=0: must be >= 1"),
        ({"signal_lead_s": 3600}, "cluster.signal_lead_s=3600: must be shorter"),
        ({"sbatch_extra": ["exclusive"]}, "expected an option like --key=value"),
    ],
)
def test_profile_errors(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        check_profile(profile(name="x", **change))


def test_prep_dry_run_chains_plan_array_and_finalize(tmp_path):
    out = dlt("prep", ["cluster=dlt_local", "dry_run=true", "cluster.array_tasks=6"], tmp_path)
    assert out.returncode == 0, out.stderr
    scripts = out.stdout.split("# ===== ")[1:]
    assert [s.split()[0] for s in scripts] == ["plan", "chunks", "finalize"]
    assert "set -- phase=plan" in scripts[0]
    assert "#SBATCH --array=0-5" in scripts[1] and "set -- phase=chunks" in scripts[1]
    assert "#SBATCH --kill-on-invalid-dep=yes" in scripts[2]
    for script in scripts:
        body = script.split("\n", 1)[1]
        assert subprocess.run(["bash", "-n"], input=body, text=True).returncode == 0


@pytest.mark.parametrize("n", [1, 5, 9, 64])
@pytest.mark.parametrize("parts", [1, 4, 7])
def test_array_task_shares_cover_every_chunk_once(n, parts):
    shares = [chunk_range(f"{i}/{parts}", n) for i in range(parts)]
    assert sorted(c for share in shares for c in share) == list(range(n))
    assert chunk_range("2:4", n) == list(range(2, min(4, n)))
    with pytest.raises(ConfigError, match="chunks='7/4'"):
        chunk_range("7/4", n)


def test_status_of_a_run(tiny, tmp_path, capsys):
    from jobs.train import main as train_main

    cfg = tiny("st")
    overrides = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
                 "data=dummy", "train.max_steps=4", "train.micro_batch_size=2",
                 "checkpoint.interval=2", "eval.interval=0", "log.progress=false",
                 "log.interval=1", f"run.dir={cfg['run']['dir']}", "device=cpu"]  # fmt: skip
    train_main(overrides)
    capsys.readouterr()
    status.main([cfg["run"]["dir"], "--json"])
    state = json.loads(capsys.readouterr().out)
    assert state["state"] == "finished"
    assert state["last_step"] == 4 and state["checkpoint_step"] == 4
    assert state["starts"] == 1 and state["restarts"] == 0 and state["slurm_job_ids"] == []
    train_main([*overrides, "train.max_steps=6"])  # continue the run: a second start
    status.main([cfg["run"]["dir"]])
    text = capsys.readouterr().out
    assert "state:           finished" in text
    assert "starts:          2 (1 restarts)" in text and "last step:       6" in text


def test_status_of_something_else_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        status.main([str(tmp_path)])
    assert err.value.code == 2
    assert "not a run directory" in capsys.readouterr().err
