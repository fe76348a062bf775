"""`dlt-train --multirun ...`: a Hydra sweep, one training per combination of values.

    dlt-train --multirun train.lr=3e-4,1e-3 'run.dir=runs/sweep/lr${train.lr}' \
        hydra/launcher=submitit_slurm hydra.launcher.partition=gpu hydra.launcher.nodes=1

Each job of the sweep trains one config. With Hydra's basic launcher the jobs run one after
the other in this process; with `hydra/launcher=submitit_slurm` each is a SLURM job (an array
job) whose every node runs `jobs.node` (torchrun), as `dlt-train cluster=<profile>` does.
Give each job its own `run.dir` (interpolating the swept values, or `${hydra:job.num}`).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from jobs.cli import CONFIG_MODULE, errors_as_one_line, to_schema, too_many_digits, training_dict
from jobs.node import TrainTask
from jobs.profile import ClusterProfile
from jobs.submit import strip_cluster_overrides
from trainer.config import ConfigError, load_config


def sweep(argv: list[str]) -> None:
    limit = getattr(sys, "get_int_max_str_digits", lambda: 0)()
    with errors_as_one_line("dlt-train"):  # Hydra would parse it with a traceback
        if limit and any(len(run) > limit for arg in argv for run in re.findall(r"\d+", arg)):
            raise ConfigError(too_many_digits(argv))
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
            profile = to_schema(ClusterProfile, composed.cluster)
            overrides = [
                o
                for o in strip_cluster_overrides(list(hydra_cfg.overrides.task))
                if not o.startswith("run.dir=")
            ]
            task = TrainTask([*overrides, f"run.dir={run_dir}"], profile.processes_per_node, 0)
            return task()
        train_here(load_config(training_dict(composed), world_size=1))
    return "finished"
