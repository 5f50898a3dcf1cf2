"""``repgeo extract --resume``: a run killed with SIGKILL and resumed writes the store of an uninterrupted run;
an existing store is never touched without ``--resume`` or with other settings."""

from __future__ import annotations

import os
import shutil
import signal
import time

import numpy as np
import pytest
import zarr

POLL_S = 0.005
#: Prompts that must be done (of 120) before the kill: early in the run, and inside a batch of 4 (so that the
#: resumed run must recompute a batch of which some prompts are done).
KILL_AFTER = 14


def _descendants(pid: int) -> list:
    """Process ids of every descendant of ``pid`` (from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # the process ended meanwhile
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _is_extract_rank(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"toolkit.cli" in f.read()
    except OSError:
        return False


def _n_done_chunks(store) -> int:
    """Prompts marked done so far: ``done`` has one chunk per prompt, written only when True (not the fill value)."""
    try:
        return len(os.listdir(os.path.join(store, "done", "c")))
    except FileNotFoundError:
        return 0


def _kill_tree(proc) -> None:
    """SIGKILL ``proc`` and every process it started that is still there."""
    for pid in _descendants(proc.pid) + [proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_mid_run(proc, store, victim) -> None:
    """Wait until KILL_AFTER prompts are done, then SIGKILL ``victim(proc)`` and wait for ``proc`` to end."""
    try:
        deadline = time.monotonic() + 240
        while _n_done_chunks(store) < KILL_AFTER:
            assert proc.poll() is None, f"the run ended (code {proc.returncode}) before it could be killed"
            assert time.monotonic() < deadline, "no progress within 240 s"
            time.sleep(POLL_S)
        os.kill(victim(proc), signal.SIGKILL)
        proc.communicate(timeout=120)
    finally:  # never leave a process behind, whatever happened
        if proc.poll() is None or _descendants(proc.pid):
            _kill_tree(proc)
            proc.communicate()
    done = zarr.open_group(str(store), mode="r")["done"][:]
    assert 0 < done.sum() < len(done), f"the kill landed after {done.sum()} of {len(done)} prompts"


def test_kill_and_resume_equals_uninterrupted_run(many_prompts, start_repgeo, run_repgeo, same_store, tmp_path):
    out = tmp_path / "store.zarr"
    proc = start_repgeo(*many_prompts.args(out))
    _kill_mid_run(proc, out, victim=lambda p: p.pid)
    assert proc.returncode == -signal.SIGKILL
    code, _, err = run_repgeo(*many_prompts.args(out), "--resume")
    assert code == 0, err
    same_store(out, many_prompts.store_1rank)
    runs = zarr.open_group(str(out)).attrs["runs"]
    assert [r["resumed"] for r in runs] == [False, True]


def test_resume_recomputes_lost_prompts_exactly(many_prompts, run_repgeo, same_store, tmp_path):
    """Prompts whose data was lost (done false, data overwritten) come back bitwise as in an uninterrupted run."""
    out = tmp_path / "store.zarr"
    shutil.copytree(many_prompts.store_1rank, out)
    group = zarr.open_group(str(out), mode="r+")
    lost = [3, 40, 77, 101, 118]  # spread over the run: each was computed in a batch with other prompts
    for p in lost:
        group["done"][p] = False
        group["hidden"][p] = np.zeros(group["hidden"].shape[1:], group["hidden"].dtype)
        group["token_loss"][p] = np.zeros(group["token_loss"].shape[1:], np.float32)
        group["loss"][p] = 0.0
    code, _, err = run_repgeo(*many_prompts.args(out), "--resume")
    assert code == 0, err
    same_store(out, many_prompts.store_1rank)


@pytest.mark.slow
def test_kill_one_rank_and_resume_under_mpiexec(many_prompts, start_repgeo, run_repgeo, same_store, tmp_path):
    out = tmp_path / "store.zarr"
    proc = start_repgeo(*many_prompts.args(out), mpi=2)

    def one_rank(p):
        ranks = [pid for pid in _descendants(p.pid) if _is_extract_rank(pid)]
        assert len(ranks) == 2, ranks
        return max(ranks)

    _kill_mid_run(proc, out, victim=one_rank)
    assert proc.returncode != 0
    code, _, err = run_repgeo(*many_prompts.args(out), "--resume", mpi=2)
    assert code == 0, err
    same_store(out, many_prompts.store_2ranks)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, tiny_model, run_repgeo, write_jsonl, make_tiny_texts):
    """A complete store of 3 prompts and the arguments that made it."""
    directory = tmp_path_factory.mktemp("resume")
    prompts = write_jsonl(directory / "prompts.jsonl", [{"text": t} for t in make_tiny_texts(3, seed=1)])
    out = directory / "store.zarr"
    args = ["extract", "--model", tiny_model, "--prompts", prompts, "--out", out, "--max-tokens", 32]
    code, _, err = run_repgeo(*args)
    assert code == 0, err
    return out, args


def _replaced(args: list, option: str, value) -> list:
    i = args.index(option)
    return args[:i + 1] + [value] + args[i + 2:]


@pytest.mark.parametrize("case", ["no --resume", "max-tokens", "dtype", "model", "prompt file"])
def test_resume_refuses_a_different_request(case, small_store, tiny_model_other, run_repgeo, write_jsonl,
                                            tree_snapshot, the_error_line, tmp_path):
    out, args = small_store
    if case == "no --resume":
        args, expected = args, "already exists"
    elif case == "max-tokens":
        args, expected = _replaced(args, "--max-tokens", 31) + ["--resume"], "different settings"
    elif case == "dtype":
        args, expected = args + ["--dtype", "float32", "--resume"], "different dtype"
    elif case == "model":
        args, expected = _replaced(args, "--model", tiny_model_other) + ["--resume"], "different model"
    else:
        other = write_jsonl(tmp_path / "other.jsonl", [{"text": "The baker wakes before dawn."}])
        args, expected = _replaced(args, "--prompts", other) + ["--resume"], "different prompt file"
    before = tree_snapshot(out)
    code, _, err = run_repgeo(*args)
    assert code == 2, err
    assert expected in the_error_line(err)
    assert tree_snapshot(out) == before
