"""Real services on localhost for the `services` tests: PostgreSQL, a single-node SLURM cluster (slurmctld + slurmd,
munge; with accounting also slurmdbd on a private MariaDB), started from the system's packages. Where the packages
are missing they are installed with apt-get (as root: a CI machine or a container); where that cannot be done the
test is skipped, saying why.

Each service is private to the test session: its own data folder under /tmp, its own free ports, stopped at the
end; nothing of the machine's own PostgreSQL, MariaDB or SLURM is touched.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

APT_PACKAGES = {
    "postgresql": ["postgresql"],
    "slurm": ["slurm-wlm", "munge"],
    "slurm accounting": ["slurmdbd", "mariadb-server"],
    "chromium": ["chromium", "chromium-driver"],
}
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
        pytest.skip(
            f"{service} is not installed, and apt-get cannot install it here (needs root and apt-get): "
            f"apt-get install {' '.join(APT_PACKAGES[service])}"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    steps = ([] if _APT_UPDATED else [["apt-get", "update", "-q"]]) + [
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *APT_PACKAGES[service]]
    ]
    for step in steps:
        out = subprocess.run(step, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            pytest.skip(
                f"{service} could not be installed ({' '.join(step)}: exit {out.returncode}): "
                f"{out.stderr.strip()[-500:]}"
            )
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
    subprocess.run(
        [*_as("postgres"), _which("initdb"), "-D", str(folder / "data"), "-A", "trust", "-U", "postgres", "--no-sync"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    subprocess.run(
        [
            *_as("postgres"),
            _which("pg_ctl"),
            "-D",
            str(folder / "data"),
            "-l",
            str(log),
            "-o",
            options,
            "-w",
            "-t",
            "300",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(
            [*_as("postgres"), _which("pg_ctl"), "-D", str(folder / "data"), "-m", "immediate", "stop"],
            capture_output=True,
        )
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
{accounting}
# Each finished job's state is written here too, with or without accounting (services.job_state reads it).
JobCompType=jobcomp/filetxt
JobCompLoc={folder}/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


# Without slurmdbd there is no sacct: the controller alone knows a job (for MinJobAge after it ends).
NO_ACCOUNTING = """\
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none"""
# With it, every job is recorded in slurmdbd's database: sacct answers for jobs the controller has forgotten.
ACCOUNTING = """\
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={dbd_port}"""

SLURMDBD_CONF = """\
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={dbd_port}
SlurmUser=root
DebugLevel=info
PidFile={folder}/slurmdbd.pid
LogFile={folder}/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={db_port}
StorageUser=slurm
StoragePass={password}
StorageLoc=slurm_acct_db
"""


@contextlib.contextmanager
def slurm(accounting: bool = False):
    """A single-node SLURM cluster (this machine, all its CPUs) with its own slurm.conf; yields the environment
    that points sbatch, squeue and submitit at it ({"SLURM_CONF": ...}) and the folder holding its logs and its
    job-completion file (jobcomp.log). With `accounting`, jobs are recorded by a private slurmdbd in a private
    MariaDB (cluster `avrltest`), so that sacct answers as on a cluster with accounting."""
    require("slurm", ["slurmctld", "slurmd", "sbatch", "munged"])
    if accounting:
        require("slurm accounting", ["slurmdbd", "mariadbd", "sacctmgr"])
        if not (_which("mariadb-install-db") or _which("mysql_install_db")):
            pytest.skip("slurm accounting: neither mariadb-install-db nor mysql_install_db is installed")
    if os.geteuid() != 0:
        pytest.skip("a private slurmd must run as root here")
    _start_munge()
    folder = Path(tempfile.mkdtemp(prefix="avrl-slurm-"))
    (folder / "state").mkdir()
    (folder / "spool").mkdir()
    host = socket.gethostname().split(".")[0]
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 - 1024
    dbd_port = free_port()
    conf = folder / "slurm.conf"
    conf.write_text(
        SLURM_CONF.format(
            host=host,
            ctld_port=free_port(),
            d_port=free_port(),
            folder=folder,
            cpus=os.cpu_count(),
            memory_mb=memory_mb,
            accounting=ACCOUNTING.format(dbd_port=dbd_port) if accounting else NO_ACCOUNTING,
        )
    )
    env = dict(os.environ, SLURM_CONF=str(conf))

    def idle() -> bool:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
        return out.stdout.strip() == "idle"

    daemons = ["slurmd.pid", "slurmctld.pid", "slurmdbd.pid", "mariadb.pid"]
    try:
        if accounting:
            _start_accounting(folder, env, dbd_port)
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([daemon, "-f", str(conf)], env=env, check=True, capture_output=True)
        wait_for(idle, "the SLURM node", folder / "slurmd.log")
        if accounting:
            out = subprocess.run(["sacct", "-n", "-X"], env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"sacct fails on the cluster with accounting: {out.stderr}")
        yield {"SLURM_CONF": str(conf)}, folder
    finally:
        if (folder / "slurmctld.pid").exists():
            _cancel_all(env)
        for pid_file in daemons:  # the controller after its nodes, the database after slurmdbd
            _stop(folder / pid_file)
        if keep := os.environ.get("AVRL_KEEP_SLURM_LOGS"):  # a folder: the cluster's logs and state, kept there
            shutil.copytree(folder, Path(keep) / folder.name, ignore=shutil.ignore_patterns("mariadb*", "spool"))
        shutil.rmtree(folder, ignore_errors=True)


def _cancel_all(env: dict) -> None:
    """Every job left on the private cluster (a test that failed half-way), cancelled and gone from the queue: its
    slurmstepd and job processes would outlive slurmd otherwise."""

    def jobs() -> list[str]:
        out = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True)
        return out.stdout.split() if out.returncode == 0 else []

    if left := jobs():
        subprocess.run(["scancel", *left], env=env, capture_output=True)
        with contextlib.suppress(RuntimeError):
            wait_for(lambda: not jobs(), "the end of the jobs left on the cluster", limit=120)


def _start_accounting(folder: Path, env: dict, dbd_port: int) -> None:
    """A private MariaDB (its own data folder, socket and port, run as root: --user=root) holding slurm_acct_db,
    a slurmdbd on `dbd_port` that stores into it, and the cluster `avrltest` registered with it."""
    db, log = folder / "mariadb", folder / "mariadb.log"
    install = _which("mariadb-install-db") or _which("mysql_install_db")
    out = subprocess.run(
        [
            install,
            "--no-defaults",
            f"--datadir={db}",
            "--user=root",
            "--skip-test-db",
            "--auth-root-authentication-method=normal",
        ],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        pytest.skip(
            f"slurm accounting: {Path(install).name} fails here (exit {out.returncode}): "
            f"{(out.stdout + out.stderr).strip()[-800:]}"
        )
    db_port, sock = free_port(), folder / "mariadb.sock"
    server = subprocess.Popen(
        [
            _which("mariadbd"),
            "--no-defaults",
            f"--datadir={db}",
            "--user=root",
            f"--port={db_port}",
            "--bind-address=127.0.0.1",
            f"--socket={sock}",
            f"--pid-file={folder / 'mariadb.pid'}",
            f"--log-error={log}",
            "--skip-name-resolve",
            "--innodb-buffer-pool-size=128M",
            "--innodb-lock-wait-timeout=900",
            "--innodb-flush-log-at-trx-commit=0",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    client = [_which("mariadb") or _which("mysql"), "--no-defaults", f"--socket={sock}", "-u", "root"]

    def up() -> bool:
        if server.poll() is not None:
            raise RuntimeError(f"the accounting MariaDB exited ({server.returncode}):\n{log.read_text()[-3000:]}")
        return subprocess.run([*client, "-e", "SELECT 1"], capture_output=True).returncode == 0

    wait_for(up, "the accounting MariaDB", log)
    password = secrets.token_hex(16)
    subprocess.run(
        [
            *client,
            "-e",
            "CREATE DATABASE slurm_acct_db; "
            f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}'; "
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';",
        ],
        check=True,
        capture_output=True,
    )
    dbd_conf = folder / "slurmdbd.conf"  # slurmdbd reads it next to $SLURM_CONF; it holds a password: 600, root's
    dbd_conf.touch(mode=0o600)
    dbd_conf.write_text(SLURMDBD_CONF.format(dbd_port=dbd_port, folder=folder, db_port=db_port, password=password))
    subprocess.run(["slurmdbd"], env=env, check=True, capture_output=True)
    sacctmgr = ["sacctmgr", "-i", "-n", "-P"]
    wait_for(
        lambda: subprocess.run([*sacctmgr, "show", "cluster"], env=env, capture_output=True).returncode == 0,
        "slurmdbd",
        folder / "slurmdbd.log",
    )
    subprocess.run([*sacctmgr, "add", "cluster", "avrltest"], env=env, check=True, capture_output=True)


def _stop(pid_file: Path) -> None:
    """SIGTERM the daemon whose pid `pid_file` holds and wait until it has exited (SIGKILL after a minute)."""
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        with contextlib.suppress(RuntimeError):
            wait_for(lambda: not _alive(pid), f"the exit of {pid_file.stem}", limit=60)
            return


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, exited and not yet reaped by its parent, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


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
        for line in path.read_text().splitlines() if path.exists() else []:
            fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
            found[fields["JobId"]] = fields["JobState"]
        return found

    wait_for(lambda: job_id in states(), f"the completion record of SLURM job {job_id}", folder / "slurmctld.log")
    return states()[job_id]
