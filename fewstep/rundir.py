"""A run directory has one writer at a time, and what it holds is never lost by accident (``fewstep.layout``: where
its files live).

- ``hold(directory)``: a lock file, ``.fewstep.lock`` (PID, host, kernel boot id, start time, command), held with
  ``fcntl.flock`` for as long as a run uses the directory and removed when it ends (normally, on an exception, on
  Ctrl-C). A second run on the directory is refused in one line naming the first's PID. A lock whose process is
  gone (a run killed with SIGKILL, a machine that went down) is taken over, with a line saying so. Under DDP/FSDP
  only global rank zero takes it: the other ranks are processes of the same run.
- ``check_checkpoints(cfg)``: a directory that already holds checkpoints is trained in only with ``resume=auto``
  (continue them), ``ckpt_path`` in that directory (continue from that one) or ``overwrite=true`` (start again:
  they are removed first); otherwise the run is refused in one line that names both options.
- ``remove_stale_temporaries(directory)``: the ``.<name>.<pid>.tmp`` files of checkpoint writes whose process died
  mid-write (``fewstep.checkpoints.AtomicCheckpointIO``) are removed at the next start.
- ``GuardedTensorBoardLogger``: a TensorBoard event write that fails (a full disk) becomes one warning line, and
  training goes on; the checkpoints are what a run cannot lose, and their writes still fail in one line.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig

from fewstep import layout
from fewstep.errors import ConfigError, FewstepError, one_line

try:
    import fcntl
except ImportError:  # not on POSIX: the PID in the file is all there is
    fcntl = None

LOCK_NAME = ".fewstep.lock"
TEMPORARY = re.compile(r"^\..+\.(\d+)\.tmp$")  # AtomicCheckpointIO's .<name>.<pid>.tmp


class RunDirectoryError(FewstepError):
    """The run directory cannot be written (its lock file, or removing replaced checkpoints)."""


def info(message: str) -> None:
    """One plain line on stdout (never wrapped, so that a path in it can be copied whole)."""
    print(f"fewstep: {one_line(message)}", flush=True)


def warn(message: str) -> None:
    """One warning line on stderr."""
    print(f"fewstep: warning: {one_line(message)}", file=sys.stderr, flush=True)


# -- ranks ---------------------------------------------------------------------------------------------------


def is_rank_zero() -> bool:
    """Whether this process is the run's global rank zero (or the only process).

    Lightning starts ranks > 0 of ``trainer.strategy=ddp`` as copies of the command with ``LOCAL_RANK`` set; torchrun
    sets ``RANK``, SLURM ``SLURM_PROCID``, a multi-node launch ``NODE_RANK``. Any of them non-zero: not rank zero.
    """
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        value = os.environ.get(name, "").strip()
        if value and value != "0":
            try:
                if int(value) != 0:
                    return False
            except ValueError:
                continue
    return True


# -- processes -----------------------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (a zombie, which has ended, does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    except OSError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def boot_id() -> str | None:
    """This kernel's boot id: the same in every container on this machine, another on any other machine or boot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


# -- the lock ------------------------------------------------------------------------------------------------


@dataclass
class _Held:
    fd: int
    pid: int  # the process that took it (a forked child inherits the table, not the lock)
    count: int = 1


_HELD: dict[str, _Held] = {}


def lock_path(directory: str | Path) -> Path:
    return Path(directory) / LOCK_NAME


def read_holder(path: Path, fd: int | None = None) -> dict | None:
    """The lock file's record, or None if it is empty or unreadable."""
    try:
        if fd is not None:
            os.lseek(fd, 0, os.SEEK_SET)
            text = os.read(fd, 65536).decode("utf-8", "replace")
        else:
            text = path.read_text(errors="replace")
        holder = json.loads(text)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def describe(holder: dict | None) -> str:
    if holder is None:
        return "a process that is starting (its lock file is still empty)"
    text = f"PID {holder['pid']} on {holder.get('host', '?')}"
    if holder.get("started"):
        text += f", started {holder['started']}"
    return text


def held_error(directory: Path, holder: dict | None, other_host: bool = False) -> ConfigError:
    message = (
        f"run directory {directory} is in use by another fewstep run ({describe(holder)}): wait for it to end, or give "
        "this run a directory of its own (hydra.run.dir=...)"
    )
    if other_host:
        message += f"; if no run on {holder.get('host')} uses it any more, delete {lock_path(directory)}"
    return ConfigError(message)


