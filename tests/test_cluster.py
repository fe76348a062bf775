"""`dlt-cluster`: the config it writes, its guards, and a real up/status/down cycle."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jobs import local_slurm
from jobs.local_slurm import ClusterError, ClusterSpec


def test_slurm_conf_has_one_slurmd_per_node_on_its_own_port(tmp_path):
    spec = ClusterSpec(nodes=3, cpus=4, mem_mb=1000, port=20000, dir=str(tmp_path))
    conf = local_slurm.slurm_conf(spec)
    nodes = [line for line in conf.splitlines() if line.startswith("NodeName=")]
    assert [n.split()[0] for n in nodes] == ["NodeName=n1", "NodeName=n2", "NodeName=n3"]
    assert [n.split("Port=")[1].split()[0] for n in nodes] == ["20001", "20002", "20003"]
    assert all("NodeAddr=127.0.0.1" in n and "CPUs=4" in n for n in nodes)
    assert "SlurmctldPort=20000" in conf and "PreemptMode=REQUEUE" in conf
    partitions = [line.split()[0] for line in conf.splitlines() if line.startswith("Partition")]
    assert partitions == ["PartitionName=normal", "PartitionName=low", "PartitionName=high"]
    assert conf.startswith(local_slurm.MARKER)


def test_down_leaves_a_folder_that_is_not_its_own_alone(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    local_slurm.down(ClusterSpec(dir=str(tmp_path)))
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert "no cluster" in capsys.readouterr().out


def test_up_refuses_a_folder_that_is_not_its_own(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ClusterError, match="not a dlt-cluster folder"):
        local_slurm.up(ClusterSpec(dir=str(tmp_path)))
    assert (tmp_path / "precious.txt").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "expected up, down or status"),
        (["sideways"], "expected up, down or status"),
        (["up", "nodes=two"], "nodes='two': expected an integer"),
        (["up", "colour=blue"], "expected one of nodes="),
        (["up", "nodes=0"], "nodes=0: expected at least 1"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        local_slurm.main(argv)
    assert err.value.code == 2
    stderr = capsys.readouterr().err
    assert message in stderr and stderr.count("\n") == 1


@pytest.mark.slurm
@pytest.mark.slow
def test_a_second_cluster_comes_up_and_goes_down_leaving_nothing(slurm_cluster, tmp_path):
    """Up, status, a job, down: every daemon it started is gone, its folder too, and the
    cluster that was already running is untouched."""
    root = tmp_path / "second"
    env = {**os.environ, "DLT_CLUSTER_DIR": str(root)}
    dlt = [sys.executable, "-m", "jobs.local_slurm"]
    up = subprocess.run([*dlt, "up", "port=18817", "nodes=2"], env=env, capture_output=True)
    assert up.returncode == 0, up.stderr
    pids = json.loads((root / "pids.json").read_text())
    assert {"slurmctld", "slurmd-n1", "slurmd-n2"} <= set(pids)
    status = subprocess.run([*dlt, "status"], env=env, capture_output=True, text=True)
    assert status.returncode == 0 and "n1 normal* idle" in status.stdout, status.stdout
    client = {**env, "SLURM_CONF": str(root / "slurm.conf")}
    job = subprocess.run(
        ["srun", "-N", "2", "hostname"], env=client, capture_output=True, text=True, timeout=60
    )
    assert job.returncode == 0 and len(job.stdout.split()) == 2, job.stderr
    down = subprocess.run([*dlt, "down"], env=env, capture_output=True, text=True)
    assert down.returncode == 0, down.stderr
    assert not root.exists()
    for name, pid in pids.items():
        assert not local_slurm._alive(pid), f"{name} ({pid}) still running"
    # The first cluster still answers.
    other = {**os.environ, "SLURM_CONF": slurm_cluster}
    assert subprocess.run(["sinfo"], env=other, capture_output=True).returncode == 0
