"""Unit checks of input rules that guard later stages: label names and values, groups of a label."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.errors import UserError
from toolkit.runtime.ranks import check_world_size
from toolkit.prompts import read_prompts
from toolkit.store.activations import label_arrays, reserved_names
from toolkit.summarize.tasks import group_values


@pytest.mark.parametrize("line, phrase", [
    ('{"text": "a", "src/lang": "x"}', "cannot name an array"),
    ('{"text": "a", "": "x"}', "cannot name an array"),
    ('{"text": "a", ".hidden": "x"}', "cannot name an array"),
    ('{"text": "a", "n": 1180591620717411303424}', "does not fit in 64 bits"),
])
def test_label_names_and_values_that_cannot_be_stored_are_refused(tmp_path, line, phrase):
    path = tmp_path / "p.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=phrase):
        read_prompts(str(path))


@pytest.mark.parametrize("name", ["k", "n2", "group", "neighbor", "overlap", "loss", "group_n_shared", "lens_entropy",
                                  "vocab", "decoder", "head_norm", "stat"])
def test_labels_named_like_results_variables_are_refused_at_extract(name):
    from toolkit.extract.plan import PlannedPrompt

    assert name in reserved_names()
    with pytest.raises(UserError, match="collides"):
        label_arrays([PlannedPrompt(np.arange(3), "t", {name: 1})])


def test_missing_label_values_form_no_group():
    assert group_values(np.array([1.5, np.nan, 2.0, np.nan, 1.5])) == [1.5, 2.0]
    assert group_values(np.array(["eng", "", "fra", "eng"], dtype=object)) == ["eng", "fra"]


def test_world_size_check_refuses_only_worlds_of_one():
    step = {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4"}
    with pytest.raises(UserError, match="--mpi=pmi2"):
        check_world_size(1, step)
    check_world_size(4, step)  # srun with the right plug-in
    check_world_size(8, {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2"})  # mpiexec proxies, one per node
    check_world_size(1, {"SLURM_STEP_NUM_TASKS": "4"})  # a batch script, not a step