def _flock(fd: int) -> bool | None:
    """True: this process now holds the file's lock; False: another holds it; None: the file system has no flock."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as error:
        if error.errno in (errno.EAGAIN, errno.EACCES):
            return False
        return None  # ENOLCK, EOPNOTSUPP, ...: fall back on the PID in the file


def _is_stale(holder: dict | None, locked: bool | None) -> tuple[bool, bool]:
    """(stale, on another host) for the record of a lock file this process could flock (or that has no flock)."""
    if holder is None:  # empty: the holder died between creating and writing it, unless flock is unavailable
        return bool(locked), False
    host, me = holder.get("host"), socket.gethostname()
    if host == me:
        return holder["pid"] == os.getpid() or not pid_alive(holder["pid"]), False
    # another host name: a container on this machine (the same kernel: flock is exact) or another machine
    if locked and holder.get("boot_id") and holder.get("boot_id") == boot_id():
        return True, False
    return False, True


def acquire(directory: str | Path) -> int:
    """Take the lock of ``directory`` (created if absent) for this process; returns the lock file's descriptor."""
    directory = Path(directory)
    path = lock_path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunDirectoryError(f"cannot create run directory {directory} ({error.strerror or error})") from None
    for _ in range(100):
        created = True
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            created = False
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:  # its holder just removed it
                continue
            except OSError as error:
                raise RunDirectoryError(f"cannot open the lock file {path} ({error.strerror or error})") from None
        except OSError as error:
            raise RunDirectoryError(
                f"cannot write the lock file {path} ({error.strerror or error}): free space (or fix the directory)"
            ) from None
        locked = _flock(fd)
        if locked is False:
            holder = read_holder(path)
            os.close(fd)
            raise held_error(directory, holder)
        try:  # the file we locked must still be the one at the path (its holder may have removed it meanwhile)
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        holder = None if created else read_holder(path, fd)
        stale, other_host = _is_stale(holder, locked)
        if not created:
            if not stale:
                os.close(fd)
                raise held_error(directory, holder, other_host)
            if holder is None:
                info(f"run directory {directory}: taking over an empty lock file, which no running process holds")
            elif holder["pid"] != os.getpid() or holder.get("host") != socket.gethostname():
                info(f"run directory {directory}: taking over the lock of {describe(holder)}, which is no longer running")
        record = {
            "pid": os.getpid(), "host": socket.gethostname(), "boot_id": boot_id(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv),
        }
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(record) + "\n").encode())
            os.fsync(fd)
        except OSError as error:
            os.close(fd)
            raise RunDirectoryError(
                f"cannot write the lock file {path} ({error.strerror or error}): free space (or fix the directory)"
            ) from None
        return fd
    raise RunDirectoryError(f"could not take the lock file {path}: it keeps being replaced by other processes")


def release(directory: str | Path, fd: int) -> None:
    """Remove the lock file (if it is still this process's) and drop the lock."""
    path = lock_path(directory)
    try:
        holder = read_holder(path, fd)
        if holder is not None and holder["pid"] == os.getpid() and os.fstat(fd).st_ino == os.stat(path).st_ino:
            path.unlink()
    except OSError:
        pass
    finally:
        os.close(fd)


def check_not_held(directory: str | Path) -> None:
    """Refuse, as ``hold`` would, a directory whose lock a live run holds; takes and changes nothing."""
    directory = Path(directory)
    held = _HELD.get(str(directory.resolve()))
    if not is_rank_zero() or (held is not None and held.pid == os.getpid()):
        return
    path = lock_path(directory)
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:  # no lock file (or none this process may open: hold will say so)
        return
    try:
        locked = _flock(fd)
        holder = read_holder(path, fd)
        if locked is False:
            raise held_error(directory, holder)
        stale, other_host = _is_stale(holder, locked)
        if not stale:
            raise held_error(directory, holder, other_host)
    finally:
        os.close(fd)


