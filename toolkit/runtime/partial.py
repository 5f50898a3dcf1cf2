"""The one way a job builds an output: in ``OUT.partial``, a directory it creates and owns, renamed into place.

A job owns only what it created. ``os.mkdir`` is atomic on local disks and on NFS and Lustre (where ``flock`` is
not to be trusted), so of several jobs started at once on one ``--out`` exactly one creates the partial directory;
the others are refused. The owner writes a marker into it naming the job, host, process and start time. A partial
directory of the same job whose owner is gone (same host and the process no longer alive, or the same Slurm job
requeued: Slurm starts the next run only after the previous one ended) is reclaimed, so a killed or requeued run starts again
cleanly. Anything else at that path (a directory the user made, another job's partial, a live run's) is refused
and left untouched.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import shutil
import socket
import uuid

from ..errors import UserError

MARKER = ".repgeo-partial.json"


def _process_start(pid: int):
    """The start time of process ``pid`` in clock ticks since boot (Linux), or None where it cannot be read.

    Recorded with the pid, so that a pid reused by an unrelated process does not look like a live owner.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int, start) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return start is None or _process_start(pid) in (None, start)


def _owner(job: str, final: str) -> dict:
    pid = os.getpid()
    return {"job": job, "out": os.path.abspath(final), "host": socket.gethostname(), "pid": pid,
            "process_start": _process_start(pid), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _read_marker(path: str):
    try:
        with open(os.path.join(path, MARKER), encoding="utf-8") as f:
            marker = json.load(f)
        return marker if isinstance(marker, dict) else None
    except (OSError, ValueError):
        return None


def _describe(marker: dict) -> str:
    return (f"{marker.get('job')} on host {marker.get('host')}, process {marker.get('pid')}, started "
            f"{marker.get('started')}")


def _owner_gone(marker: dict) -> bool:
    slurm = os.environ.get("SLURM_JOB_ID")
    if slurm and marker.get("slurm_job_id") == slurm and marker.get("pid") != os.getpid():
        return True  # Slurm requeues a job only after its previous run has ended
    if marker.get("host") == socket.gethostname() and isinstance(marker.get("pid"), int):
        return not _alive(marker["pid"], marker.get("process_start"))
    return False


def _os_error(e: OSError, where: str, option: str) -> UserError:
    reasons = {errno.ENOTDIR: "a part of the path is a file, not a directory",
               errno.ENOENT: "its parent directory does not exist",
               errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EROFS: "the file system is read-only",
               errno.ENOSPC: "the disk is full (no space or no free inodes)",
               errno.EDQUOT: "the disk quota is exceeded", errno.ENAMETOOLONG: "the name is too long"}
    reason = reasons.get(e.errno, e.strerror or type(e).__name__)
    return UserError(f"cannot create {where}: {reason}; choose another {option} or fix the path")


class Partial:
    """A partial directory this process created and owns, for the output ``final``.

    Use as a context manager: on an error the directory is removed (nothing of this job is left behind); call
    :meth:`finish` to move the complete output into place.
    """

    def __init__(self, final: str, job: str, option: str = "--out"):
        final = os.fspath(final)
        if "://" in final:
            raise UserError(f"{option} {final} is a URL: stores are read through URLs, never written; give a local "
                            f"path")
        if not final.strip() or os.path.basename(os.path.abspath(final)) in ("", ".", ".."):
            raise UserError(f"{option} {final!r} does not name a new directory; give a path such as runs/out.zarr")
        self.final, self.job, self.option = final, job, option
        self.path = final.rstrip("/") + ".partial"
        self._claim()

    def _claim(self):
        for _ in range(3):  # a reclaimed directory can be taken by a concurrent start between our steps
            try:
                os.mkdir(self.path)
            except FileExistsError:
                self._reclaim_or_refuse()
                continue
            except OSError as e:
                raise _os_error(e, self.path, self.option) from None
            try:
                self._write_marker(_owner(self.job, self.final))
            except OSError as e:
                shutil.rmtree(self.path, ignore_errors=True)
                raise _os_error(e, os.path.join(self.path, MARKER), self.option) from None
            return
        raise UserError(f"{self.path} keeps being created by other runs; start one run at a time on this {self.option}")

    def _write_marker(self, marker: dict):
        tmp = os.path.join(self.path, f"{MARKER}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(marker, f)
        os.replace(tmp, os.path.join(self.path, MARKER))

    def _reclaim_or_refuse(self):
        marker = _read_marker(self.path)
        if marker is None:
            raise UserError(f"{self.path} exists and was not made by a repgeo job (no {MARKER} in it); it is left "
                            f"untouched: move it away, or choose another {self.option}")
        if marker.get("job") != self.job or marker.get("out") != os.path.abspath(self.final):
            raise UserError(f"{self.path} belongs to another job ({_describe(marker)}, for {marker.get('out')}); it "
                            f"is left untouched: choose another {self.option}")
        if not _owner_gone(marker):
            raise UserError(f"{self.path} is being written by a running {_describe(marker)}; wait for it to end, "
                            f"or choose another {self.option}")
        # Rename first: of several starts that find the same stale directory, only one can move it away.
        stale = f"{self.path}.stale-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path, stale)
        except FileNotFoundError:
            return
        except OSError as e:
            raise _os_error(e, stale, self.option) from None
        shutil.rmtree(stale, ignore_errors=True)

    def abandon(self):
        shutil.rmtree(self.path, ignore_errors=True)

    def finish(self):
        """Move the complete output into place; refused if something appeared at ``final`` meanwhile."""
        os.remove(os.path.join(self.path, MARKER))
        try:
            os.rename(self.path, self.final)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                raise UserError(f"{self.final} appeared while this run was writing it (another run on the same "
                                f"{self.option}?); this run's output is removed: choose another {self.option}") from None
            raise _os_error(e, self.final, self.option) from None

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is not None:
            self.abandon()
        return False
