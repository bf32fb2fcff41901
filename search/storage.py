"""Where an experiment keeps what must outlive its machines (DESIGN.md, "Experiment directory").

`output.storage`: the results store, Ray Tune's experiment state and checkpoints, and the nested
Ray Train runs of an experiment go to `<output.storage>/<experiment name>/`: a local path, a
shared mount (NFS) or a URI that pyarrow's filesystems open (s3://, gs://, abfs://, hdfs://,
file://). Empty: the experiment directory itself, which is right on one machine. Ray no longer
syncs trial directories to the head, so on a cluster this is how every node reaches them.

`search.storage`: the Optuna study, as an SQLAlchemy URL (e.g. postgresql://host/db, so several
drivers share one database). Empty: SQLite in the experiment directory.

Both are checked twice: their form when the config is read (`check_output_storage`,
`check_study_url`), and whether they can be reached before Ray starts (`probe`).
"""
from __future__ import annotations

import uuid
from pathlib import Path

from data_pipeline.errors import MsaSearchError

# pyarrow.fs.FileSystem.from_uri's schemes (pyarrow 26).
URI_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


class StorageError(MsaSearchError):
    pass


def is_uri(location: str) -> bool:
    return "://" in location


def check_output_storage(value: str) -> str:
    """The form of `output.storage`; returns it with a local path made absolute (a relative path
    would mean another place on every node)."""
    if not value:
        return value
    if is_uri(value):
        scheme = value.split("://", 1)[0].lower()
        if scheme not in URI_SCHEMES:
            raise ValueError(f"unknown filesystem '{scheme}://' (got {value!r}); use a path, or one of "
                             + ", ".join(f"{s}://" for s in URI_SCHEMES))
        if not value.split("://", 1)[1].strip("/"):
            raise ValueError(f"no bucket or path after '{scheme}://' (got {value!r})")
        return value.rstrip("/")
    return str(Path(value).expanduser().resolve())


def check_study_url(value: str) -> str:
    """The form of `search.storage`: an SQLAlchemy URL without a password (config.yaml and every
    results row carry the config; the database's own credential files carry the password)."""
    if not value:
        return value
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(value)
    except ArgumentError:
        raise ValueError(f"not an SQLAlchemy database URL (got {value!r}); e.g. postgresql://host/db or "
                         "sqlite:////abs/path/optuna.db") from None
    if url.password is not None:
        raise ValueError(f"the URL holds a password (got {url.render_as_string(hide_password=True)!r}), which "
                         "would be written to config.yaml and every results row; give it to the database "
                         "client instead (PostgreSQL: ~/.pgpass or PGPASSWORD; MySQL: ~/.my.cnf)")
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).is_absolute():
        raise ValueError(f"a relative SQLite path depends on where the driver starts (got {value!r}); "
                         "use an absolute one: sqlite:////abs/path/optuna.db")
    return value


def shown(url: str) -> str:
    """A study URL fit for a message (no password, should one slip through)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 (only ever used in a message)
        return "<search.storage>"


def experiment_storage(output_storage: str, exp_dir: Path) -> str:
    """The experiment's storage root: `<output.storage>/<experiment name>`, or '' where the
    experiment directory keeps everything."""
    return join(output_storage, exp_dir.name) if output_storage else ""


def join(location: str, *parts: str) -> str:
    if is_uri(location):
        return "/".join([location.rstrip("/"), *parts])
    return str(Path(location, *parts))


def local(location: str | Path) -> str:
    """A location as a local path where it is one: a file:// URI as its path (also as a Path made
    of one, which reads 'file:/...'); other URIs stay as they are, to be copied here first."""
    location = str(location)
    for scheme in ("file://", "file:"):
        if location.startswith(scheme + "/"):
            return location[len(scheme):]
    return location


def filesystem(location: str | Path):
    """(pyarrow filesystem, path inside it) of a local path or a URI."""
    from pyarrow import fs

    location = str(location)
    if is_uri(location):
        return fs.FileSystem.from_uri(location)
    return fs.LocalFileSystem(), str(Path(location).resolve())


def exists(location: str | Path) -> bool:
    from pyarrow import fs

    filesystem_, path = filesystem(location)
    return filesystem_.get_file_info(path).type != fs.FileType.NotFound


def holds_anything(location: str | Path) -> bool:
    from pyarrow import fs

    filesystem_, path = filesystem(location)
    if filesystem_.get_file_info(path).type != fs.FileType.Directory:
        return False
    return bool(filesystem_.get_file_info(fs.FileSelector(path, recursive=False)))


def probe(location: str) -> None:
    """Write, read back and delete a small file at `location` (output.storage), before Ray
    starts: a bucket that does not exist, missing credentials or a read-only mount is one line
    now, not a failure on the first checkpoint of every trial."""
    probe_path = None
    try:
        filesystem_, path = filesystem(location)
        filesystem_.create_dir(path, recursive=True)
        probe_path = f"{path.rstrip('/')}/.msa-search-probe-{uuid.uuid4().hex[:8]}"
        with filesystem_.open_output_stream(probe_path) as out:
            out.write(b"ok")
        with filesystem_.open_input_stream(probe_path) as inp:
            if inp.read() != b"ok":
                raise OSError("the file read back differs from the one written")
        filesystem_.delete_file(probe_path)
    except (OSError, ValueError) as exc:  # pyarrow raises OSError (and ArrowInvalid, a ValueError)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StorageError(f"output.storage: cannot write to {location}: {reason}") from None


def check_location(location: str, *, new: bool, resume_hint: str | None = None) -> None:
    """An experiment's (or run's) storage root, before Ray starts: reachable and writable, and
    for a new one empty (the same output.dir name twice would mix two experiments' files)."""
    if new and holds_anything(location):
        raise StorageError(f"output.storage: {location} holds files already (from an earlier run of the same "
                           f"name?); choose another output.dir name"
                           + (f", or continue it with: {resume_hint}" if resume_hint else ""))
    probe(location)


def probe_study(url: str) -> None:
    """Connect to `search.storage` and create Optuna's tables there, before Ray starts."""
    import sqlalchemy.exc

    try:
        import optuna

        optuna.storages.RDBStorage(url)
    except ImportError as exc:  # the database's DBAPI driver
        raise StorageError(f"search.storage: the database driver is not installed ({exc}); install it in "
                           f"this environment (PostgreSQL: pip install psycopg2-binary)") from None
    except (sqlalchemy.exc.SQLAlchemyError, RuntimeError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise StorageError(f"search.storage: cannot open the Optuna study database {shown(url)}: {reason}") \
            from None
