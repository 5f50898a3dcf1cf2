"""The package works installed, not only from the checkout: a wheel built from a clean copy of the tree (git
archive), installed without dependencies next to the existing environment, validates and describes a store from
outside the checkout (the JSON Schemas ship inside the package)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """site directory holding the wheel of HEAD, installed with --no-deps (nothing downloaded)."""
    work = tmp_path_factory.mktemp("wheel")
    tree, wheels, site = work / "tree", work / "wheels", work / "site"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", "HEAD"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(tree)], check=True,
                   capture_output=True)
    wheel = next(wheels.glob("repgeo-*.whl"))
    subprocess.run(pip + ["install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True,
                   capture_output=True)
    assert (site / "toolkit" / "schemas" / "activation-store.schema.json").is_file()
    return site


def test_the_installed_package_validates_and_describes_a_store(installed, many_prompts, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(installed))
    code = ("import sys, toolkit; from toolkit.cli import main; print(toolkit.__file__); "
            "sys.exit(main(sys.argv[1:]))")
    store = str(many_prompts.store_1rank)
    for command, says in ((["validate", store], f"{store}: valid"), (["info", store], "activation store")):
        run = subprocess.run([sys.executable, "-c", code, *command], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        where, *output = run.stdout.splitlines()
        assert where.startswith(str(installed)), f"imported {where}, not the installed wheel"
        assert says in "\n".join(output)
