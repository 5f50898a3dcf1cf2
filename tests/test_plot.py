"""``repgeo plot`` on small synthetic results stores (no model run): layer choice, colours, notes, new figures."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr
from matplotlib.colors import to_hex

from toolkit.cli import main
from toolkit.plot import figures, group_styles, plot_results
from toolkit.store.results import create_results_store, open_results
from toolkit.store.zarr_io import consolidate
from toolkit.summarize.params import GROUP_OBSERVABLES, PROMPT_OBSERVABLES, SummarizeParams

N_LAYERS = 6
PARAMS = SummarizeParams(observables=tuple(PROMPT_OBSERVABLES) + tuple(GROUP_OBSERVABLES), overlap_k=8,
                         gride_range_max=16, groupby="lang", reference="g00")  # n2 = 2, 4, 8, 16


class FakeActivations(dict):
    """What create_results_store reads of an activation store: arrays by name, and ``arrays()``."""

    def arrays(self):
        return self.items()


def expected_id(group: int, layer: int, n2_index: int) -> float:
    """Mean GRIDE ID of a group's prompts in the synthetic stores (28 at layer 0, as real embeddings give)."""
    return 28.0 if layer == 0 else 10.0 + group + layer + n2_index


def make_results(path, n_groups: int, groups_done: bool = True, layers=tuple(range(N_LAYERS))) -> str:
    """A results store of 2 prompts per group (label ``lang`` = g00, g01, …) with known values.

    The two prompts of a group lie at ±1 around :func:`expected_id`; their loss is linear in their ID beyond
    layer 0 (Pearson r = 1). Without ``groups_done`` the group observables stay NaN, as summarize leaves them
    while the activation store is incomplete. ``layers``: the model layers it holds (a subset store's: some).
    """
    layers = np.asarray(layers)
    n_prompts = 2 * n_groups
    group = np.arange(n_prompts) % n_groups
    offset = np.where(np.arange(n_prompts) < n_groups, 1.0, -1.0)
    names = [f"g{g:02d}" for g in range(n_groups)]
    source = FakeActivations(hidden=np.broadcast_to(np.float32(0), (n_prompts, len(layers), 4, 2)),
                             layer=layers, loss=(1.0 + 0.1 * (group + offset)).astype(np.float32),
                             prompt=np.arange(n_prompts), n_tokens=np.full(n_prompts, 4),
                             lang=np.array([names[g] for g in group], dtype=object))
    create_results_store(str(path), source=source, params=PARAMS, groups=names,
                         variables=["gride_id", "overlap", "group_gride_id", "group_kl"],
                         attrs={"source": {"model": "/models/tiny-llama/"}, "parameters": PARAMS.recorded(),
                                "source_attributes": {"model": {"n_layers": N_LAYERS - 1}}})
    store = zarr.open_group(str(path), mode="r+")
    n2 = len(PARAMS.n2)
    means = np.array([[[expected_id(g, layer, j) for j in range(n2)] for layer in layers] for g in group])
    store["gride_id"][:] = means + np.where(layers == 0, 0, 1)[None, :, None] * offset[:, None, None]
    overlap = 0.1 + 0.02 * PARAMS.ks[None, None, :] + 0.01 * group[:, None, None] + np.zeros((1, len(layers), 1))
    overlap[:, -1] = np.nan  # no layer after the last one
    store["overlap"][:] = overlap
    if groups_done:
        store["group_gride_id"][:] = 5.0 + np.arange(n_groups)[:, None, None] + layers[None, :, None] + np.zeros(n2)
        store["group_kl"][:] = 0.1 * np.arange(n_groups)[:, None] * layers[None, :]
    store["done"][:] = True
    store.attrs["groups_done"] = groups_done
    consolidate(str(path))
    return str(path)


@pytest.fixture(scope="module")
def two_groups(tmp_path_factory):
    return make_results(tmp_path_factory.mktemp("plot") / "two.zarr", n_groups=2)


@pytest.fixture(scope="module")
def twenty_groups(tmp_path_factory):
    return make_results(tmp_path_factory.mktemp("plot") / "twenty.zarr", n_groups=20)


def draw(path, **options) -> dict:
    return dict(figures(open_results(path), **options))


def line_data(ax) -> dict:
    """Legend label → (x, y) of each line of a panel."""
    return {line.get_label(): (np.asarray(line.get_xdata()), np.asarray(line.get_ydata())) for line in ax.lines}


