"""``repgeo extract`` under ``mpiexec``: the same store for any number of ranks, and progress printed by rank 0 once."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest
import zarr

from toolkit.extract.progress import Progress
from toolkit.runtime.ranks import Ranks

PROGRESS = re.compile(r"^extract: (\d+)/(\d+) prompts")
#: Attributes that describe what a store holds (``ranks``, ``runs`` and ``created`` describe how it was made).
CONTENT_ATTRS = ("model", "tokenizer_fingerprint", "dtype", "settings", "prompts", "toolkit_version", "repgeo")


@pytest.mark.slow
def test_one_rank_and_two_ranks_write_identical_stores(many_prompts, same_store):
    one, two = many_prompts.store_1rank, many_prompts.store_2ranks
    same_store(one, two)
    attrs_one, attrs_two = dict(zarr.open_group(one).attrs), dict(zarr.open_group(two).attrs)
    for name in CONTENT_ATTRS:
        assert attrs_one[name] == attrs_two[name], name
    assert (attrs_one["ranks"], attrs_two["ranks"]) == (1, 2)
    assert zarr.open_group(two)["done"][:].all()


@pytest.mark.slow
def test_progress_lines_come_from_rank_0_once(many_prompts, mpiexec, tmp_path):
    # Premise: mpiexec -errfile-pattern keeps each rank's stderr in its own file (none where a rank is silent).
    say_rank = "import sys; from mpi4py import MPI; print('rank', MPI.COMM_WORLD.rank, file=sys.stderr)"
    code = subprocess.call([mpiexec, "-n", "2", "-errfile-pattern", str(tmp_path / "err.%r"), sys.executable, "-c",
                            say_rank])
    assert code == 0
    assert [(tmp_path / f"err.{r}").read_text() for r in (0, 1)] == ["rank 0\n", "rank 1\n"]

    many_prompts.store_2ranks  # noqa: B018 (runs the extraction)
    rank0, rank1 = many_prompts.stderr_of_rank(0), many_prompts.stderr_of_rank(1)
    assert not [line for line in rank1.splitlines() if line.startswith("extract:")], rank1
    counts = [int(m.group(1)) for m in map(PROGRESS.match, rank0.splitlines()) if m]
    assert counts, rank0
    assert counts == sorted(set(counts)), rank0  # one line per update: no count twice
    assert counts[-1] == many_prompts.N
    assert sum(line.startswith("extract: complete:") for line in rank0.splitlines()) == 1, rank0


def _self_ranks():
    from mpi4py import MPI

    return Ranks(MPI.COMM_SELF, rank=0, size=1, local_rank=0, local_size=1)


def test_progress_prints_each_count_once():
    """With a report on every update, each done count appears once, and finish() does not repeat the last one."""
    stream = io.StringIO()
    progress = Progress(_self_ranks(), total_prompts=5, total_tokens=50, already_done=1, every=0.0, stream=stream)
    progress.add(2, 20)
    progress.add(2, 20)
    progress.finish()
    lines = stream.getvalue().splitlines()
    assert [PROGRESS.match(line).groups() for line in lines] == [("3", "5"), ("5", "5")]
    assert "40 tokens" in lines[-1]


def test_progress_final_line_when_updates_were_quiet():
    """Between reports (every = 1 h) nothing is printed; finish() prints the exact total once."""
    stream = io.StringIO()
    progress = Progress(_self_ranks(), total_prompts=4, total_tokens=40, every=3600.0, stream=stream)
    progress.add(3, 30)
    progress.add(1, 10)
    assert stream.getvalue() == ""
    progress.finish()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("extract: 4/4 prompts (100%), 40 tokens")
