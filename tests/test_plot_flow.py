"""``repgeo plot`` of an activation store with contributions: the flow Sankey's links obey the flow rule against the
stored importances, targets and options are checked, the files are written (the HTML works offline), and the head
maps are the means of the stored arrays. Stores from the tiny Llama through ``repgeo extract --contributions``."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import xarray as xr
import zarr

from toolkit.errors import UserError
from toolkit.plot_flow import flow_figures, flow_graph, flow_links, head_means, sankey_layout

#: Stored flow targets; the last prompt (a few tokens) reaches only the first.
TARGETS = (2, 9)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_model, make_tiny_texts, write_jsonl, run_repgeo):
    """(store with contributions, the same prompts without) extracted from the tiny Llama."""
    work = tmp_path_factory.mktemp("plot_flow")
    texts = make_tiny_texts(3, seed=7, min_words=12, max_words=20) + ["the cat"]
    prompts = write_jsonl(work / "p.jsonl", [{"text": t} for t in texts])
    paths = []
    for name, extra in (("flow", ["--contributions", "--flow-targets", ",".join(map(str, TARGETS))]), ("plain", [])):
        out = work / f"{name}.zarr"
        code, _, err = run_repgeo("extract", "--model", tiny_model, "--prompts", prompts, "--out", out, "--dtype",
                                  "float32", "--batch-size", 4, *extra)
        assert code == 0, err
        paths.append(str(out))
    short = int(xr.open_zarr(paths[0]).n_tokens.values[3])
    assert TARGETS[0] < short <= TARGETS[1], "the last prompt must reach only the first target"
    return paths


def test_links_follow_the_flow_rule(stores):
    store = stores[0]
    graph = flow_graph(store, 1, target=TARGETS[1], min_weight=0)
    stored = xr.open_zarr(store).flow.values[1, 1, :, : TARGETS[1] + 1]
    np.testing.assert_array_equal(graph.importance, stored)
    assert graph.importance.shape == (5, TARGETS[1] + 1) and graph.importance[-1, -1] == 1
    links, n_layers = graph.links, graph.importance.shape[0]
    assert (links.below <= links.above).all()  # causal: a token draws only on itself and earlier tokens
    for layer in range(n_layers - 1):
        at = links.layer == layer
        out_of = np.bincount(links.above[at], links.weight[at], minlength=TARGETS[1] + 1)
        into = np.bincount(links.below[at], links.weight[at], minlength=TARGETS[1] + 1)
        np.testing.assert_allclose(out_of, graph.importance[layer + 1], rtol=1e-6)  # A rows: float32 sums
        np.testing.assert_allclose(into, graph.importance[layer], atol=1e-5)
    assert graph.dropped == pytest.approx(0, abs=1e-6)


def test_flow_links_by_hand():
    """Two blocks of three tokens: each link is w_{l+1}(i) [r_l(i) 1{i=j} + (1 − r_l(i)) A_l(i, j)]."""
    A = np.array([[[1, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]], [[1, 0, 0], [0.9, 0.1, 0], [0.1, 0.1, 0.8]]])
    r = np.array([[0.5, 0.5, 0.5], [0.25, 0.5, 0.75]])
    w = np.array([[0.21, 0.2375, 0.5525], [0.025, 0.025, 0.95], [0, 0, 1.0]])
    links = flow_links(w, A, r)
    got = {(int(l), int(i), int(j)): x for l, i, j, x in zip(links.layer, links.above, links.below, links.weight)}
    assert got == pytest.approx({(1, 2, 0): 0.025, (1, 2, 1): 0.025, (1, 2, 2): 0.95,
                                 (0, 0, 0): 0.025, (0, 1, 0): 0.00625, (0, 1, 1): 0.01875,
                                 (0, 2, 0): 0.095, (0, 2, 1): 0.1425, (0, 2, 2): 0.7125})
    # Offsets: along the upper node, links to lower tokens come first; along the lower node, those from lower tokens.
    at = {(int(l), int(i), int(j)): (o, n) for l, i, j, o, n in
          zip(links.layer, links.above, links.below, links.out_offset, links.in_offset)}
    assert at[0, 2, 1] == pytest.approx((0.095, 0.01875)) and at[0, 2, 0] == pytest.approx((0, 0.03125))


def test_min_weight_drops_the_light_links(stores):
    every = flow_graph(stores[0], 0, min_weight=0).links
    graph = flow_graph(stores[0], 0, min_weight=0.05)
    heavy = every.weight >= 0.05
    assert 0 < heavy.sum() < len(every.weight)
    for name in ("layer", "above", "below", "weight", "out_offset", "in_offset"):
        np.testing.assert_array_equal(getattr(graph.links, name), getattr(every, name)[heavy])
    assert graph.dropped == pytest.approx(every.weight[~heavy].sum() / every.weight.sum(), rel=1e-5)


def test_ribbons_start_and_end_inside_their_nodes(stores):
    graph = flow_graph(stores[0], 2, target=TARGETS[1], min_weight=0.001)
    layout = sankey_layout(graph)
    links, half = graph.links, layout.ribbons.shape[1] // 2
    ends = {"top": (layout.ribbons[:, 0, 0], layout.ribbons[:, -1, 0], links.layer + 1, links.above),
            "bottom": (layout.ribbons[:, half - 1, 0], layout.ribbons[:, half, 0], links.layer, links.below)}
    for left, right, layer, token in ends.values():
        node_left, node_right = layout.nodes[layer, token, 0, 0], layout.nodes[layer, token, 1, 0]
        assert (left >= node_left - 1e-9).all() and (right <= node_right + 1e-4).all()
        np.testing.assert_allclose(right - left, 0.9 * links.weight)


def test_only_stored_targets_are_accepted(stores):
    store = stores[0]
    assert flow_graph(store, 0).target == TARGETS[0]  # default: the first stored target
    with pytest.raises(UserError, match=r"--target 5 is not a flow target of prompt 0, whose stored targets are "
                                        r"2, 9; choose one of them"):
        flow_graph(store, 0, target=5)
    with pytest.raises(UserError, match=r"stored targets are 2;"):
        flow_graph(store, 3, target=TARGETS[1])  # past the end of this short prompt
    with pytest.raises(UserError, match=r"--prompt 4 is outside the prompts"):
        flow_graph(store, 4)
    with pytest.raises(UserError, match=r"--min-weight 1.5 is outside \[0, 1\)"):
        flow_graph(store, 0, min_weight=1.5)


def test_a_store_without_contributions_is_refused(stores, tmp_path):
    with pytest.raises(UserError, match=r"holds no contributions .*repgeo extract --contributions"):
        flow_figures(stores[1], str(tmp_path / "figs"), 0)
    assert not (tmp_path / "figs").exists()


def test_a_store_the_model_disagrees_with_is_refused(stores, tmp_path):
    copy = tmp_path / "changed.zarr"
    shutil.copytree(stores[0], copy)
    flow = zarr.open_group(str(copy), mode="r+")["flow"]
    values = flow[0]
    values[0, 1] = values[0, 1][::-1]  # layer 1 of the first target, tokens reversed: still sums to 1
    flow[0] = values
    with pytest.raises(UserError, match=r"the store and the model disagree"):
        flow_graph(str(copy), 0)


def test_figures_are_written_and_the_html_works_offline(stores, tmp_path):
    out = tmp_path / "figs"
    written = flow_figures(stores[0], str(out), 1, target=TARGETS[1])
    names = [p.split("/")[-1] for p in written]
    assert names == ["flow_p1_t9.html", "flow_p1_t9.png", "heads_p1.png", "heads_all.png"]
    for path in written:
        assert (out / path.split("/")[-1]).stat().st_size > 1000
    html = (out / "flow_p1_t9.html").read_text()
    assert not re.search(r"<script[^>]*src=[\"']?(https?:)?//", html)
    assert "Plotly.newPlot" in html and "plotly.js v" in html  # the bundle is inside


def test_head_maps_are_the_means_of_the_stored_arrays(stores):
    ds = xr.open_zarr(stores[0])
    means = head_means(zarr.open_group(stores[0], mode="r"), 1)
    n = ds.n_tokens.values
    norm, cosine, prompts, tokens = means["prompt"]
    np.testing.assert_allclose(norm, ds.head_norm.values[1, :, :, : n[1]].mean(-1), rtol=1e-6)
    np.testing.assert_allclose(cosine, ds.head_cosine.values[1, :, :, : n[1]].mean(-1), rtol=1e-6, atol=1e-7)
    assert (prompts, tokens) == (1, n[1])
    norm, cosine, prompts, tokens = means["all"]
    pooled = np.concatenate([ds.head_norm.values[p, :, :, : n[p]] for p in range(4)], axis=-1)
    np.testing.assert_allclose(norm, pooled.mean(-1), rtol=1e-6)
    assert (prompts, tokens) == (4, n.sum())
