"""`dlt-cluster up|down|status`: a real SLURM cluster on this one machine.

For trying the pipeline before touching a real cluster, and for the tests: Debian's
`slurmctld`, `slurmd` and `munge`, with two (or more) *nodes* on this host. Debian's slurmd is
built with multiple-slurmd support: each node is one `slurmd -N <name>` process with a port of
its own, all at address 127.0.0.1. Partitions:

- `normal` (default): never preempted;
- `low` / `high`: a `high` job that needs the machines preempts a `low` one the way a real
  cluster does: the job's `--signal` is sent, then after `GraceTime` it is requeued.

The scheduler runs every couple of seconds, so a requeued job starts again in seconds.
Everything lives in one folder (`dir=`, default /tmp/dlt-cluster); `down` cancels the jobs,
stops every daemon it started (by the PIDs it recorded) and removes that folder.
Client commands (sbatch, squeue, ...) find the cluster through `SLURM_CONF=<dir>/slurm.conf`
(also linked to /etc/slurm/slurm.conf when that path is free and we are root).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from data_prep.errors import UserError
from data_prep.files import write_text_atomic

DEBIAN_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
DEFAULT_DIR = "/tmp/dlt-cluster"
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
MARKER = "# written by dlt-cluster"
MUNGE_PID = Path("/run/munge/munged.pid")

USAGE = """usage: dlt-cluster up|down|status [nodes=N] [cpus=C] [mem_mb=M] [port=P] [grace_s=S]
                                    [dir=PATH]

  up      install (as root, from Debian's packages) and start a SLURM cluster of N nodes
          (default 2) on this machine; partitions normal (default), low and high (high
          preempts low: signal, grace time, requeue)
  down    cancel its jobs, stop its daemons by PID, remove its folder
  status  nodes and jobs

Then: export SLURM_CONF=<dir>/slurm.conf (printed by `up`) and use sbatch/srun/squeue."""


class ClusterError(UserError):
    """Something the user can fix; printed as one line."""


@dataclass
class ClusterSpec:
    nodes: int = 2
    cpus: int = 0  # per node; 0 = this machine's core count
    mem_mb: int = 0  # per node; 0 = a share of this machine's memory
    port: int = 16817  # slurmctld; node i listens on port + i
    dir: str = DEFAULT_DIR
    grace_s: int = 20  # low partition: seconds between the preemption signal and the requeue

    @property
    def root(self) -> Path:
        return Path(self.dir)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def node_names(self) -> list[str]:
        return [f"n{i}" for i in range(1, self.nodes + 1)]


def slurm_conf(spec: ClusterSpec) -> str:
    """The slurm.conf of the local cluster. Each setting is explained where it matters."""
    root = spec.root
    host = socket.gethostname()
    cpus = spec.cpus or os.cpu_count() or 1
    mem = spec.mem_mb or max(1000, _total_mem_mb() // (2 * spec.nodes))
    nodes = "\n".join(
        f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={spec.port + i} "
        f"CPUs={cpus} RealMemory={mem} State=UNKNOWN"
        for i, name in enumerate(spec.node_names(), start=1)
    )
    return f"""{MARKER} (dlt-cluster up); removed by dlt-cluster down
ClusterName=dlt
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={spec.port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Short-lived job credentials let a requeued job start again on the same nodes at once.
AuthInfo=cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
# Several slurmd on one host, and more CPUs than this machine has: config, not hardware.
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Schedule every couple of seconds (the default waits up to a minute).
SchedulerParameters=bf_interval=1,sched_interval=2
MinJobAge=300
KillWait=30
InactiveLimit=0
SlurmdTimeout=60
# Preemption by partition priority: the preemptee gets its --signal, then GraceTime, then is
# requeued (and starts again when the machines are free).
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
JobRequeue=1
{nodes}
PartitionName=normal Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=OFF
PartitionName=low Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime={spec.grace_s}
PartitionName=high Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
"""


def _total_mem_mb() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20


def _run(cmd: list[str], env: dict | None = None, check: bool = True) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        msg = " ".join((proc.stderr or proc.stdout).split())
        raise ClusterError(f"`{' '.join(cmd)}` failed: {msg}")
    return proc.stdout


def _client_env(spec: ClusterSpec) -> dict[str, str]:
    return {**os.environ, "SLURM_CONF": str(spec.conf)}


def install() -> None:
    """Debian's SLURM and munge packages (root only; a no-op when they are there)."""
    missing = [exe for exe in ("slurmctld", "slurmd", "sbatch", "munged") if not _which(exe)]
    if not missing:
        return
    if os.geteuid() != 0:
        raise ClusterError(
            f"{', '.join(missing)} not installed; as root run: apt-get install "
            + " ".join(DEBIAN_PACKAGES)
        )
    print("dlt-cluster: installing " + " ".join(DEBIAN_PACKAGES), flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-qq"], env=env)
    _run(["apt-get", "install", "-y", "-qq", *DEBIAN_PACKAGES], env=env)


def _which(exe: str) -> str | None:
    return shutil.which(exe) or shutil.which(exe, path="/usr/sbin:/usr/bin:/sbin")


def munge_works() -> bool:
    if not _which("munge"):
        return False
    token = subprocess.run([_which("munge"), "-n"], capture_output=True)
    if token.returncode != 0:
        return False
    return (
        subprocess.run([_which("unmunge")], input=token.stdout, capture_output=True).returncode == 0
    )


def start_munge() -> int | None:
    """Start munged as user munge unless one already answers; its PID if we started it."""
    if munge_works():
        return None
    if os.geteuid() != 0:
        raise ClusterError("munged is not running; start it (or run dlt-cluster up as root)")
    run_dir = MUNGE_PID.parent
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.chown(run_dir, "munge", "munge")
    MUNGE_PID.unlink(missing_ok=True)  # a stale one would name some other process
    _run(["runuser", "-u", "munge", "--", _which("munged")])
    pid = _wait_pidfile(MUNGE_PID)
    if not _wait(munge_works, 10):
        raise ClusterError("munged started but does not answer (see its log in /var/log/munge)")
    return pid


def _wait(ready, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return True
        time.sleep(0.2)
    return ready()


def _wait_pidfile(path: Path, timeout_s: float = 10) -> int:
    if not _wait(lambda: path.exists() and path.read_text().strip().isdigit(), timeout_s):
        raise ClusterError(f"{path} did not appear: the daemon did not start")
    return int(path.read_text().strip())


def _alive(pid: int, name: str | None = None) -> bool:
    """Whether `pid` runs (not a zombie), and if `name` is given, runs that program: a PID
    recorded long ago may belong to another process by now, which we must not stop."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return name is None or Path(cmdline).name == name


def up(spec: ClusterSpec) -> None:
    controller = _read_pids(spec).get("slurmctld")
    if controller and _alive(controller, "slurmctld"):
        print(f"dlt-cluster: already up ({spec.conf})")
        return
    if spec.conf.exists() and spec.conf.read_text().startswith(MARKER):
        shutil.rmtree(spec.root)  # a stale cluster of ours (daemons gone): start clean
    elif spec.root.exists() and any(spec.root.iterdir()):
        raise ClusterError(f"dir={spec.root} exists and is not a dlt-cluster folder")
    install()
    for sub in ("state", "log", *(f"spool/{n}" for n in spec.node_names())):
        (spec.root / sub).mkdir(parents=True, exist_ok=True)
    write_text_atomic(spec.conf, slurm_conf(spec))
    write_text_atomic(spec.root / "spec.json", json.dumps(spec.__dict__))
    started = time.monotonic()
    try:
        _start_daemons(spec)
    except BaseException:
        down(spec, quiet=True)  # stop whatever did start; nothing half-up stays behind
        raise
    print(
        f"dlt-cluster: up in {time.monotonic() - started:.1f} s: {spec.nodes} nodes "
        f"({', '.join(spec.node_names())}), partitions normal/low/high\n"
        f"export SLURM_CONF={spec.conf}"
    )


def _start_daemons(spec: ClusterSpec) -> None:
    """munged (unless one answers), slurmctld, one slurmd per node; each PID recorded as soon
    as it is known, so that `down` can stop exactly these processes."""
    pids: dict[str, int] = {}
    munge_pid = start_munge()
    if munge_pid:
        pids["munged"] = munge_pid
    _save_pids(spec, pids)
    _link_system_conf(spec)
    _run([_which("slurmctld"), "-c", "-f", str(spec.conf)])  # -c: no state from an old run
    pids["slurmctld"] = _wait_pidfile(spec.root / "slurmctld.pid")
    _save_pids(spec, pids)
    for name in spec.node_names():
        _run([_which("slurmd"), "-f", str(spec.conf), "-N", name])
        pids[f"slurmd-{name}"] = _wait_pidfile(spec.root / f"slurmd-{name}.pid")
        _save_pids(spec, pids)
    if not _wait(lambda: _idle_nodes(spec) == spec.nodes, 30):
        raise ClusterError(f"nodes did not become idle; see {spec.root}/log")


def _idle_nodes(spec: ClusterSpec) -> int:
    out = _run(["sinfo", "-h", "-N", "-p", "normal", "-o", "%N %t"], _client_env(spec), False)
    return sum(1 for line in out.splitlines() if line.split()[-1:] == ["idle"])


def _link_system_conf(spec: ClusterSpec) -> None:
    """Let plain `sbatch` find the cluster (only where nothing else claims the path)."""
    if os.geteuid() != 0 or SYSTEM_CONF.exists() or SYSTEM_CONF.is_symlink():
        return
    SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
    SYSTEM_CONF.symlink_to(spec.conf)


def _save_pids(spec: ClusterSpec, pids: dict[str, int]) -> None:
    write_text_atomic(spec.root / "pids.json", json.dumps(pids, indent=1))


def _read_pids(spec: ClusterSpec) -> dict[str, int]:
    try:
        return json.loads((spec.root / "pids.json").read_text())
    except (OSError, ValueError):
        return {}


def down(spec: ClusterSpec, quiet: bool = False) -> None:
    """Cancel the cluster's jobs, stop its daemons (by recorded PID), remove its folder."""
    pids = _read_pids(spec)
    if not (spec.conf.exists() and spec.conf.read_text().startswith(MARKER)):
        print(f"dlt-cluster: no cluster in {spec.root}")
        return
    env = _client_env(spec)
    if _alive(pids.get("slurmctld", 0), "slurmctld"):
        jobs = _run(["squeue", "-h", "-o", "%i"], env, check=False).split()
        if jobs:
            _run(["scancel", "--full", *jobs], env, check=False)
        if not _wait(lambda: not _run(["squeue", "-h"], env, check=False).strip(), 60):
            left = " ".join(_run(["squeue", "-h", "-o", "%i"], env, check=False).split())
            print(f"dlt-cluster: warning: jobs {left} did not end; their processes may remain")
    # Nodes first (their job steps end with them), the controller, then munge.
    for name in sorted(pids, key=lambda k: (k == "munged", k == "slurmctld")):
        _stop(pids[name], _program(name))
    if SYSTEM_CONF.is_symlink() and os.readlink(SYSTEM_CONF) == str(spec.conf):
        SYSTEM_CONF.unlink()
    shutil.rmtree(spec.root, ignore_errors=True)
    if not quiet:
        print(f"dlt-cluster: down ({len(pids)} daemons stopped)")


def _program(daemon: str) -> str:
    """The executable behind a daemon's key in pids.json (slurmd-n1 -> slurmd)."""
    return daemon.split("-")[0]


def _stop(pid: int, name: str, timeout_s: float = 10) -> None:
    if not _alive(pid, name):
        return
    os.kill(pid, signal.SIGTERM)
    if not _wait(lambda: not _alive(pid, name), timeout_s):
        os.kill(pid, signal.SIGKILL)
        _wait(lambda: not _alive(pid, name), 5)


def status(spec: ClusterSpec) -> None:
    pids = _read_pids(spec)
    alive = {k: p for k, p in pids.items() if _alive(p, _program(k))}
    if "slurmctld" not in alive:
        print(f"dlt-cluster: not up ({spec.root})")
        raise SystemExit(1)
    env = _client_env(spec)
    print(f"SLURM_CONF={spec.conf}  daemons: " + " ".join(f"{k}={p}" for k, p in alive.items()))
    print(_run(["sinfo", "-N", "-o", "%N %P %t %c %m"], env, check=False), end="")
    print(_run(["squeue", "-o", "%i %P %j %T %M %l %D %R"], env, check=False), end="")


def parse(argv: list[str]) -> tuple[str, ClusterSpec]:
    if not argv or argv[0] not in ("up", "down", "status"):
        raise ClusterError("expected up, down or status (dlt-cluster --help)")
    spec = ClusterSpec(dir=os.environ.get("DLT_CLUSTER_DIR", DEFAULT_DIR))
    for arg in argv[1:]:
        key, sep, value = arg.partition("=")
        if not sep or key not in spec.__dataclass_fields__:
            raise ClusterError(
                f"{arg!r}: expected one of nodes=, cpus=, mem_mb=, port=, grace_s=, dir="
            )
        if key == "dir":
            spec.dir = value
        else:
            try:
                setattr(spec, key, int(value))
            except ValueError:
                raise ClusterError(f"{key}={value!r}: expected an integer") from None
    if spec.nodes < 1:
        raise ClusterError(f"nodes={spec.nodes}: expected at least 1")
    if argv[0] != "up" and (spec.root / "spec.json").exists():  # what `up` used
        saved = json.loads((spec.root / "spec.json").read_text())
        spec = ClusterSpec(**saved)
    return argv[0], spec


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return
    try:
        command, spec = parse(argv)
        {"up": up, "down": down, "status": status}[command](spec)
    except ClusterError as err:
        print(f"dlt-cluster: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
