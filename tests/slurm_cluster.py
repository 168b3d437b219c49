"""A real single-node SLURM cluster in a scratch directory, for tests.

munged, slurmctld and slurmd run as this process's children with every file (key, socket,
state, spool, logs, slurm.conf) under one directory; nothing system-wide is touched, and
``SLURM_CONF`` points the client commands (sbatch, scontrol, ...) at it. Needs root and the
Debian packages slurmctld, slurmd, slurm-client and munge (tests/run.sh installs them).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from conftest import free_port

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE"}


@dataclass
class Job:
    id: str
    state: str
    exit_code: str  # "status:signal", as SLURM reports it
    output: str  # the job's output file, read when the job ended
    fields: dict[str, str]


def free_port_range(n: int, low: int = 20000, high: int = 32000) -> int:
    """First port of ``n`` consecutive ports that are free right now (for RAY_PORT_BASE)."""
    for base in range(low + (os.getpid() % 50) * 200, high - n, 200):
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + n):
                    s = stack.enter_context(socket.socket())
                    s.bind(("0.0.0.0", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {n} consecutive free ports in {low}-{high}")


class SlurmCluster:
    """munged + slurmctld + slurmd for one node named after this host, with all its CPUs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.munge = root / "munge"
        self.procs: list[subprocess.Popen] = []

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _check_host(self) -> None:
        missing = [b for b in ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol")
                   if shutil.which(b) is None]
        if missing:
            raise RuntimeError(f"SLURM test needs {', '.join(missing)}: run the tests as root with "
                               "`bash tests/run.sh`, which installs the Debian packages slurmctld, slurmd, "
                               "slurm-client and munge")
        if os.geteuid() != 0:
            raise RuntimeError("the SLURM test starts slurmd and munged, which needs root")

    def start(self, timeout: float = 60.0) -> None:
        self._check_host()
        self.munge.mkdir()
        self.munge.chmod(0o711)  # munged refuses a socket folder others cannot traverse
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir()
        subprocess.run(["mungekey", "-c", "-k", str(self.munge / "munge.key")], check=True, capture_output=True)
        self._spawn(["munged", "-F", f"--key-file={self.munge / 'munge.key'}", f"--socket={self.munge / 'munge.socket'}",
                     f"--pid-file={self.munge / 'munged.pid'}", f"--seed-file={self.munge / 'munge.seed'}",
                     f"--log-file={self.root / 'log' / 'munged.log'}"])
        self._wait(lambda: (self.munge / "munge.socket").exists(), 10, "munged did not create its socket")
        self.conf.write_text(self._conf())
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._spawn(["slurmd", "-D", "-f", str(self.conf)])
        self._wait(self._node_idle, timeout, "the SLURM node did not become idle")

    def _conf(self) -> str:
        r = self.root
        cpus = os.cpu_count() or 1
        return "\n".join([
            "ClusterName=adptest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge / 'munge.socket'}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerParameters=batch_sched_delay=0",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "MinJobAge=600",
            "KillWait=10",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={r / 'log' / 'jobcomp.txt'}",
            f"NodeName={self.host} NodeAddr=127.0.0.1 Sockets=1 CoresPerSocket={cpus} ThreadsPerCore=1 "
            "RealMemory=1000 State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    def _spawn(self, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{Path(cmd[0]).name}.out", "w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"{what} (exited: {dead}); logs:\n{self.logs()}")
            time.sleep(0.3)

    def _node_idle(self) -> bool:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True)
        return r.returncode == 0 and r.stdout.strip() == "idle"

    def logs(self) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            text = f.read_text(errors="replace")
            out.append(f"--- {f.name}\n{text[-3000:]}")
        return "\n".join(out)

    def sbatch(self, script: str, args: list[str], cwd: Path, options: list[str] = (),
               env: dict[str, str] | None = None) -> str:
        r = subprocess.run(["sbatch", "--parsable", *options, script, *args], cwd=cwd, capture_output=True,
                           text=True, env={**self.env, **(env or {})})
        if r.returncode != 0:
            raise RuntimeError(f"sbatch failed: {r.stderr}")
        return r.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        r = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=self.env, capture_output=True, text=True,
                           check=True)
        fields = {}
        for item in r.stdout.split():
            key, sep, value = item.partition("=")
            if sep:
                fields[key] = value
        return fields

    def wait(self, job_id: str, timeout: float) -> Job:
        """Poll until the job ends; on timeout cancel it and raise with its output."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.job(job_id)
            if fields.get("JobState") in TERMINAL:
                break
            if time.monotonic() > deadline:
                subprocess.run(["scancel", job_id], env=self.env)
                out = Path(fields.get("StdOut", "")).read_text(errors="replace") if fields.get("StdOut") else ""
                raise TimeoutError(f"job {job_id} still {fields.get('JobState')} after {timeout:.0f}s; output:\n{out}")
            time.sleep(0.5)
        out_file = Path(fields["StdOut"])
        output = out_file.read_text(errors="replace") if out_file.is_file() else ""
        return Job(job_id, fields["JobState"], fields.get("ExitCode", ""), output, fields)

    def stop(self) -> None:
        subprocess.run(["scancel", "--user=root"], env=self.env, capture_output=True)
        subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True)
        daemons, munged = self.procs[1:], self.procs[:1]
        for p in daemons:  # slurmctld and slurmd exit on `scontrol shutdown`
            _stop(p, grace=15)
        for p in munged:
            _stop(p, grace=0)
        self.procs = []


def _stop(p: subprocess.Popen, grace: float) -> None:
    """Wait ``grace`` seconds for a daemon this module started, then terminate it, then kill it."""
    try:
        p.wait(grace)
        return
    except subprocess.TimeoutExpired:
        p.terminate()
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


@pytest.fixture(scope="module")
def slurm() -> Iterator[SlurmCluster]:
    """A running single-node SLURM cluster for the tests of one module.

    Its scratch folder is made outside pytest's private (0700) temp folder: munged requires
    every folder above its socket to be searchable by all.
    """
    root = Path(tempfile.mkdtemp(prefix="adp-slurm-"))
    root.chmod(0o711)
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
