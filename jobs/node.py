"""One node's share of a SLURM training job: `torchrun` with a c10d rendezvous.

Both routes run this once per node: `srun --ntasks-per-node=1` in `sbatch/train.sbatch`, or
one submitit `TrainTask` (below) per node, as `jobs/submit.py` submits it. It becomes, on every
node of the allocation:

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

A rank that stops answering: its peers wait `dist.timeout_s` in their next collective, then
NCCL's watchdog dumps each waiting rank's flight recorder into `<run.dir>/flight_recorder/`
and ends the process (:func:`nccl_environment`, applied by every CUDA training process); a
failure, which torchrun restarts at most `--max-restarts` times and SLURM never requeues.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

WARNING_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
FLIGHT_RECORDER = "flight_recorder"  # <run.dir>/flight_recorder/rank_<N>: NCCL's dumps
# A variable and the older names torch also reads for it: a user's setting under any of them wins.
NCCL_DEFAULTS = {
    # 3: a timed-out or failed collective ends the process (without aborting the communicators
    # first, which can itself hang); torchrun then stops the other ranks. torch's default
    # too, set here so that a site-wide 0 cannot turn timeouts into silent hangs.
    ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING"): "3",
    # The flight recorder: the last 2000 collectives of each rank (what, which group, its
    # sequence number, state, the Python stack that issued it), kept in a ring buffer ...
    ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"): "2000",
    # ... and written to a file per rank when the watchdog sees a timeout.
    ("TORCH_NCCL_DUMP_ON_TIMEOUT",): "1",
}
DUMP_FILE_VARS = ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE")


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


def nccl_environment(run_dir: str | Path, env: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to `env` so that NCCL's watchdog ends a hung job and leaves a
    trace of it: async error handling, the flight recorder (a ring buffer of each rank's last
    collectives) and its dump on a timeout into `<run_dir>/flight_recorder/rank_<N>`. Only
    what `env` does not set already (under the current or an older name).

    After a timeout, `torchfrtrace <run_dir>/flight_recorder --prefix rank_` (torch's
    analyser, `python -m torch.distributed.flight_recorder.fr_trace`) matches the ranks'
    records and names the first collective that some rank never joined."""
    added = {names[0]: value for names, value in NCCL_DEFAULTS.items() if not _any_set(names, env)}
    if not _any_set(DUMP_FILE_VARS, env):
        added[DUMP_FILE_VARS[0]] = str(Path(run_dir) / FLIGHT_RECORDER / "rank_")
    return added


def _any_set(names: tuple[str, ...], env: Mapping[str, str]) -> bool:
    return any(name in env for name in names)


def prepare_nccl(run_dir: str | Path) -> None:
    """In a training process, before its process group exists (NCCL reads these when the
    group is created): :func:`nccl_environment` into `os.environ`, and the dump folder."""
    added = nccl_environment(run_dir, os.environ)
    os.environ.update(added)
    dump_file = os.environ.get(DUMP_FILE_VARS[0]) or os.environ.get(DUMP_FILE_VARS[1])
    if dump_file:
        Path(dump_file).parent.mkdir(parents=True, exist_ok=True)


def ignore_warning_signals() -> None:
    """torchrun must survive the warning signal its children act on (SIG_IGN is inherited
    through exec; the training processes install their own handlers)."""
    for sig in WARNING_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class TrainTask:
    """The function submitit runs once per node: torchrun (`torchrun_command`) as a child.

    submitit's protocol: on the warning signal (USR2 for submitit jobs) submitit's handler
    calls `checkpoint()` in the first task, then requeues the job. The training processes got
    the same signal and are writing their checkpoint, so this task puts a handler of its own in
    front of submitit's: wait for torchrun to exit (at most `stop_timeout_s`), then let
    submitit requeue. `checkpoint()` hands submitit a fresh copy of this task, which resumes
    from that checkpoint. (The same front handler makes Hydra's submitit launcher, whose own
    `checkpoint()` requeues at once, wait too.)
    """

    def __init__(
        self,
        overrides: list[str],
        procs_per_node: int,
        max_restarts: int,
        stop_timeout_s: float = 600,
    ):
        self.overrides = list(overrides)
        self.procs_per_node = procs_per_node
        self.max_restarts = max_restarts
        self.stop_timeout_s = stop_timeout_s

    def __call__(self) -> str:
        import submitit

        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # meant for the training processes
        prepare_environment(self.procs_per_node)
        job = submitit.JobEnvironment()
        outcome_file = Path(job.paths.folder) / f"{job.job_id}.outcome"
        outcome_file.unlink(missing_ok=True)
        env = {**os.environ, "DLT_OUTCOME_FILE": str(outcome_file)}
        command = torchrun_command(self.overrides, self.procs_per_node, self.max_restarts)
        # A helper thread waits for torchrun, so that the signal handler (which runs on this
        # thread) can wait for it too without a deadlock.
        done = threading.Event()
        submitits_handler = signal.getsignal(signal.SIGUSR2)

        def wait_then_requeue(signum: int, frame: Any) -> None:
            done.wait(self.stop_timeout_s)  # the training processes are saving
            if callable(submitits_handler):
                submitits_handler(signum, frame)

        signal.signal(signal.SIGUSR2, wait_then_requeue)
        proc = subprocess.Popen(command, env=env, preexec_fn=ignore_warning_signals)
        returncode: list[int] = []
        threading.Thread(
            target=lambda: (returncode.append(proc.wait()), done.set()), daemon=True
        ).start()
        while not done.wait(1.0):
            pass
        signal.signal(signal.SIGUSR2, submitits_handler)
        outcome = outcome_file.read_text().strip() if outcome_file.exists() else "failed"
        if outcome == "failed" or returncode[0] != 0:
            raise RuntimeError(f"training failed (torchrun exit {returncode[0]}); see the log")
        return outcome

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        fresh = TrainTask(
            self.overrides, self.procs_per_node, self.max_restarts, self.stop_timeout_s
        )
        return submitit.helpers.DelayedSubmission(fresh)


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
