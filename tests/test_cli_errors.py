"""Every option is checked before anything loads or is written, and no exception reaches the user as a traceback.

Before the fix: ``--workers -1`` hung, ``--seed -1``, ``--lr nan`` and a bad scheduler address ended in
tracebacks, and ``--features 0`` or ``--threshold -1`` were accepted.
"""

from __future__ import annotations

import pytest

from toolkit import cli

STORE = "no-such-store.zarr"  # never opened: the options are refused first
COMMANDS = {
    "extract": ["extract", "--model", "no-such-model", "--prompts", "no-such.jsonl", "--out", "x.zarr"],
    "summarize": ["summarize", "--store", STORE, "--out", "r.zarr"],
    "train": ["sae", "train", "--store", STORE, "--layer", "1", "--out", "sae"],
    "cooccurrence": ["sae", "cooccurrence", "--store", STORE, "--sae", "sae", "--layer", "1", "--out", "c.zarr"],
    "plot": ["plot", "r.zarr", "--out", "figs"],
}
BAD = [
    ("extract", "--seed", "-1"), ("extract", "--batch-size", "0"), ("extract", "--max-tokens", "0"),
    ("extract", "--min-tokens", "-5"), ("extract", "--shuffle-levels", "0,-1"),
    ("summarize", "--seed", "-1"), ("summarize", "--workers", "-1"), ("summarize", "--workers", "0"),
    ("summarize", "--group-size", "2"), ("summarize", "--overlap-k", "0"), ("summarize", "--skip-tokens", "-1"),
    ("summarize", "--scheduler", "nonsense"), ("summarize", "--scheduler", "tcp://host:port"),
    ("train", "--lr", "nan"), ("train", "--lr", "inf"), ("train", "--lr", "0"), ("train", "--features", "0"),
    ("train", "--k", "0"), ("train", "--epochs", "0"), ("train", "--seed", "-1"),
    ("cooccurrence", "--threshold", "-1"), ("cooccurrence", "--threshold", "nan"), ("cooccurrence", "--block", "0"),
    ("cooccurrence", "--permutations", "1"), ("cooccurrence", "--galaxy-tokens", "1"),
    ("cooccurrence", "--workers", "-1"), ("cooccurrence", "--clusters", "2,-4"),
    ("plot", "--n2", "1"), ("plot", "--k", "0"),
]


@pytest.mark.parametrize("command, option, value", BAD)
def test_bad_options_are_refused_before_anything_runs(command, option, value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        cli.main(COMMANDS[command] + [option, value])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert len(err.strip().splitlines()) == 1 and option in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # distributed retries for its whole 20 s connect timeout
def test_an_unreachable_scheduler_is_one_line(many_prompts, tmp_path, run_repgeo, the_error_line):
    code, _, err = run_repgeo("summarize", "--store", many_prompts.store_1rank, "--out", tmp_path / "r.zarr",
                              "--scheduler", "tcp://127.0.0.1:9")
    assert code == 2 and "cannot reach a Dask scheduler" in the_error_line(err)
    assert not (tmp_path / "r.zarr").exists()


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    def broken(args):
        raise KeyError("a key nobody checked")

    monkeypatch.setitem(cli.COMMANDS, "info", broken)
    assert cli.main(["info", "somewhere"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unexpected KeyError" in err and "--debug" in err
    assert "(cli.py:" in err  # the innermost frame of the toolkit it passed
    with pytest.raises(KeyError):
        cli.main(["info", "somewhere", "--debug"])