@contextmanager
def hold(directory: str | Path) -> Iterator[None]:
    """Hold the lock of run directory ``directory`` inside the block (re-entrant in one process; ranks > 0 skip it)."""
    if not is_rank_zero():
        yield
        return
    directory = Path(directory)
    key = str(directory.resolve())
    held = _HELD.get(key)
    if held is not None and held.pid == os.getpid():
        held.count += 1
        try:
            yield
        finally:
            held.count -= 1
        return
    fd = acquire(directory)
    _HELD[key] = held = _Held(fd, os.getpid())
    try:
        yield
    finally:
        held.count -= 1
        if held.count <= 0 and _HELD.get(key) is held:
            del _HELD[key]
            release(directory, fd)


# -- checkpoints ---------------------------------------------------------------------------------------------


def checkpoint_dir(cfg: DictConfig) -> Path:
    """Where the run's ModelCheckpoint writes: its ``dirpath``, else ``<output_dir>/checkpoints``."""
    checkpoint = (cfg.get("callbacks") or {}).get("model_checkpoint") or {}
    return Path(checkpoint.get("dirpath") or layout.checkpoints(cfg.paths.output_dir))


def checkpoints_in(directory: Path) -> list[Path]:
    return sorted(path for path in directory.glob("*.ckpt") if path.is_file() or path.is_symlink())


def _continues_from(ckpt_path, directory: Path) -> bool:
    """Whether ``ckpt_path`` is a checkpoint of ``directory`` (the run continues from one of its own checkpoints)."""
    if not ckpt_path:
        return False
    try:
        return Path(str(ckpt_path)).parent.resolve() == directory.resolve()
    except OSError:
        return False


def check_checkpoints(cfg: DictConfig, stages: bool = False, replace: bool = False) -> None:
    """Refuse to start in a directory that holds checkpoints unless ``resume=auto``, ``ckpt_path`` in it or
    ``overwrite=true`` says what to do with them; with ``replace`` (the fit itself) overwrite=true removes them.

    ``stages``: also the ``<output_dir>/*/checkpoints`` of a staged distillation (checked before any teacher is
    sought, so a refused run has written nothing).
    """
    if not is_rank_zero():
        return
    resume, overwrite, ckpt_path = cfg.get("resume"), bool(cfg.get("overwrite")), cfg.get("ckpt_path")
    if resume == "auto" and overwrite:
        raise ConfigError(
            "resume=auto continues the run directory's checkpoints and overwrite=true replaces them: choose one"
        )
    if resume == "auto":
        return
    main = checkpoint_dir(cfg)
    directories = [main]
    if stages:
        directories += sorted(Path(cfg.paths.output_dir).glob("*/checkpoints"))
    for directory in directories:
        found = checkpoints_in(directory)
        if not found or _continues_from(ckpt_path, directory):
            continue
        if not overwrite:
            listed = ", ".join(path.name for path in found[:3]) + (", ..." if len(found) > 3 else "")
            raise ConfigError(
                f"{directory} already holds checkpoints of an earlier run ({listed}): add resume=auto to continue "
                "that run, or overwrite=true to start again and replace them"
            )
        if replace and directory == main:
            for path in found:
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
                except OSError as error:
                    raise RunDirectoryError(f"overwrite=true: cannot remove {path} ({error.strerror or error})") from None
            info(f"overwrite=true: removed {len(found)} checkpoint{'s' * (len(found) != 1)} of an earlier run from {directory}")


def remove_stale_temporaries(directory: str | Path) -> int:
    """Remove the ``.<name>.<pid>.tmp`` files of checkpoint writes whose process is gone; returns how many."""
    directory = Path(directory)
    removed = 0
    for path in sorted(directory.glob(".*.tmp")):
        found = TEMPORARY.match(path.name)
        if not found or not path.is_file():
            continue
        pid = int(found.group(1))
        if pid == os.getpid() or pid_alive(pid):
            continue  # a write in progress
        try:
            path.unlink()
            removed += 1
        except OSError:
            pass
    if removed:
        info(
            f"removed {removed} temporary file{'s' * (removed != 1)} of interrupted checkpoint writes from {directory}"
        )
    return removed


def prepare(cfg: DictConfig) -> None:
    """At the start of a fit, under the directory's lock: stale temporaries go, then the overwrite rule."""
    if not is_rank_zero():
        return
    remove_stale_temporaries(checkpoint_dir(cfg))
    check_checkpoints(cfg, replace=True)


# -- TensorBoard on a full disk -------------------------------------------------------------------------------

TENSORBOARD_TARGETS = (
    "lightning.pytorch.loggers.TensorBoardLogger", "lightning.pytorch.loggers.tensorboard.TensorBoardLogger",
)


