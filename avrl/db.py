"""SQL databases that several processes share (an Optuna study's `hydra.sweeper.storage`, an MLflow store's
`logger.tracking_uri`): the driver a URL needs, checked before anything starts, and a named lock that processes on
any machine reaching the database wait on."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
from collections.abc import Iterator

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.pool import NullPool

from avrl.redaction import redact

# The DB-API module SQLAlchemy imports for a URL -> what to install. SQLAlchemy 2.1 reads postgresql:// as psycopg
# (version 3); postgresql+psycopg2:// asks for the older driver.
DRIVER_PACKAGES = {
    "psycopg": 'pip install -e ".[postgres]"  (the psycopg[binary] package)',
    "psycopg2": "pip install psycopg2-binary",
    "pymysql": "pip install PyMySQL",
    "MySQLdb": "pip install mysqlclient",
}


class MissingDriver(ImportError):
    """The database driver a storage or tracking URL needs is not installed."""


def is_database_url(url: str) -> bool:
    """An SQLAlchemy URL (sqlite:///, postgresql://, mysql+pymysql://...), not an MLflow server or a folder."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    return bool(scheme) and scheme.split("+")[0] not in ("http", "https", "file", "databricks", "uc", "s3", "gs")


def require_driver(url: str, setting: str) -> None:
    """Fail at once, naming the package to install, when the database driver `url` needs is missing (SQLAlchemy's
    own error, "Failed to import DB access module", names neither). `setting` is the config key that holds it."""
    if not is_database_url(url):
        return
    try:
        dialect = make_url(url).get_dialect()
    except (ArgumentError, NoSuchModuleError) as error:
        raise ValueError(f"{setting}={redact(url)} is not a database URL SQLAlchemy knows: {error}") from None
    try:
        dialect.import_dbapi()
    except ImportError as error:
        module = (error.name or str(error)).split(".")[0]
        hint = DRIVER_PACKAGES.get(module, f"pip install {module}")
        raise MissingDriver(
            f"{setting}={redact(url)} needs the database driver `{module}`, which is not installed: {hint}"
        ) from None


@contextlib.contextmanager
def lock(url: str, name: str) -> Iterator[None]:
    """Hold the lock `name` in the database at `url`: a PostgreSQL advisory lock or a MySQL named lock (every
    machine that reaches the database waits on it); for SQLite, an exclusive file lock beside the database file,
    one file per name (every process on the machines that share that file). Held on its own connection, so the
    work done inside may use the database freely."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":  # one process: nothing to share
            yield
            return

        with open(f"{parsed.database}.{hashlib.sha1(name.encode()).hexdigest()[:12]}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    statements = {
        "postgresql": ("SELECT pg_advisory_lock(:key)", "SELECT pg_advisory_unlock(:key)"),
        "mysql": ("SELECT GET_LOCK(:name, -1)", "SELECT RELEASE_LOCK(:name)"),
        "mariadb": ("SELECT GET_LOCK(:name, -1)", "SELECT RELEASE_LOCK(:name)"),
    }
    if backend not in statements:
        raise NotImplementedError(f"no cross-process lock for {backend} databases (PostgreSQL, MySQL or SQLite)")
    acquire, release = statements[backend]
    key = int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big", signed=True)  # advisory locks take a bigint
    values = {"key": key, "name": name[:64]}
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(text(acquire), values)
            connection.commit()
            try:
                yield
            finally:
                connection.execute(text(release), values)
                connection.commit()
    finally:
        engine.dispose()
