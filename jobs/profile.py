"""A cluster profile: the `cluster.*` keys (`cluster_configs/cluster/<name>.yaml`, chosen with
`cluster=<name>`) and their checks.

A profile says where and how a job runs: partition, account, nodes, GPUs, time limit, signal
lead time, setup lines. `jobs/submit.py` turns one into an sbatch script or a submitit job;
`name: local` means no SLURM at all. The values, defaults included, are in the YAML files
only; `ClusterProfile` gives their types.

Values are data, never shell: a value that could break out of its `#SBATCH` line (a newline
or another control character) is refused here, before anything is written or submitted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

from trainer.config import ConfigError

LAUNCHERS = ("submitit", "sbatch")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_OPTION = re.compile(r"--[A-Za-z][A-Za-z0-9-]*(=|$)")


@dataclass
class ClusterProfile:
    """`cluster.*` keys, types only: the values are those of the chosen profile,
    `cluster_configs/cluster/<name>.yaml` (`slurm.yaml` has every key; `local.yaml` and
    `dlt_local.yaml` start from it). `name=local` means: no SLURM, run on this machine."""

    name: str
    launcher: str  # submitit | sbatch
    partition: str | None
    account: str | None
    qos: str | None
    nodes: int
    gpus_per_node: int  # 0: CPU nodes
    procs_per_node: int | None  # training processes per node; null = GPUs (at least 1)
    cpus_per_task: int | None  # CPUs for a node's task (all of its processes)
    mem: str | None  # per node, e.g. 200G; null = the partition's default
    time_min: int  # time limit in minutes
    signal_lead_s: int  # warning signal this many seconds before the time limit
    max_restarts: int  # after a failure (an exception), torchrun restarts at most this often
    max_requeues: int  # preemptions / time limits survived (submitit's max_num_timeout)
    job_name: str
    prep_job_name: str
    log_dir: str
    python: str | None  # the Python with this project on the nodes; null = this one
    setup: list[str]  # shell lines run first on the first node
    sbatch_extra: list[str]  # more options: "--constraint=a100"
    array_tasks: int  # dlt-prep: tasks of the chunk array

    @property
    def is_local(self) -> bool:
        return self.name == "local"

    @property
    def processes_per_node(self) -> int:
        return self.procs_per_node or max(1, self.gpus_per_node)


def check_profile(p: ClusterProfile, dry_run: bool = False) -> None:
    """One-line errors for values that cannot work or could escape their line."""
    if dry_run and p.is_local:
        raise ConfigError("dry_run=true needs a SLURM profile (cluster=<profile>)")
    if p.launcher not in LAUNCHERS:
        raise ConfigError(
            f"cluster.launcher={p.launcher!r}: expected one of {', '.join(LAUNCHERS)}"
        )
    for f in fields(p):
        value = getattr(p, f.name)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and _CONTROL.search(item):
                raise ConfigError(
                    f"cluster.{f.name}={item!r}: must be one line without control characters"
                )
    for key in ("nodes", "time_min", "array_tasks"):
        if getattr(p, key) < 1:
            raise ConfigError(f"cluster.{key}={getattr(p, key)}: must be >= 1")
    for key in ("gpus_per_node", "signal_lead_s", "max_restarts", "max_requeues"):
        if getattr(p, key) < 0:
            raise ConfigError(f"cluster.{key}={getattr(p, key)}: must be >= 0")
    if p.signal_lead_s >= p.time_min * 60:
        raise ConfigError(
            f"cluster.signal_lead_s={p.signal_lead_s}: must be shorter than the time limit "
            f"(cluster.time_min={p.time_min})"
        )
    for line in p.sbatch_extra:
        if not _OPTION.match(line):
            raise ConfigError(
                f"cluster.sbatch_extra: {line!r}: expected an option like --key=value"
            )
    for key in ("procs_per_node", "cpus_per_task"):
        if getattr(p, key) is not None and getattr(p, key) < 1:
            raise ConfigError(f"cluster.{key}={getattr(p, key)}: must be >= 1 (or null)")
