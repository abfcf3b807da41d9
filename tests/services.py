"""Real services on localhost for the `services` tests: PostgreSQL, a single-node SLURM cluster (slurmctld + slurmd,
munge), started from the system's packages. Where the packages are missing they are installed with apt-get (as
root: a CI machine or a container); where that cannot be done the test is skipped, saying why.

Each service is private to the test session: its own data folder under /tmp, its own free ports, stopped at the
end; nothing of the machine's own PostgreSQL or SLURM is touched.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

APT_PACKAGES = {"postgresql": ["postgresql"], "slurm": ["slurm-wlm", "munge"]}
_APT_UPDATED: list[bool] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what: str, log: Path | None = None, limit: float = 300.0) -> None:
    """Poll `check()` until it is true; a service that never comes up fails the test with its log (the limit is a
    hang guard, far above a start on a busy machine)."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > limit:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} did not come up in {limit:.0f} s\n{tail}")
        time.sleep(0.2)


def require(service: str, binaries: list[str]) -> None:
    """Make sure `binaries` exist, installing the service's Debian packages when they do not (root only)."""
    if all(_which(b) for b in binaries):
        return
    if os.environ.get("AVRL_INSTALL_SERVICES", "1") == "0":
        pytest.skip(f"{service} is not installed and AVRL_INSTALL_SERVICES=0")
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{service} is not installed, and apt-get cannot install it here (needs root and apt-get): "
                    f"apt-get install {' '.join(APT_PACKAGES[service])}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    steps = ([] if _APT_UPDATED else [["apt-get", "update", "-q"]]) + [
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *APT_PACKAGES[service]]]
    for step in steps:
        out = subprocess.run(step, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            pytest.skip(f"{service} could not be installed ({' '.join(step)}: exit {out.returncode}): "
                        f"{out.stderr.strip()[-500:]}")
        if step[1] == "update":
            _APT_UPDATED.append(True)
    if not all(_which(b) for b in binaries):
        pytest.skip(f"{service}: {binaries} still missing after apt-get install")


def _which(binary: str) -> str | None:
    return shutil.which(binary) or next(iter(glob.glob(f"/usr/lib/postgresql/*/bin/{binary}")), None)


def _as(user: str) -> list[str]:
    """Run as `user` when we are root (PostgreSQL refuses to run as root); as ourselves otherwise."""
    return ["runuser", "-u", user, "--"] if os.geteuid() == 0 else []


@contextlib.contextmanager
def postgres():
    """A fresh PostgreSQL cluster on 127.0.0.1 (trust authentication, user postgres); yields its base URL,
    `postgresql://postgres@127.0.0.1:<port>`. Databases are made with `create_database`."""
    require("postgresql", ["initdb", "pg_ctl"])
    folder = Path(tempfile.mkdtemp(prefix="avrl-postgres-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    port, log = free_port(), folder / "server.log"
    subprocess.run([*_as("postgres"), _which("initdb"), "-D", str(folder / "data"), "-A", "trust", "-U", "postgres",
                    "--no-sync"], check=True, capture_output=True)
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    subprocess.run([*_as("postgres"), _which("pg_ctl"), "-D", str(folder / "data"), "-l", str(log), "-o", options,
                    "-w", "-t", "300", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*_as("postgres"), _which("pg_ctl"), "-D", str(folder / "data"), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def create_database(base_url: str, name: str) -> str:
    import psycopg

    with psycopg.connect(f"{base_url}/postgres", autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return f"{base_url}/{name}"


SLURM_CONF = """\
ClusterName=avrltest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
# No cgroups in a container: processes tracked by parent id, tasks not bound to CPUs.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Without slurmdbd there is no sacct; each finished job's state is written here instead.
JobCompType=jobcomp/filetxt
JobCompLoc={folder}/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@contextlib.contextmanager
def slurm():
    """A single-node SLURM cluster (this machine, all its CPUs) with its own slurm.conf; yields the environment
    that points sbatch, squeue and submitit at it ({"SLURM_CONF": ...}) and the folder holding its logs and its
    job-completion file (jobcomp.log)."""
    require("slurm", ["slurmctld", "slurmd", "sbatch", "munged"])
    if os.geteuid() != 0:
        pytest.skip("a private slurmd must run as root here")
    _start_munge()
    folder = Path(tempfile.mkdtemp(prefix="avrl-slurm-"))
    (folder / "state").mkdir()
    (folder / "spool").mkdir()
    host = socket.gethostname().split(".")[0]
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 - 1024
    conf = folder / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, ctld_port=free_port(), d_port=free_port(), folder=folder,
                                      cpus=os.cpu_count(), memory_mb=memory_mb))
    env = dict(os.environ, SLURM_CONF=str(conf))
    for daemon in ("slurmctld", "slurmd"):
        subprocess.run([daemon, "-f", str(conf)], env=env, check=True, capture_output=True)

    def idle() -> bool:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
        return out.stdout.strip() == "idle"

    try:
        wait_for(idle, "the SLURM node", folder / "slurmd.log")
        yield {"SLURM_CONF": str(conf)}, folder
    finally:
        for pid_file in ("slurmd.pid", "slurmctld.pid"):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int((folder / pid_file).read_text()), 15)
        shutil.rmtree(folder, ignore_errors=True)


def _start_munge() -> None:
    """munged, which SLURM authenticates with (its key is made by the Debian package)."""
    if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
        return
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    subprocess.run([*_as("munge"), "/usr/sbin/munged"], check=True, capture_output=True)
    wait_for(lambda: subprocess.run(["munge", "-n"], capture_output=True).returncode == 0, "munged")


def job_state(folder: Path, job_id: str) -> str:
    """The final JobState of a job, from the cluster's job-completion file. submitit can see a job's result before
    slurmctld has written the job's record (the job script is still exiting): wait for the record."""
    def states() -> dict[str, str]:
        found = {}
        path = folder / "jobcomp.log"
        for line in (path.read_text().splitlines() if path.exists() else []):
            fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
            found[fields["JobId"]] = fields["JobState"]
        return found

    wait_for(lambda: job_id in states(), f"the completion record of SLURM job {job_id}", folder / "slurmctld.log")
    return states()[job_id]
