"""A real one-node Slurm cluster on this machine, for tests.

`start_slurm(tmp_root)` starts a private `munged`, then `slurmctld` and `slurmd -N localhost`
with a generated slurm.conf, and waits until the node is idle. Everything the daemons use
(munge key and socket, state, spool, logs, pid files) lives in a new directory, and the TCP
ports are picked afresh, so several test sessions can each run their own cluster at once.

How Slurm commands run over ssh find the configuration: the Debian binaries read
`/etc/slurm/slurm.conf` unless `SLURM_CONF` names another file. Writing the default path
would be global state: two test sessions running at once would overwrite each other's
configuration, and a killed session would leave a stale file behind. Editing the user's
login scripts would depend on the shell reading them. Instead the test sshd sets
`SLURM_CONF` in every session it starts (`SetEnv` in sshd_config; `SshServer.slurm_conf`),
whatever the shell or command, and `start_slurm(..., conf_path=ssh_server.slurm_conf)`
writes the configuration there. Jobs inherit it from sbatch.

Needs root (slurmd starts jobs as their users); `slurm_available()` tells why not otherwise.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from sshd import descendants, free_port, is_root, log_tail, stop_process_tree

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "scontrol", "sinfo")
SBIN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
PARTITION = "debug"
MUNGE_DEADLINE = 10.0
IDLE_DEADLINE = 30.0
SINFO_TIMEOUT = 5.0
PORT_ATTEMPTS = 5
KEY_BYTES = 1024


@dataclass
class SlurmCluster:
    """A one-node Slurm cluster (munged, slurmctld, slurmd) run by `start_slurm`."""

    conf_path: str
    tmpdir: str
    partition: str = PARTITION
    # The configuration written outside tmpdir (at the sshd's SLURM_CONF), if any.
    external_conf: str | None = field(default=None, repr=False)
    # The daemons by name, in the order they started.
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    @property
    def env(self) -> dict[str, str]:
        """Environment for running Slurm commands from this process: os.environ plus SLURM_CONF."""
        return {**os.environ, "SLURM_CONF": self.conf_path}

    @property
    def munge_socket(self) -> str:
        """munged's socket, in a directory every user can traverse."""
        return str(Path(self.tmpdir) / "munge" / "munge.socket")

    @property
    def log_dir(self) -> str:
        """The directory of the daemons' log and output files."""
        return str(Path(self.tmpdir) / "log")

    def logs(self, lines: int = 30) -> str:
        """Return the last lines of each daemon's log and output, for failure messages."""
        paths = sorted(Path(self.log_dir).glob("*"))
        return "\n".join(f"--- {path.name}\n{log_tail(str(path), lines)}" for path in paths)

    def run(self, *argv: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run a Slurm command here (as this process's user) against this cluster."""
        return subprocess.run(
            list(argv), check=False, capture_output=True, text=True, timeout=timeout, env=self.env
        )

    def stop(self) -> None:
        """Stop slurmd, slurmctld and munged, kill the jobs' processes, remove the files."""
        while self.processes:
            stop_process_tree(self.processes.popitem()[1])
        _kill_job_steps(self.tmpdir)
        if self.external_conf is not None:
            Path(self.external_conf).unlink(missing_ok=True)
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def slurm_available() -> str | None:
    """Return None if a test Slurm cluster can run here, else the reason why not."""
    if not is_root():
        return "not root (slurmd must run as root to start jobs as other users)"
    missing = [tool for tool in DAEMONS + CLIENTS if _which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (install slurm-wlm and munge)"
    return None


def start_slurm(tmp_root: str | Path, conf_path: str | Path | None = None) -> SlurmCluster:
    """Start a one-node cluster with its files in a new directory under tmp_root.

    tmp_root must be traversable by the users who submit jobs (they read slurm.conf and
    talk to the munge socket there). slurm.conf is written to conf_path if given (and
    removed by `stop()`), else inside the new directory. Returns once the node is idle.
    """
    tmpdir = Path(tempfile.mkdtemp(prefix="tej-slurm-", dir=str(tmp_root)))
    tmpdir.chmod(0o755)
    cluster = SlurmCluster(
        conf_path=str(conf_path if conf_path is not None else tmpdir / "slurm.conf"),
        tmpdir=str(tmpdir),
        external_conf=str(conf_path) if conf_path is not None else None,
    )
    try:
        for sub in ("log", "state", "spool", "run"):
            (tmpdir / sub).mkdir(mode=0o755)
        _start_munged(cluster)
        _start_slurm_daemons(cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _start_munged(cluster: SlurmCluster) -> None:
    """Start munged with a fresh key and wait until it answers on its socket."""
    tmpdir = Path(cluster.tmpdir)
    key_dir = tmpdir / "munge-key"
    key_dir.mkdir(mode=0o700)
    key = key_dir / "munge.key"
    key.write_bytes(os.urandom(KEY_BYTES))
    key.chmod(0o400)
    socket_path = Path(cluster.munge_socket)
    socket_path.parent.mkdir()
    socket_path.parent.chmod(0o755)  # Every user's Slurm commands talk to munged.
    argv = [
        _tool("munged"),
        "--foreground",  # Logs to stderr, i.e. munged.out.
        "--force",  # Tolerate the world-writable (sticky) /tmp above the socket directory.
        f"--socket={socket_path}",
        f"--key-file={key}",
        f"--pid-file={socket_path.parent / 'munged.pid'}",
        f"--seed-file={key_dir / 'munged.seed'}",
    ]
    munged = _spawn(cluster, "munged", argv)
    deadline = time.monotonic() + MUNGE_DEADLINE
    while time.monotonic() < deadline and munged.poll() is None:
        if socket_path.is_socket() and _munge_works(socket_path):
            return
        time.sleep(0.05)
    raise RuntimeError(f"munged did not start:\n{cluster.logs()}")


def _munge_works(socket_path: Path) -> bool:
    """Tell whether a credential round-trips through munged (`munge -n | unmunge`)."""
    munge, unmunge = _which("munge"), _which("unmunge")
    if munge is None or unmunge is None:
        return True  # The client tools are optional; slurmctld will tell if munged fails.
    credential = subprocess.run(
        [munge, "-n", "-S", str(socket_path)], check=False, capture_output=True, timeout=10
    )
    if credential.returncode != 0:
        return False
    decoded = subprocess.run(
        [unmunge, "-S", str(socket_path)],
        input=credential.stdout,
        check=False,
        capture_output=True,
        timeout=10,
    )
    return decoded.returncode == 0


def _start_slurm_daemons(cluster: SlurmCluster) -> None:
    """Start slurmctld and slurmd on free ports (retrying if one is taken meanwhile)."""
    (Path(cluster.tmpdir) / "plugstack.conf").write_text("")
    error = ""
    for _attempt in range(PORT_ATTEMPTS):
        _write_conf(cluster, *_two_free_ports())
        _spawn(cluster, "slurmctld", [_tool("slurmctld"), "-D", "-i"])
        _spawn(cluster, "slurmd", [_tool("slurmd"), "-D", "-N", "localhost"])
        error = _wait_idle(cluster)
        if not error:
            return
        if "Address already in use" not in cluster.logs():
            break
        for name in ("slurmd", "slurmctld"):
            stop_process_tree(cluster.processes.pop(name))
            for suffix in (".log", ".out"):
                (Path(cluster.log_dir) / f"{name}{suffix}").unlink(missing_ok=True)
    raise RuntimeError(f"Slurm did not become idle: {error}\n{cluster.logs()}")


def _wait_idle(cluster: SlurmCluster) -> str:
    """Poll `sinfo -h -o %T` until the node is idle; return "" then, else what went wrong."""
    deadline = time.monotonic() + IDLE_DEADLINE
    seen = "nothing"
    while time.monotonic() < deadline:
        exited = [name for name, p in cluster.processes.items() if p.poll() is not None]
        if exited:
            return f"{', '.join(exited)} exited"
        try:
            done = cluster.run(_tool("sinfo"), "-h", "-o", "%T", timeout=SINFO_TIMEOUT)
        except subprocess.TimeoutExpired:
            seen = f"sinfo gave no answer in {SINFO_TIMEOUT:.0f} s"
            continue
        if done.returncode == 0 and done.stdout.split() == ["idle"]:
            return ""
        seen = f"sinfo exited {done.returncode}: {(done.stdout + done.stderr).strip()}"
        time.sleep(0.2)
    return f"not idle after {IDLE_DEADLINE:.0f} s (last {seen})"


def _write_conf(cluster: SlurmCluster, ctld_port: int, slurmd_port: int) -> None:
    """Write slurm.conf: one node, one partition, everything under the cluster's directory."""
    tmpdir = Path(cluster.tmpdir)
    log_dir = Path(cluster.log_dir)
    lines = [
        "ClusterName=tejtest",
        "SlurmctldHost=localhost",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={cluster.munge_socket}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        # Allocate single CPUs, not whole cores, so jobs run side by side on any machine.
        "SelectTypeParameters=CR_CPU",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "MailProg=/bin/true",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "JobAcctGatherType=jobacct_gather/none",
        f"PlugStackConfig={tmpdir / 'plugstack.conf'}",
        f"StateSaveLocation={tmpdir / 'state'}",
        f"SlurmdSpoolDir={tmpdir / 'spool'}",
        f"SlurmctldPidFile={tmpdir / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={tmpdir / 'run' / 'slurmd.pid'}",
        f"SlurmctldLogFile={log_dir / 'slurmctld.log'}",
        f"SlurmdLogFile={log_dir / 'slurmd.log'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        # Timers: finished jobs stay in `scontrol show job` for 5 minutes; scancel's
        # SIGKILL follows SIGTERM after 5 s; a restarted node returns to service.
        "MinJobAge=300",
        "KillWait=5",
        "InactiveLimit=0",
        "SlurmctldTimeout=10",
        "SlurmdTimeout=30",
        "MessageTimeout=10",
        "ReturnToService=2",
        # Scheduling: try to start a job at once on submit and on every end.
        "SchedulerType=sched/builtin",
        "SchedulerParameters=sched_interval=1,batch_sched_delay=0,sched_min_interval=0",
        f"NodeName=localhost CPUs={_cpus()} RealMemory={_memory_mb()} State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
    ]
    conf = Path(cluster.conf_path)
    conf.write_text("\n".join(lines) + "\n")
    conf.chmod(0o644)


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) or os.cpu_count() or 1


def _memory_mb() -> int:
    """The machine's memory in MB, as slurmd counts it, with a little to spare."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return max(1, int(line.split()[1]) // 1024 - 64)
    return 1


def _two_free_ports() -> tuple[int, int]:
    first = free_port()
    second = free_port()
    while second == first:
        second = free_port()
    return first, second


def _kill_job_steps(tmpdir: str) -> None:
    """SIGKILL the slurmstepd processes left by slurmd, and their jobs' processes.

    slurmstepd detaches from slurmd (its parent becomes init), so stopping slurmd leaves
    running jobs behind. They are found by their working directory, which they inherit
    from slurmd: the cluster's directory.
    """
    steps = [pid for pid in _pids() if f"{_cwd(pid)}/".startswith(f"{tmpdir}/")]
    for pid in [pid for step in steps for pid in (step, *descendants(step))]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").glob("[0-9]*")]


def _cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


def _spawn(cluster: SlurmCluster, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
    """Start a daemon in its own session, in the cluster's directory, output to log/NAME.out.

    Its working directory is how `_kill_job_steps` recognizes the slurmstepd it starts.
    """
    env = {"PATH": SBIN_PATH, "LANG": "C.UTF-8", "SLURM_CONF": cluster.conf_path}
    with open(Path(cluster.log_dir) / f"{name}.out", "ab") as out:
        process = subprocess.Popen(
            argv,
            cwd=cluster.tmpdir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
            start_new_session=True,
        )
    cluster.processes[name] = process
    return process


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=f"{os.environ.get('PATH', '')}:{SBIN_PATH}")


def _tool(name: str) -> str:
    path = _which(name)
    if path is None:
        raise RuntimeError(f"{name} is missing (install slurm-wlm and munge)")
    return path
