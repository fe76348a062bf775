"""One node's share of a SLURM training job: `torchrun` with a c10d rendezvous.

Both routes run this once per node (`srun --ntasks-per-node=1` in `sbatch/train.sbatch`, one
submitit task per node in `jobs/submit.py`). It becomes, on every node of the allocation:

    torchrun --nnodes=$SLURM_JOB_NUM_NODES --nproc-per-node=P \\
             --rdzv-backend=c10d --rdzv-endpoint=<first node's address>:<port> \\
             --rdzv-id=$SLURM_JOB_ID --max-restarts=R -m jobs.train <overrides>

The torchrun agents meet at the first node (the c10d store), agree on the world (node order,
ranks), and each starts P processes (one per GPU). `--max-restarts` restarts the whole world
from the newest checkpoint after a failure, a bounded number of times.

Why one task per node rather than one per GPU: torchrun then owns the processes of a node
(restarts after a failure, clean shutdown, the same command as on a laptop), and SLURM only
has to start N tasks. The warning signals (USR1/USR2) that SLURM sends to every process of the
step are ignored by torchrun itself (an inherited SIG_IGN survives `exec`) and caught by the
training processes, which checkpoint at the next step boundary and exit cleanly.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

WARNING_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def first_node_address() -> str:
    """The address of the allocation's first node (its NodeAddr; usually its hostname)."""
    nodelist = os.environ["SLURM_JOB_NODELIST"]
    names = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
    ).stdout.split()
    info = subprocess.run(
        ["scontrol", "show", "node", "-o", names[0]], capture_output=True, text=True, check=True
    ).stdout
    for field in info.split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1]
    return names[0]


def rendezvous_port(job_id: int, base: int = 29500) -> int:
    """A port per job (requeued jobs keep their id, and so their port)."""
    return base + job_id % 20000


def torchrun_command(
    overrides: list[str], procs_per_node: int, max_restarts: int, port: int | None = None
) -> list[str]:
    env = os.environ
    job_id = int(env["SLURM_JOB_ID"])
    endpoint = f"{first_node_address()}:{port or rendezvous_port(job_id)}"
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={env.get('SLURM_JOB_NUM_NODES', env.get('SLURM_NNODES', '1'))}",
        f"--nproc-per-node={procs_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={job_id}",
        f"--max-restarts={max_restarts}",
        "-m",
        "jobs.train",
        *overrides,
    ]


def prepare_environment(procs_per_node: int) -> None:
    """Environment for torchrun and its processes on this node.

    - Split the task's CPUs between its processes (more threads than cores spin and stall).
    - A fresh store for the training processes at every restart: by default torchrun keeps
      one store for all its rendezvous rounds, and after a restart (a rank died) the new
      processes can read the old ones' addresses from it and hang or fail to connect.
    """
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, int(cpus) // procs_per_node))
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")


def ignore_warning_signals() -> None:
    """torchrun must survive the warning signal its children act on (SIG_IGN is inherited
    through exec; the training processes install their own handlers)."""
    for sig in WARNING_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.node", description=__doc__.split("\n")[0])
    parser.add_argument("--procs-per-node", type=int, default=1)
    parser.add_argument("--max-restarts", type=int, default=0)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if "SLURM_JOB_ID" not in os.environ:
        parser.error("run inside a SLURM job (srun), one task per node")
    command = torchrun_command(args.overrides, args.procs_per_node, args.max_restarts, args.port)
    prepare_environment(args.procs_per_node)
    ignore_warning_signals()
    sys.stdout.flush()
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
