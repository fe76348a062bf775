"""Shared test helpers: tiny configs that train in a fraction of a second on CPU."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

# Nothing in the tests may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


# The trainer's keys of cluster_configs/data/dummy.yaml (the defaults are data=sample's).
DUMMY_DATA = {
    "name": "dummy",
    "kind": "dummy",
    "path": None,
    "tokenizer": "bytes",
    "vocab_size": 257,
}


def tiny_config(run_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A 2-layer, 32-wide model on dummy data (the keys of data=dummy); `sections` update the
    defaults per section."""
    cfg: dict[str, Any] = {
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32},
        "data": dict(DUMMY_DATA),
        "train": {"max_steps": 6, "micro_batch_size": 2, "warmup_steps": 2, "lr": 1e-3},
        "eval": {"interval": 0},
        "log": {"interval": 1, "progress": False},
        "checkpoint": {"interval": 0, "keep": 3},
        "run": {"dir": str(run_dir)},
        "device": "cpu",
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg


@pytest.fixture
def tiny(tmp_path: Path):
    """Factory: `tiny(name, **sections)` -> a config dict whose run dir is under tmp_path."""

    def make(name: str = "run", **sections: dict[str, Any]) -> dict[str, Any]:
        return tiny_config(tmp_path / name, **sections)

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors gain nothing from intra-op threads, and spinning threads stall a busy
    CPU: modules of many tiny computations use one thread (`pytestmark = usefixtures(...)`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local SLURM cluster (`dlt-cluster up`): reused when it is already up, otherwise
    started here (installing Debian's packages as root) and stopped at the end."""
    import shutil
    import subprocess
    import sys

    import slurm_helpers as slurm

    if os.geteuid() != 0 and not shutil.which("slurmctld", path="/usr/sbin:/usr/bin"):
        pytest.skip("SLURM is not installed and only root can install it (dlt-cluster up)")
    status = [sys.executable, "-m", "jobs.local_slurm", "status"]
    env = {**os.environ, "DLT_CLUSTER_DIR": slurm.CLUSTER_DIR}
    started = False
    if subprocess.run(status, capture_output=True, env=env).returncode != 0:
        up = subprocess.run(
            [sys.executable, "-m", "jobs.local_slurm", "up"],
            capture_output=True,
            text=True,
            env=env,
        )
        assert up.returncode == 0, f"dlt-cluster up failed:\n{up.stdout}\n{up.stderr}"
        started = True
    yield slurm.SLURM_CONF
    if started:
        subprocess.run([sys.executable, "-m", "jobs.local_slurm", "down"], env=env, check=True)


@pytest.fixture
def calls(monkeypatch) -> dict[str, list[str]]:
    """dlt-bench's suites each replaced by one that records the arguments it was given."""
    from benchmarks import suite

    seen: dict[str, list[str]] = {}
    fakes = {name: (lambda args, name=name: seen.__setitem__(name, args)) for name in suite.SUITES}
    monkeypatch.setattr(suite, "SUITES", fakes)
    return seen
