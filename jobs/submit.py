"""Submitting to SLURM from a login node: a cluster profile -> sbatch script or submitit job.

A cluster profile (`jobs/profile.py`; `cluster_configs/cluster/<name>.yaml`, chosen with
`cluster=<name>`) says where and how a job runs: partition, account, nodes, GPUs, time limit,
signal lead time, setup lines. Two routes read it:

- `cluster.launcher=sbatch`: the profile's `#SBATCH` lines + settings are put in front of the
  body of `sbatch/train.sbatch` (the same script users submit by hand); the filled script is
  written to `<log_dir>/` and submitted with `sbatch`.
- `cluster.launcher=submitit` (default): submitit writes and submits the job; each node runs
  `jobs.node.TrainTask` (torchrun) and submitit's checkpoint/requeue protocol handles
  preemption.

Safety: configuration values are data, never shell. Every value that reaches the shell part of
a script is quoted with `shlex.quote`; `#SBATCH` lines are read by sbatch, not by the shell,
and a value that could break out of its line (a newline or other control character) is
refused (`jobs.profile.check_profile`). Only `setup` lines are shell, by design
(`module load ...`, `conda activate ...`).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from data_prep.files import write_text_atomic
from jobs.cli import LAUNCH_KEYS
from jobs.node import TrainTask
from jobs.profile import ClusterProfile
from trainer.config import ConfigError

BODY_MARKER = "# ---- body:"


def sbatch_line(option: str, value: Any = None) -> str:
    """`--option=value` as sbatch reads it on an `#SBATCH` line: sbatch splits such a line like
    a shell does (but runs nothing), so the value is shell-quoted to stay one value."""
    return f"--{option}" if value is None else f"--{option}={shlex.quote(str(value))}"


def common_options(p: ClusterProfile, job_name: str, output: str) -> list[str]:
    """The `#SBATCH` options every job of a profile has (where, how long, which log)."""
    opts = [sbatch_line("job-name", job_name)]
    opts += [sbatch_line(k, v) for k in ("partition", "account", "qos") if (v := getattr(p, k))]
    if p.cpus_per_task:
        opts.append(sbatch_line("cpus-per-task", p.cpus_per_task))
    if p.mem:
        opts.append(sbatch_line("mem", p.mem))
    opts += [
        sbatch_line("time", p.time_min),
        sbatch_line("open-mode", "append"),  # a requeued job appends to its log
        sbatch_line("output", output),
    ]
    return opts


def extra_pairs(p: ClusterProfile) -> list[tuple[str, str | None]]:
    """`cluster.sbatch_extra` as (option, value or None for a flag)."""
    pairs = []
    for opt in p.sbatch_extra:
        key, sep, value = opt[2:].partition("=")
        pairs.append((key, value if sep else None))
    return pairs


def extra_options(p: ClusterProfile) -> list[str]:
    return [sbatch_line(key, value) for key, value in extra_pairs(p)]


def train_options(p: ClusterProfile, output: str) -> list[str]:
    """The `#SBATCH` options of a training job: N nodes, one task each, warning signal."""
    opts = common_options(p, p.job_name, output)
    opts += [sbatch_line("nodes", p.nodes), sbatch_line("ntasks-per-node", 1)]
    if p.gpus_per_node:
        opts.append(sbatch_line("gpus-per-node", p.gpus_per_node))
    opts += [sbatch_line("signal", f"USR1@{p.signal_lead_s}"), sbatch_line("requeue")]
    return opts + extra_options(p)


def script_body(name: str) -> str:
    """Everything after the body marker of `sbatch/<name>`."""
    text = resources.files("sbatch").joinpath(name).read_text()
    head, marker, rest = text.partition(BODY_MARKER)
    if not marker:
        raise RuntimeError(f"sbatch/{name} has no '{BODY_MARKER}' line")
    return marker + rest


def render_script(
    name: str,
    options: list[str],
    settings: dict[str, Any],
    arguments: list[str],
    setup: list[str],
    origin: str,
) -> str:
    """`sbatch/<name>` with these #SBATCH options, exported settings, setup lines and
    arguments (quoted) in front of its body."""
    lines = ["#!/bin/bash", f"# {origin}"]
    lines += [f"#SBATCH {opt}" for opt in options]
    lines += [f"export {k}={shlex.quote(str(v))}" for k, v in settings.items()]
    if setup:
        lines += ["# setup lines of the cluster profile", *setup]
    lines.append("set -- " + " ".join(shlex.quote(a) for a in arguments))
    return "\n".join(lines) + "\n" + script_body(name)


def python_of(p: ClusterProfile) -> str:
    return p.python or sys.executable


def log_dir(p: ClusterProfile) -> Path:
    """Where the jobs' logs and scripts go (created only when something is submitted)."""
    return Path(p.log_dir).absolute()


