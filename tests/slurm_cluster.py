"""A one-node Slurm cluster of our own, for tests (root; Debian's slurmctld, slurmd, munge).

Everything lives in one folder: a private munge key and socket, slurm.conf (``SLURM_CONF`` points
the clients at it), state, spool, logs, pid files, free ports. Nothing under /etc is read or
changed, and ``stop()`` ends exactly the daemons it started. ``env`` is what sbatch/srun/squeue need.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.wire_peers import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "sinfo", "scontrol", "scancel")


def _which(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None)


def available() -> str | None:
    """None when a cluster can be started here, else why not (install: slurmctld slurmd slurm-client munge)."""
    if os.geteuid() != 0:
        return "the Slurm daemons run as root in this test"
    missing = [d for d in DAEMONS if _which(d) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install slurmctld slurmd slurm-client munge)"
    return None


class SlurmCluster:
    def __init__(self, root: Path, cpus: int | None = None) -> None:
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 2
        self._procs: list[subprocess.Popen] = []
        for d in ("state", "spool", "munge"):
            (root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(root / "munge", 0o700)
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self, timeout: float = 60.0) -> SlurmCluster:
        try:
            self._start_munge()
            self._write_conf()
            self._procs.append(self._daemon([_which("slurmctld"), "-D", "-f", str(self.conf)], "slurmctld"))
            self._wait(lambda: self._ok([_which("scontrol"), "ping"], "UP"), timeout, "slurmctld")
            self._procs.append(self._daemon([_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.host], "slurmd"))
            self._wait(lambda: self._ok([_which("sinfo"), "-h", "-o", "%t"], "idle"), timeout, "slurmd")
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        sock = self.root / "munge" / "munge.socket"
        self._procs.append(self._daemon(
            [_which("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={sock}",
             f"--pid-file={self.root / 'munge' / 'munged.pid'}", f"--seed-file={self.root / 'munge' / 'seed'}",
             f"--log-file={self.root / 'munge' / 'munged.log'}"], "munged"))
        self._wait(lambda: sock.exists(), 20, "munged")
        self.munge_socket = sock

    def _write_conf(self) -> None:
        r = self.root
        mem = 1024
        self.conf.write_text("\n".join([
            "ClusterName=distbert-test",
            # Job ids unique across test clusters: MPICH names its shared memory after the job and step,
            # and a segment left by a killed job 1.0 of an earlier cluster hangs a new job 1.0's MPI_Init.
            f"FirstJobId={int.from_bytes(os.urandom(3), 'big') + 1000}",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket}",
            "CredType=cred/munge",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}", f"SlurmdLogFile={r / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SchedulerType=sched/builtin", "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "ReturnToService=2", "SlurmdParameters=config_overrides", "JobCompType=jobcomp/none", "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none", "KillWait=5", "InactiveLimit=0", "MinJobAge=300",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={mem} State=UNKNOWN",
            "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4",
            "",
        ]))

    def _daemon(self, argv: list[str | None], name: str) -> subprocess.Popen:
        out = open(self.root / f"{name}.stdout", "w")
        return subprocess.Popen([a for a in argv if a], env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def _ok(self, argv: list[str | None], want: str) -> bool:
        p = subprocess.run([a for a in argv if a], env=self.env, capture_output=True, text=True, timeout=20)
        return p.returncode == 0 and want in p.stdout

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for p in self._procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{what}: {p.args!r} exited {p.returncode}:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not ready within {timeout:.0f} s:\n{self.logs()}")
            time.sleep(0.2)

    def logs(self) -> str:
        out = []
        for f in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.stdout")):
            out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-2000:]}")
        return "\n".join(out)

    def run(self, argv: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, env=kw.pop("env", self.env), capture_output=True, text=True, timeout=timeout, **kw)

    def _leftovers(self) -> list[int]:
        """Processes of this cluster's jobs that outlived the daemons (slurmstepd, tasks, sbatch,
        srun): they carry our SLURM_CONF in their environment."""
        mine = f"SLURM_CONF={self.conf}".encode()
        out = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != os.getpid():
                try:
                    if mine in (d / "environ").read_bytes().split(b"\0"):
                        out.append(int(d.name))
                except OSError:
                    continue
        return out

    def stop(self) -> None:
        for pid in self._leftovers():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for p in reversed(self._procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self._procs):
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        self._procs.clear()
