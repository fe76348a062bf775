"""`dlt-train --multirun ...`: a Hydra sweep, one training per combination of values.

    dlt-train --multirun train.lr=3e-4,1e-3 'run.dir=runs/sweep/lr${train.lr}' \
        hydra/launcher=submitit_slurm hydra.launcher.partition=gpu hydra.launcher.nodes=1

Each job of the sweep trains one config. With Hydra's basic launcher the jobs run one after
the other in this process; with `hydra/launcher=submitit_slurm` each is a SLURM job (an array
job) whose every node runs `jobs.node` (torchrun), as `dlt-train cluster=<profile>` does.
Give each job its own `run.dir` (interpolating the swept values, or `${hydra:job.num}`).

Every job's config goes through the one validation (`trainer.config.resolve_config`, with the
world size it will have) before Hydra launches the first: a refused combination is reported
at once instead of failing in the queue after its siblings ran.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ValueType
from omegaconf import DictConfig, OmegaConf, open_dict

from jobs.cli import (
    CONFIG_MODULE,
    compose_config,
    errors_as_one_line,
    given_keys,
    to_schema,
    too_many_digits,
    training_dict,
)
from jobs.node import TrainTask
from jobs.profile import ClusterProfile
from jobs.submit import strip_cluster_overrides
from trainer.config import ConfigError, resolve_config


def sweep(argv: list[str]) -> None:
    limit = getattr(sys, "get_int_max_str_digits", lambda: 0)()
    with errors_as_one_line("dlt-train"):  # Hydra would parse it with a traceback
        if limit and any(len(run) > limit for arg in argv for run in re.findall(r"\d+", arg)):
            raise ConfigError(too_many_digits(argv))
        check_every_job(argv)
    sys.argv = ["dlt-train", *argv]
    train_one()


@hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name="train", version_base="1.3")
def train_one(composed: DictConfig) -> str:
    from jobs.train import train_here

    hydra_cfg = HydraConfig.get()
    run_dir = str(Path(composed.run.dir).absolute())  # resolved here, where ${hydra:...} works
    with errors_as_one_line("dlt-train"):
        on_slurm = "submitit" in str(hydra_cfg.launcher.get("_target_", ""))
        if on_slurm and "SLURM_JOB_ID" in os.environ:  # torchrun's processes check the config
            profile = to_schema(ClusterProfile, composed, "cluster")
            overrides = [
                o
                for o in strip_cluster_overrides(list(hydra_cfg.overrides.task))
                if not o.startswith("run.dir=")
            ]
            task = TrainTask([*overrides, f"run.dir={run_dir}"], profile.processes_per_node, 0)
            return task()
        given = given_keys(list(hydra_cfg.overrides.task))
        train_here(resolve_config(training_dict(composed), world_size=1, given=given))
    return "finished"


# Hydra's own command-line flags; with them the composition is Hydra's business alone.
HYDRA_FLAGS = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn")


def job_overrides(argv: list[str]) -> list[list[str]] | None:
    """The override list of every job, as Hydra's basic sweeper splits them (one value of each
    swept key per job; the last of a repeated key wins). None when this cannot be known
    before Hydra runs: its config flags, or a sweep other than a list or range."""
    if any(a.split("=")[0] in HYDRA_FLAGS for a in argv):
        return None
    choices: dict[str, list[str]] = {}
    for o in OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")]):
        key = o.get_key_element()
        if not o.is_sweep_override():
            choices[key] = [f"{key}={o.get_value_element_as_str()}"]
        elif o.is_discrete_sweep() and o.value_type != ValueType.GLOB_CHOICE_SWEEP:
            choices[key] = [f"{key}={value}" for value in o.sweep_string_iterator()]
        else:
            return None
    return [list(job) for job in itertools.product(*choices.values())]


def check_every_job(argv: list[str]) -> None:
    """Each job of the sweep through the one validation, with the world size it will have,
    before the first one starts (each job checks itself again where it runs)."""
    for num, job in enumerate(job_overrides(argv) or []):
        composed = compose_config("train", job, with_hydra=True)
        with open_dict(composed):
            hydra_node = composed.pop("hydra")  # Hydra's own node: the launcher, the job
        with open_dict(hydra_node):  # what the launcher fills in; `${hydra:...}` may read them
            hydra_node.job.num, hydra_node.job.id = num, f"check_{num}"
        HydraConfig.instance().set_config(OmegaConf.create({"hydra": hydra_node}))
        launcher = hydra_node.launcher
        on_slurm = "submitit" in str(launcher.get("_target_", ""))
        profile = to_schema(ClusterProfile, composed, "cluster")
        world_size = int(launcher.get("nodes", 1)) * profile.processes_per_node if on_slurm else 1
        try:
            resolve_config(training_dict(composed), world_size=world_size, given=given_keys(job))
        except ConfigError as err:
            raise ConfigError(f"{err} (sweep job {num}: {' '.join(job)})") from None