def train_script(p: ClusterProfile, overrides: list[str]) -> str:
    logs = log_dir(p)
    settings = {
        "DLT_PYTHON": python_of(p),
        "DLT_PROCS_PER_NODE": p.processes_per_node,
        "DLT_MAX_RESTARTS": p.max_restarts,
        "DLT_MAX_REQUEUES": p.max_requeues,
        "DLT_LOG_DIR": logs,
    }
    return render_script(
        "train.sbatch",
        train_options(p, f"{logs}/%x-%j.out"),
        settings,
        overrides,
        p.setup,
        f"sbatch/train.sbatch filled from cluster profile {p.name!r} by dlt-train",
    )


def sbatch_submit(script: str, path: Path, extra: list[str] = ()) -> str:
    """Write `script` to `path` and submit it; the job id."""
    path.parent.mkdir(parents=True, exist_ok=True)  # sbatch needs the log folder to exist
    write_text_atomic(path, script)
    proc = subprocess.run(
        ["sbatch", "--parsable", *extra, str(path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise ConfigError(f"sbatch {path} failed: {' '.join(proc.stderr.split())}")
    return proc.stdout.strip().split(";")[0]


def strip_cluster_overrides(overrides: list[str]) -> list[str]:
    """The command-line overrides minus those that choose where to run (the job runs them)."""

    def is_launch_key(override: str) -> bool:
        key = override.split("=", 1)[0].lstrip("+~")
        return any(key == k or key.startswith(k + ".") for k in LAUNCH_KEYS)

    return [o for o in overrides if not is_launch_key(o)]


# ---------------------------------------------------------------------------------- training


def submit_training(p: ClusterProfile, overrides: list[str], dry_run: bool) -> str | None:
    """Submit the training job for `overrides`; returns the job id (None on a dry run)."""
    overrides = strip_cluster_overrides(overrides)
    if p.launcher == "sbatch":
        script = train_script(p, overrides)
        if dry_run:
            print(script, end="")
            return None
        logs = log_dir(p)
        job_id = sbatch_submit(script, logs / f"{p.job_name}.sbatch")
        print(f"dlt-train: submitted job {job_id} (sbatch); log {logs}/{p.job_name}-{job_id}.out")
        return job_id
    executor_args = {
        "folder": str(log_dir(p) / "submitit" / "%j"),
        "slurm_max_num_timeout": p.max_requeues,
        "slurm_python": python_of(p),
    }
    params = submitit_parameters(p)
    if dry_run:
        import yaml

        print("# submitit AutoExecutor parameters")
        print(yaml.safe_dump({**executor_args, **params}, sort_keys=False), end="")
        print(
            "# each task (one per node) runs torchrun as jobs.node does: "
            + shlex.join(["torchrun", "...", "-m", "jobs.train", *overrides])
        )
        return None
    import submitit

    executor = submitit.AutoExecutor(cluster="slurm", **executor_args)
    executor.update_parameters(**params)
    task = TrainTask(overrides, p.processes_per_node, p.max_restarts, p.signal_lead_s)
    job = executor.submit(task)
    print(
        f"dlt-train: submitted job {job.job_id} (submitit); logs {job.paths.stdout} "
        f"and {job.paths.stderr}"
    )
    return job.job_id


def submitit_parameters(p: ClusterProfile) -> dict[str, Any]:
    """What `AutoExecutor.update_parameters` gets for a profile."""
    extra: dict[str, Any] = {"requeue": True}  # allowed to requeue where JobRequeue=0
    for key, value in extra_pairs(p):
        extra[key.replace("-", "_")] = True if value is None else value
    params: dict[str, Any] = {
        "name": p.job_name,
        "nodes": p.nodes,
        "tasks_per_node": 1,
        "timeout_min": p.time_min,
        "slurm_signal_delay_s": p.signal_lead_s,
        "slurm_setup": list(p.setup),
        "slurm_additional_parameters": extra,
    }
    optional = {
        "slurm_partition": p.partition,
        "slurm_account": p.account,
        "slurm_qos": p.qos,
        "gpus_per_node": p.gpus_per_node or None,
        "cpus_per_task": p.cpus_per_task,
        "slurm_mem": p.mem,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    if p.cpus_per_task:  # srun does not inherit --cpus-per-task from sbatch (SLURM >= 22.05)
        params["slurm_srun_args"] = [f"--cpus-per-task={p.cpus_per_task}"]
    return params


# -------------------------------------------------------------------------------------- prep


def submit_prep(p: ClusterProfile, overrides: list[str], dry_run: bool) -> list[str]:
    """Plan -> array of `cluster.array_tasks` chunk tasks -> finalize, chained by afterok."""
    overrides = strip_cluster_overrides(overrides)
    logs = log_dir(p)
    settings = {"DLT_PYTHON": python_of(p)}
    name = p.prep_job_name

    def options(extra: list[str], output: str = f"{logs}/%x-%j.out") -> list[str]:
        """One task on one node (tokenizing needs CPUs, not the training's GPU nodes)."""
        one_task = [sbatch_line("nodes", 1), sbatch_line("ntasks", 1)]
        return common_options(p, name, output) + one_task + extra_options(p) + extra

    scripts = {
        "plan": render_script(
            "prep.sbatch", options([]), settings, ["phase=plan", *overrides], p.setup,
            f"sbatch/prep.sbatch filled from cluster profile {p.name!r} by dlt-prep (plan)",
        ),
        "chunks": render_script(
            "prep.sbatch",
            options(
                [sbatch_line("array", f"0-{p.array_tasks - 1}"), "--kill-on-invalid-dep=yes"],
                f"{logs}/%x-%A_%a.out",
            ),
            settings,
            ["phase=chunks", *overrides], p.setup,
            f"sbatch/prep.sbatch filled from cluster profile {p.name!r} by dlt-prep (chunks)",
        ),
        "finalize": render_script(
            "prep.sbatch", options(["--kill-on-invalid-dep=yes"]), settings,
            ["phase=finalize", *overrides], p.setup,
            f"sbatch/prep.sbatch filled from cluster profile {p.name!r} by dlt-prep (finalize)",
        ),
    }  # fmt: skip
    if dry_run:
        for phase, script in scripts.items():
            print(f"# ===== {phase} =====\n{script}", end="")
        return []
    plan = sbatch_submit(scripts["plan"], logs / f"{name}-plan.sbatch")
    chunks = sbatch_submit(
        scripts["chunks"], logs / f"{name}-chunks.sbatch", [f"--dependency=afterok:{plan}"]
    )
    final = sbatch_submit(
        scripts["finalize"], logs / f"{name}-finalize.sbatch", [f"--dependency=afterok:{chunks}"]
    )
    print(
        f"dlt-prep: submitted plan {plan} -> array {chunks} ({p.array_tasks} tasks) -> "
        f"finalize {final}; logs in {logs}"
    )
    return [plan, chunks, final]