def test_layers_option_leaves_layer_0_out_of_every_per_layer_figure(two_groups):
    everything, cut = draw(two_groups, n2=4), draw(two_groups, n2=4, layers="1:")
    assert line_data(everything["gride_id"].axes[0])["lang=g01"][0].tolist() == list(range(N_LAYERS))
    by_layer = ["gride_id", "overlap", "group_gride_id", "group_kl"]
    for name in by_layer:
        by_layer_panel, depth_panel = cut[name].axes[:2]
        for x, _ in line_data(by_layer_panel).values():
            assert x.tolist() == [1, 2, 3, 4, 5], name
        for x, _ in line_data(depth_panel).values():
            np.testing.assert_allclose(x, np.arange(1, N_LAYERS) / (N_LAYERS - 1))  # depth in the full model
    # the means over each group's prompts, at n2 = 4 (index 1)
    _, y = line_data(cut["gride_id"].axes[0])["lang=g01"]
    np.testing.assert_allclose(y, [expected_id(1, layer, 1) for layer in range(1, N_LAYERS)])
    panels = [ax.get_title() for ax in cut["gride_id_vs_n2"].axes]
    assert panels[0].startswith("layer 1 ") and len(panels) == 4 and not any("layer 0 " in t for t in panels)
    assert [ax.get_title().split()[1] for ax in cut["overlap_vs_k"].axes] == ["1", "2", "3", "4"]  # 5: NaN


def test_twenty_groups_get_twenty_distinct_colours(twenty_groups):
    drawn = draw(twenty_groups, n2=4)
    for name in ("gride_id", "group_kl", "overlap_vs_k"):
        colours = [to_hex(line.get_color()) for line in drawn[name].axes[0].lines]
        assert len(colours) == 20 and len(set(colours)) == 20, name
    # the same group has the same colour in per-prompt and group figures
    per_prompt = {line.get_label(): to_hex(line.get_color()) for line in drawn["gride_id"].axes[0].lines}
    pooled = {line.get_label(): to_hex(line.get_color()) for line in drawn["group_gride_id"].axes[0].lines}
    assert per_prompt == pooled
    assert len(drawn["gride_id"].legends[0].get_texts()) == 20
    styles = group_styles(45)  # past 20: the colours come back with another line style
    assert len({(s["color"], s["linestyle"]) for s in styles}) == 45


def test_kl_figure_names_the_reference_group(two_groups):
    fig = draw(two_groups, n2=4)["group_kl"]
    assert "reference group lang=g00" in fig.get_suptitle()
    lines = line_data(fig.axes[0])
    assert set(lines) == {"lang=g00 (reference)", "lang=g01"}
    np.testing.assert_array_equal(lines["lang=g00 (reference)"][1], 0.0)
    assert "lang=g00 (reference)" in [t.get_text() for t in fig.legends[0].get_texts()]


def test_group_figures_are_skipped_with_a_note_until_groups_are_done(tmp_path, capsys):
    path = make_results(tmp_path / "partial.zarr", n_groups=2, groups_done=False)
    drawn = draw(path, n2=4)
    assert "group_kl" not in drawn and "group_gride_id" not in drawn and "gride_id" in drawn
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 2
    assert notes[-1].startswith("repgeo plot: note: group_kl.png not drawn: the group observables are not computed")
    assert "rerun repgeo summarize --resume once the activation store is complete" in notes[-1]


def test_new_figures_are_written_with_their_data(two_groups, tmp_path):
    from matplotlib.image import imread

    written = plot_results(two_groups, str(tmp_path / "plots"), n2=4, layers="1:")
    names = {os.path.basename(f) for f in written}
    assert {"gride_id_vs_n2.png", "overlap_vs_k.png", "gride_id_vs_loss.png", "group_kl.png"} <= names
    for target in written:
        image = imread(target)
        assert image.shape[0] > 400 and np.std(image[..., :3]) > 0.05, target  # drawn, not a blank canvas
    drawn = draw(two_groups, n2=4, layers="1:")
    ax = drawn["gride_id_vs_n2"].axes[0]
    x, y = line_data(ax)["lang=g00"]
    assert ax.get_xscale() == "log" and x.tolist() == [2, 4, 8, 16]
    np.testing.assert_allclose(y, [expected_id(0, 1, j) for j in range(4)])
    x, y = line_data(drawn["overlap_vs_k"].axes[0])["lang=g01"]
    np.testing.assert_allclose(y, 0.1 + 0.02 * x + 0.01)
    scatter = drawn["gride_id_vs_loss"].axes[0]
    assert scatter.get_title() == "layer 1: r = 1.00"
    points = np.concatenate([c.get_offsets() for c in scatter.collections])
    np.testing.assert_allclose(points[:, 1], 1.0 + 0.1 * (points[:, 0] - 10 - 1 - 1), rtol=1e-6)  # loss in nats


