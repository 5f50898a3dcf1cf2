"""``repgeo plot`` on a lens store: the layer × token grids and the accuracy figure, from a small synthetic store
(known readings, no model run), and the options a lens store refuses."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from toolkit.cli import main
from toolkit.errors import UserError
from toolkit.plot_lens import MAX_TOKENS, accuracy_figure, cell_text, lens_figures, lens_grid, parse_tokens
from toolkit.store.lens_results import create_lens_store, open_lens, write_prompt_lens
from toolkit.store.zarr_io import consolidate

#: Layers the synthetic lens read, of an activation store with layers 0..4 (a 4-block model).
LAYERS = (1, 3, 4)
N_TOKENS = (45, 12, 30)  # prompt 2 is left undone
WIDTH, TOP_K = 50, 3
#: Token texts: blanks, mathtext, control characters and a long token among ordinary words.
SPECIAL = [" ", "\n", "", "$", "$\\q$", " averyverylongtoken", "\t", "\x1b", " the"]
VOCAB = np.array(SPECIAL + [f"w{i}" for i in range(60 - len(SPECIAL))], dtype=object)


class FakeActivations(dict):
    """What create_lens_store reads of an activation store: arrays by name, and ``arrays()``."""

    def arrays(self):
        return self.items()


def readings(prompt: int, n: int, ids: np.ndarray) -> dict:
    """Known readings of one prompt: top-1 ids cycle through the vocabulary (the next token's id at layer 4),
    scores and entropies encode (layer, position), next-token ranks are seeded."""
    L, V = len(LAYERS), len(VOCAB)
    pos, lay = np.arange(n)[None, :], np.arange(L)[:, None]
    top1 = np.stack([(7 * pos + 3 * lay + prompt) % V, (5 * pos + lay + 1) % V])  # (decoder, layer, token)
    top1[0, -1, : n - 1] = ids[1:n]  # the last layer reads the next token: bold cells
    top_ids = np.stack([top1, (top1 + 1) % V, (top1 + 2) % V], axis=-1).astype(np.int32)
    score = (0.2 + 0.6 * pos / n + 0.05 * lay).astype(np.float32)
    top_scores = np.stack([score, score / 2], axis=0)[..., None] * np.array([1.0, 0.5, 0.25], np.float32)
    ranks = np.random.default_rng(prompt).integers(0, 6, (L, n)).astype(np.int32)
    ranks[:, -1] = -1  # no next token at the last position
    acc = np.stack([[(r[r >= 0] < k).mean() for k in (1, TOP_K)] for r in ranks])
    return {"lens_top_ids": top_ids, "lens_top_scores": top_scores.astype(np.float32),
            "lens_entropy": (1.0 + lay + pos / 10).astype(np.float32), "lens_kl_final": np.zeros((L, n), np.float32),
            "lens_next_logprob": np.zeros((L, n), np.float32), "lens_next_rank": ranks, "lens_next_accuracy": acc}


@pytest.fixture(scope="module")
def lens_store(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("plot_lens") / "lens.zarr")
    rng = np.random.default_rng(0)
    n_prompts = len(N_TOKENS)
    input_ids = np.full((n_prompts, WIDTH), -1, np.int32)
    for p, n in enumerate(N_TOKENS):
        input_ids[p, :n] = rng.integers(0, len(VOCAB), n)
    source = FakeActivations(hidden=np.broadcast_to(np.float32(0), (n_prompts, 5, WIDTH, 2)), input_ids=input_ids,
                             prompt=np.arange(n_prompts), n_tokens=np.array(N_TOKENS, np.int32),
                             topic=np.array(["a", "b", "c"], dtype=object))
    attrs = {"source": {"model": "/models/tiny-llama/"}, "source_attributes": {"model": {"n_layers": 4}}}
    create_lens_store(path, source=source, decoders=("output", "input"), layers=LAYERS, top_k=TOP_K, ks=(1, TOP_K),
                      vocab=VOCAB, attrs=attrs)
    group = zarr.open_group(path, mode="r+")
    for p in (0, 1):
        write_prompt_lens(group, p, readings(p, N_TOKENS[p], input_ids[p]))
    consolidate(path)
    return path


def drawn(path, **options) -> dict:
    return dict(lens_figures(open_lens(path), **options))


def cells(fig) -> np.ndarray:
    """The texts drawn in a grid's cells, (layer, token) as drawn (row 0 at the bottom)."""
    ax = fig.axes[0]
    n_rows, n_cols = ax.images[0].get_array().shape
    return np.array([t.get_text() for t in ax.texts], dtype=object).reshape(n_rows, n_cols)


def test_cells_show_the_top1_readings_of_the_chosen_tokens_and_layers(lens_store):
    store = zarr.open_group(lens_store, mode="r")
    figs = drawn(lens_store, prompt=0, tokens="5:25", layers="3:")
    assert set(figs) == {"lens_output_p0", "lens_output_entropy_p0", "lens_input_p0", "lens_accuracy_p0"}
    rows = [1, 2]  # store layers 3 and 4
    ids = store["input_ids"][0]
    for stem, d in (("lens_output_p0", 0), ("lens_output_entropy_p0", 0), ("lens_input_p0", 1)):
        fig = figs[stem]
        top1 = store["lens_top_ids"][d, 0][rows, 5:25, 0]
        assert cells(fig).tolist() == [[cell_text(VOCAB[i]) for i in row] for row in top1], stem
        ax = fig.axes[0]
        assert [t.get_text() for t in ax.get_yticklabels()] == ["3", "4"]  # layer 3 at the bottom
        assert [t.get_text() for t in ax.get_xticklabels()] == [cell_text(VOCAB[i]) for i in ids[5:25]]
        colour = (store["lens_entropy"][0][rows, 5:25] if "entropy" in stem
                  else store["lens_top_scores"][d, 0][rows, 5:25, 0])
        np.testing.assert_allclose(ax.images[0].get_array(), colour)
    # Bold: the reading is the token that comes next (at the synthetic last layer, everywhere).
    bold = np.array([t.get_fontweight() == "bold" for t in figs["lens_output_p0"].axes[0].texts]).reshape(2, 20)
    np.testing.assert_array_equal(bold, store["lens_top_ids"][0, 0][rows, 5:25, 0] == ids[6:26])
    assert bold[1].all()


def test_lens_grid_holds_the_store_arrays_of_its_cells(lens_store):
    ds = open_lens(lens_store)
    grid = lens_grid(ds, 1, "input", "cosine", range(2, 12), [1, 4])
    store = zarr.open_group(lens_store, mode="r")
    np.testing.assert_array_equal(grid.top_ids, store["lens_top_ids"][1, 1][[0, 2], 2:12, 0])
    assert grid.texts[0, 0] == cell_text(VOCAB[grid.top_ids[0, 0]]) and grid.vmax == 1.0
    assert list(grid.positions) == list(range(2, 12)) and grid.layers == [1, 4]
    entropy = lens_grid(ds, 1, "output", "entropy", range(0, 12), [1, 3, 4])
    assert entropy.vmax == pytest.approx(np.log2(len(VOCAB)))  # the scale of a uniform distribution
    assert not entropy.hits[:, -1].any()  # the last position has no next token


def test_token_texts_are_shown_visibly_and_never_as_mathtext(lens_store, tmp_path):
    assert [cell_text(t) for t in SPECIAL] == ["␣", "↵", "∅", "$", "$\\q$", "␣avery…", "⇥", "\\x1b", "␣the"]
    assert cell_text("ab\u200bc", width=20) == "ab\\u200bc"
    # Every special text is a top-1 reading or column label somewhere in prompt 0; "$\q$" as mathtext would fail
    # to draw (unknown symbol), so the written PNGs show it as text.
    fig = drawn(lens_store, prompt=0, tokens="0:45")["lens_output_p0"]
    shown = set(cells(fig).ravel()) | {t.get_text() for t in fig.axes[0].get_xticklabels()}
    assert {cell_text(t) for t in SPECIAL} <= shown
    fig.savefig(tmp_path / "grid.png", dpi=40)


def test_default_is_the_first_40_tokens_and_every_file_is_written(lens_store, tmp_path, capsys):
    out = tmp_path / "plots"
    assert main(["plot", lens_store, "--out", str(out), "--prompt", "0"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["lens_accuracy_p0.png", "lens_input_p0.png", "lens_output_entropy_p0.png", "lens_output_p0.png"]
    assert capsys.readouterr().out.split() == [str(out / n) for n in
                                               ("lens_output_p0.png", "lens_output_entropy_p0.png", "lens_input_p0.png",
                                                "lens_accuracy_p0.png")]
    figs = drawn(lens_store, prompt=0)
    assert cells(figs["lens_output_p0"]).shape == (3, 40)
    narrow = drawn(lens_store, prompt=1)["lens_output_p1"]
    assert cells(narrow).shape == (3, 12)  # a prompt shorter than 40: all its tokens
    assert figs["lens_output_p0"].get_figwidth() > 2.5 * narrow.get_figwidth()  # the figure grows with the grid


def test_accuracy_is_the_prompt_s_and_pooled_over_all_done_prompts(lens_store):
    ds = open_lens(lens_store)
    fig = accuracy_figure(ds, 1, [1, 4], "caption")
    store = zarr.open_group(lens_store, mode="r")
    ranks = [store["lens_next_rank"][p][[0, 2], : N_TOKENS[p]] for p in (0, 1)]  # the done prompts
    for ax, k in zip(fig.axes, (1, TOP_K)):
        own, pooled = ax.lines
        assert list(own.get_xdata()) == [1, 4] and own.get_label() == "prompt 1"
        np.testing.assert_allclose(own.get_ydata(), ((ranks[1] >= 0) & (ranks[1] < k)).sum(1) / (N_TOKENS[1] - 1))
        hits = sum(((r >= 0) & (r < k)).sum(1) for r in ranks)
        np.testing.assert_allclose(pooled.get_ydata(), hits / sum(n - 1 for n in N_TOKENS[:2]))
        assert pooled.get_label() == "all 2 done prompts (every position)"


def test_parse_tokens_bounds():
    assert parse_tokens(None, 500, 0) == range(40) and parse_tokens("7:", 30, 0) == range(7, 30)
    assert parse_tokens(":5", 30, 0) == range(5)
    with pytest.raises(UserError, match=f"spans 300 positions, more than the {MAX_TOKENS}"):
        parse_tokens("0:300", 500, 0)


@pytest.mark.parametrize("args, problem", [
    (["--n2", "4"], "--n2 does not apply to {path}, a lens store; a lens store takes --prompt, --tokens, --layers"),
    (["--prompt", "0", "--k", "2"], "--k does not apply to {path}, a lens store"),
    (["--prompt", "0", "--groupby", "topic"], "--groupby does not apply to {path}, a lens store"),
    ([], "a lens store needs --prompt P (0..2)"),
    (["--prompt", "3"], "--prompt 3 is outside this lens store's prompts 0..2"),
    (["--prompt", "2"], "prompt 2 has no lens readings yet; complete the store with repgeo lens --resume"),
    (["--prompt", "1", "--tokens", "5:13"], "--tokens 5:13 selects no positions of prompt 1, whose positions are "
                                            "0..11"),
    (["--prompt", "1", "--tokens", "12:"], "--tokens 12: selects no positions of prompt 1"),
    (["--prompt", "1", "--tokens", "4:4"], "--tokens 4:4 selects no positions"),
    (["--prompt", "1", "--tokens=-1:3"], "--tokens '-1:3' is not a range A:B of positions"),
    (["--prompt", "1", "--layers", "0,2"], "--layers 0,2 selects none of the layers this store holds (1, 3, 4)"),
    (["--prompt", "1", "--layers", "5"], "--layers item '5' is outside the model; layers are 0..4"),
])
def test_bad_options_exit_2_through_the_cli(lens_store, tmp_path, capsys, args, problem):
    out = tmp_path / "plots"
    assert main(["plot", lens_store, "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("repgeo plot: error: " + problem.format(path=lens_store)) and err.count("\n") == 1
    assert not out.exists()  # refused before anything is written


def test_layers_choose_rows_among_those_the_store_read(lens_store):
    grid = drawn(lens_store, prompt=0, layers="0:4", tokens="0:3")["lens_input_p0"]
    assert [t.get_text() for t in grid.axes[0].get_yticklabels()] == ["1", "3"]
