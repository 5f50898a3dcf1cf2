"""Real file systems that refuse: too small, filling up during a run, read-only, out of inodes (tmpfs mounts).

A refusal is one line, exit code 2, nothing of the job left behind; a disk that fills during extraction keeps
every finished prompt, and ``--resume`` after freeing space gives the store of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time

import pytest

from test_extract_resume import _n_done_chunks


@contextlib.contextmanager
def tmpfs(path, options: str):
    """A tmpfs mounted at ``path`` with ``options`` (e.g. size=4m), unmounted after."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): the real-file-system tests need root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory, name="filler") -> int:
    """Write zeros to a file in ``directory`` until the file system is full; return the bytes written."""
    written = 0
    with open(os.path.join(directory, name), "wb", buffering=0) as f:
        block = b"\0" * 65536
        try:
            while True:
                written += f.write(block)
        except OSError:
            pass
    return written


def test_a_store_larger_than_the_disk_is_refused_before_writing(tmp_path, many_prompts, run_repgeo,
                                                                the_error_line):
    with tmpfs(tmp_path / "fs", "size=256k") as fs:
        code, _, err = run_repgeo(*many_prompts.args(fs / "acts.zarr"))
        assert code == 2 and "free but the store needs" in the_error_line(err)
        assert os.listdir(fs) == []


@pytest.mark.slow
def test_a_disk_that_fills_during_extraction_keeps_what_is_done(tmp_path, many_prompts, start_repgeo, run_repgeo,
                                                                same_store, the_error_line):
    with tmpfs(tmp_path / "fs", "size=24m") as fs:
        out = fs / "acts.zarr"
        proc = start_repgeo(*many_prompts.args(out))
        deadline = time.monotonic() + 120
        while _n_done_chunks(out) < 10:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.01)
        fill(fs)
        code = proc.wait(timeout=120)
        err = proc.stderr.read()
        line = the_error_line(err)
        assert code == 2 and "disk is full" in line and "--resume" in line
        assert 10 <= _n_done_chunks(out) < many_prompts.N
        os.remove(fs / "filler")
        code, _, err = run_repgeo(*many_prompts.args(out), "--resume")
        assert code == 0, err
        same_store(many_prompts.store_1rank, out)


def test_an_output_on_a_read_only_disk_is_refused(tmp_path, many_prompts, run_repgeo, the_error_line):
    with tmpfs(tmp_path / "fs", "size=4m") as fs:
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        code, _, err = run_repgeo("summarize", "--store", many_prompts.store_1rank, "--out", fs / "r.zarr",
                                  "--observables", "norm")
        assert code == 2 and "read-only" in the_error_line(err)
        assert os.listdir(fs) == []


def test_an_output_on_a_disk_without_free_inodes_is_refused(tmp_path, many_prompts, run_repgeo, the_error_line):
    with tmpfs(tmp_path / "fs", "size=4m,nr_inodes=16") as fs:
        made = 0
        with contextlib.suppress(OSError):
            while True:
                (fs / f"f{made}").touch()
                made += 1
        before = sorted(os.listdir(fs))
        code, _, err = run_repgeo("summarize", "--store", many_prompts.store_1rank, "--out", fs / "r.zarr",
                                  "--observables", "norm")
        assert code == 2 and "no free inodes" in the_error_line(err)
        assert sorted(os.listdir(fs)) == before