def test_figures_without_their_variables_are_left_out_silently(two_groups, tmp_path, capsys):
    import shutil

    path = tmp_path / "no-overlap.zarr"
    shutil.copytree(two_groups, path)
    shutil.rmtree(path / "overlap")
    consolidate(str(path))
    drawn = draw(str(path), n2=4)
    assert "overlap" not in drawn and "overlap_vs_k" not in drawn and "gride_id_vs_n2" in drawn
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("layers, problem", [
    ("a", "--layers item 'a' is neither a layer number nor an A:B range; layers are 0..5"),
    ("6", "--layers item '6' is outside the model; layers are 0..5"),
    ("5:2", "--layers item '5:2' selects no layer"),
])
def test_bad_layers_exit_2_through_the_cli(two_groups, tmp_path, capsys, layers, problem):
    out = tmp_path / "plots"
    assert main(["plot", two_groups, "--out", str(out), "--n2", "4", "--layers", layers]) == 2
    err = capsys.readouterr().err
    assert err.startswith("repgeo plot: error: " + problem) and err.count("\n") == 1
    assert not out.exists()  # refused before anything is written


def test_the_cli_draws_a_results_store_by_its_kind(two_groups, tmp_path):
    out = tmp_path / "plots"
    assert main(["plot", two_groups, "--out", str(out), "--n2", "4", "--k", "2", "--layers", "1:"]) == 0
    assert {"gride_id.png", "overlap_vs_k.png", "group_kl.png"} <= {p.name for p in out.iterdir()}


@pytest.mark.parametrize("args, problem", [
    (["--prompt", "0"], "--prompt does not apply to {path}, a results store; a results store takes --groupby, "
                        "--n2, --k, --layers"),
    (["--n2", "4", "--tokens", "0:5"], "--tokens does not apply to {path}, a results store"),
])
def test_lens_options_are_refused_on_a_results_store(two_groups, tmp_path, capsys, args, problem):
    out = tmp_path / "plots"
    assert main(["plot", two_groups, "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("repgeo plot: error: " + problem.format(path=two_groups)) and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("kind, args, problem", [
    ("sae_cooccurrence", [], "{path} is a repgeo sae_cooccurrence store; repgeo plot draws results stores (from "
                             "repgeo summarize), lens stores (from repgeo lens), relations stores"),
    (None, [], "{path} is not a repgeo store; repgeo plot draws results stores"),
    ("markov", ["--layers", "1"], "--layers does not apply to {path}, a markov store; a markov store takes no option "
                                  "but --out"),
    ("activations", ["--min-weight", "0.1"], "{path} is an activations store: give --prompt, which it requires"),
    ("activations", ["--prompt", "0", "--n2", "4"], "--n2 does not apply to {path}, an activations store; an "
                                                    "activations store takes --prompt, --target, --min-weight, --model"),
])
def test_stores_of_other_kinds_are_refused_saying_what_plot_draws(tmp_path, capsys, kind, args, problem):
    path = tmp_path / "store.zarr"
    group = zarr.create_group(str(path), zarr_format=3)
    if kind:
        group.attrs["repgeo"] = {"kind": kind, "schema_version": "1.0"}
    assert main(["plot", str(path), "--out", str(tmp_path / "plots"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("repgeo plot: error: " + problem.format(path=path)) and err.count("\n") == 1
    assert not (tmp_path / "plots").exists()


def test_a_subset_store_draws_its_layer_numbers_at_their_depth(tmp_path, capsys):
    path = make_results(tmp_path / "subset.zarr", n_groups=2, layers=(1, 3, 5))
    by_layer, depth = draw(path, n2=4, layers="2:")["gride_id"].axes[:2]
    x, y = line_data(by_layer)["lang=g00"]
    assert x.tolist() == [3, 5]
    np.testing.assert_allclose(y, [expected_id(0, 3, 1), expected_id(0, 5, 1)])
    np.testing.assert_allclose(line_data(depth)["lang=g00"][0], [3 / 5, 1.0])  # depth in the model: 5 blocks
    assert main(["plot", path, "--out", str(tmp_path / "plots"), "--n2", "4", "--layers", "0,2"]) == 2
    assert capsys.readouterr().err == ("repgeo plot: error: --layers 0,2 selects none of the layers this store holds "
                                       "(1, 3, 5); choose among them\n")