def logger_target(config) -> dict:
    """The ``instantiate`` override that makes a configured TensorBoardLogger a GuardedTensorBoardLogger."""
    if config.get("_target_") in TENSORBOARD_TARGETS:
        return {"_target_": f"{__name__}.GuardedTensorBoardLogger"}
    return {}


class _GuardedRecords:
    """TensorBoard's record writer (bytes to the event file) whose first failed write is reported once and ends
    writing to that file: a half-written record must not be followed by others."""

    def __init__(self, records, on_error):
        self._records, self._on_error, self._failed = records, on_error, False

    def _call(self, method, *args):
        if self._failed:
            return
        try:
            method(*args)
        except OSError as error:
            self._failed = True
            self._on_error(error)

    def write(self, data):
        self._call(self._records.write, data)

    def flush(self):
        self._call(self._records.flush)

    def close(self):
        try:
            self._records.close()
        except OSError:
            pass

    @property
    def closed(self):
        return self._records.closed


def _guard_event_file(writer, on_error) -> BaseException | None:
    """Put a _GuardedRecords between the SummaryWriter's event queue (and its writer thread) and the file; returns
    the error its writer thread died of, if it did before the guard was in place (as the file was created)."""
    file_writer = getattr(writer, "file_writer", None)
    queue = getattr(getattr(file_writer, "event_writer", None), "_async_writer", None)
    records = getattr(queue, "_writer", None)
    worker = getattr(queue, "_worker", None)
    if records is not None and not isinstance(records, _GuardedRecords):
        guarded = _GuardedRecords(records, on_error)
        queue._writer = guarded
        if getattr(worker, "_record_writer", None) is records:
            worker._record_writer = guarded
    return getattr(worker, "exception", None)


_hook_lock = threading.Lock()
_hook_installed = False


def _quiet_event_thread_errors() -> None:
    """An event file's writer thread that dies on an OSError (a full disk as the file is created) prints no
    traceback: the error reaches the logger in the main thread, which says it in one line."""
    global _hook_installed
    with _hook_lock:
        if _hook_installed:
            return
        previous = threading.excepthook

        def hook(args):
            if isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread":
                return
            previous(args)

        threading.excepthook = hook
        _hook_installed = True


class _Nothing:
    """Stands for the SummaryWriter that could not be created: every call does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class GuardedTensorBoardLogger(TensorBoardLogger):
    """Lightning's TensorBoardLogger, except that a failed write (a full disk) is one warning line, once, and the
    run goes on: the events that could not be written are dropped, the checkpoints are unaffected."""

    _fewstep_off = False  # the SummaryWriter could not be created: log nothing
    _fewstep_warned = False

    def _write_failed(self, error: OSError) -> None:
        if not self._fewstep_warned:
            self._fewstep_warned = True
            warn(
                f"could not write TensorBoard logs to {Path(self.log_dir)} ({error.strerror or error}): TensorBoard logging "
                "stops here and training goes on (checkpoints are written as before)"
            )

    @property
    def experiment(self):
        if self._fewstep_off:
            return _Nothing()
        _quiet_event_thread_errors()
        try:
            writer = super().experiment
        except OSError as error:
            self._fewstep_off = True
            self._experiment = None
            self._write_failed(error)
            return _Nothing()
        died = _guard_event_file(writer, self._write_failed)
        if isinstance(died, OSError):
            self._fewstep_off = True
            self._write_failed(died)
            return _Nothing()
        return writer

    def _guarded(self, method, *args, **kwargs):
        if self._fewstep_off:
            return None
        try:
            return method(*args, **kwargs)
        except OSError as error:
            self._write_failed(error)
        except ValueError as error:  # log_metrics wraps what add_scalar raised
            if not isinstance(error.__cause__, OSError):
                raise
            self._write_failed(error.__cause__)
        return None

    def log_metrics(self, *args, **kwargs):
        return self._guarded(super().log_metrics, *args, **kwargs)

    def log_hyperparams(self, *args, **kwargs):
        return self._guarded(super().log_hyperparams, *args, **kwargs)

    def log_graph(self, *args, **kwargs):
        return self._guarded(super().log_graph, *args, **kwargs)

    def save(self):
        return self._guarded(super().save)

    def finalize(self, *args, **kwargs):
        return self._guarded(super().finalize, *args, **kwargs)
