"""``repgeo plot`` of a lens store: what every layer reads as at each position of one prompt, and next-token accuracy.

For each decoder, the layer × token grid of logit-lens plots: columns are the prompt's positions (labelled with its
own tokens), rows the layers (layer 0 at the bottom), each cell the top-1 reading's text, coloured by its
probability (output decoder) or cosine (input decoder), and a second output grid coloured by the entropy of the
layer's distribution. Then next-token accuracy against layer. :func:`lens_grid` returns the arrays a grid is drawn
from, :func:`lens_figures` the figures (matplotlib), :func:`plot_lens` writes them as PNG files.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .errors import UserError
from .plot import store_layers

#: Columns drawn when --tokens is not given, and the most one figure takes (~0.4 inch each).
DEFAULT_TOKENS = 40
MAX_TOKENS = 200
#: Characters a cell shows; longer texts end in '…'.
CELL_CHARS = 7
#: Cell size (inches) and font size (points): 7 characters of DejaVu Sans at 5.5 pt fit a 0.42-inch cell.
CELL_WIDTH, CELL_HEIGHT, FONT_SIZE = 0.42, 0.2, 5.5
#: Grids are saved at a higher resolution than line figures, so that their small text stays sharp.
GRID_DPI, LINE_DPI = 150, 110
#: Characters shown as a visible sign instead of blank space.
VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "⏎"}
#: Grid figures: file stem → (decoder, colour, title).
GRIDS = {
    "lens_output": ("output", "probability", "Logit lens: the top-1 next-token reading of each layer, coloured by "
                                             "its probability"),
    "lens_output_entropy": ("output", "entropy", "Logit lens: the top-1 next-token reading of each layer, coloured by "
                                                "the entropy of the layer's distribution"),
    "lens_input": ("input", "cosine", "Input-embedding lens: the input embedding nearest each hidden state, coloured "
                                      "by its cosine"),
}
#: Colour → (colour bar label, colormap, gamma of the scale from 0 to 1, or to log2(vocabulary) for entropy). Top-1
#: cosines above layer 0 are mostly 0.05–0.3 on real models: a square-root scale spreads them over the colours.
COLOURS = {
    "probability": ("top-1 probability", "Blues", 1.0),
    "cosine": ("top-1 cosine with the input embedding (square-root scale)", "Greens", 0.5),
    "entropy": ("entropy of the layer's next-token distribution (bits)", "magma_r", 1.0),
}
_TOKENS = re.compile(r"(\d+)?:(\d+)?")


def cell_text(text: str, width: int = CELL_CHARS) -> str:
    """A token's text as a grid shows it: space, newline, tab, carriage return as ␣ ↵ ⇥ ⏎, other unprintable
    characters as their escapes (\\x1b, \\u200b), the empty text as ∅, cut to ``width`` characters with '…'."""
    if text == "":
        return "∅"
    shown = "".join(VISIBLE.get(c) or (c if c.isprintable() else c.encode("unicode_escape").decode("ascii"))
                    for c in text)
    return shown if len(shown) <= width else shown[: width - 1] + "…"


@dataclass
class LensGrid:
    """What one layer × token figure is drawn from. Rows: layers, row 0 the lowest; columns: positions."""

    decoder: str
    colour: str  # a key of COLOURS
    layers: list  # (layer,) store layer numbers, bottom row first
    positions: range  # (token,) positions in the prompt
    tokens: list  # (token,) the prompt's own token at each position, as cell_text shows it
    top_ids: np.ndarray  # (layer, token) int32 vocabulary id of the top-1 reading (-1: none)
    texts: np.ndarray  # (layer, token) object: cell_text of the top-1 reading ("" where none)
    values: np.ndarray  # (layer, token) float64 colour: probability, cosine, or entropy in bits
    hits: np.ndarray  # (layer, token) bool: the top-1 reading is the token that comes next in the prompt
    vmax: float  # top of the colour scale (its bottom is 0)


def lens_grid(ds, prompt: int, decoder: str, colour: str, positions: range, layers: list) -> LensGrid:
    """The cells of one grid of the lens Dataset ``ds`` (:func:`~toolkit.store.lens_results.open_lens`).

    prompt: index; decoder: "output" or "input"; colour: "probability" or "cosine" (the top-1 score of
    ``decoder``) or "entropy" (output decoder, bits); positions: token positions (columns); layers: store layer
    numbers (rows, bottom first).
    """
    at = {"token": slice(positions.start, positions.stop), "prompt": prompt}
    top_ids = ds.lens_top_ids.sel(decoder=decoder, layer=layers).isel(top=0, **at).values
    if colour == "entropy":
        values = ds.lens_entropy.sel(layer=layers).isel(**at).values
        vmax = float(np.log2(ds.sizes["vocab_id"]))
    else:
        values = ds.lens_top_scores.sel(decoder=decoder, layer=layers).isel(top=0, **at).values
        vmax = 1.0
    vocab = ds.vocab.values
    texts = np.array([[cell_text(vocab[i]) if i >= 0 else "" for i in row] for row in top_ids], dtype=object)
    ids = ds.input_ids.isel(prompt=prompt).values
    following = np.append(ids, -1)[positions.start + 1: positions.stop + 1]  # -1: no next token
    return LensGrid(decoder=decoder, colour=colour, layers=list(layers), positions=positions,
                    tokens=[cell_text(vocab[i]) for i in ids[positions.start: positions.stop]], top_ids=top_ids,
                    texts=texts, values=values.astype(np.float64), hits=(top_ids == following) & (top_ids >= 0),
                    vmax=vmax)


def _ink(rgba) -> str:
    """Black or white text, whichever stands out on a cell of colour ``rgba``."""
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def grid_figure(grid: LensGrid, title: str) -> Figure:
    """The grid as cells of text on a colour map; its size grows with the grid, so every cell keeps its text."""
    n_rows, n_cols = grid.texts.shape
    label, cmap_name, gamma = COLOURS[grid.colour]
    cmap = colormaps[cmap_name]
    # Room beyond the cells: layer numbers and colour bar (width); title, position numbers, token labels (height).
    fig = Figure(figsize=(n_cols * CELL_WIDTH + 1.6, n_rows * CELL_HEIGHT + 1.9), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(grid.values), cmap=cmap, norm=PowerNorm(gamma, vmin=0, vmax=grid.vmax),
                      origin="lower", aspect="auto", interpolation="nearest")
    for (row, col), text in np.ndenumerate(grid.texts):
        value = grid.values[row, col]
        ink = _ink(cmap(image.norm(value))) if np.isfinite(value) else "black"
        # parse_math=False: a token such as "$" or "$x$" is text, never matplotlib mathtext.
        ax.text(col, row, text, ha="center", va="center", fontsize=FONT_SIZE, color=ink, parse_math=False,
                fontweight="bold" if grid.hits[row, col] else "normal")
    ax.set_xticks(range(n_cols), grid.tokens, rotation=90, fontsize=FONT_SIZE + 0.5, parse_math=False)
    ax.set_yticks(range(n_rows), [str(layer) for layer in grid.layers], fontsize=FONT_SIZE + 0.5)
    ax.tick_params(length=0)
    top = ax.secondary_xaxis("top")
    top.set_xticks(range(n_cols), [str(p) for p in grid.positions], fontsize=FONT_SIZE, rotation=90)
    top.tick_params(length=0)
    top.set_xlabel("position", fontsize=7)
    ax.set_xlabel("the prompt's token at each position" + (" (each cell reads the token that comes next)"
                                                          if grid.decoder == "output" else ""), fontsize=7)
    ax.set_ylabel("layer (0 = embeddings)", fontsize=7)
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.01, aspect=max(10, n_rows))
    bar.set_label(label, fontsize=7)
    bar.ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=9, parse_math=False)
    return fig


def accuracy(ds, prompt: int, layers: list) -> tuple:
    """Next-token accuracy of the output decoder: (ks, of the prompt (layer, k), pooled (layer, k), done prompts).

    Each a share of positions whose next token is among the top k; pooled: over every position of every done
    prompt (each prompt's accuracy weighted by its positions that have a next token, n_tokens - 1).
    """
    values = ds.lens_next_accuracy.sel(layer=layers).values  # (prompt, layer, k)
    done = ds.done.values
    weights = np.where(done, np.maximum(ds.n_tokens.values - 1, 0), 0).astype(np.float64)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        pooled = np.nansum(values * weights[:, None, None], axis=0) / weights.sum()
    return list(ds.k.values), values[prompt], pooled, int(done.sum())


def accuracy_figure(ds, prompt: int, layers: list, caption: str) -> Figure:
    """Top-1 and top-k next-token accuracy against layer: the prompt's, and pooled over all done prompts."""
    ks, own, pooled, n_done = accuracy(ds, prompt, layers)
    fig = Figure(figsize=(4.6 * len(ks) + 0.4, 4.0), layout="constrained")
    axes = fig.subplots(1, len(ks), sharey=True, squeeze=False)[0]
    for j, (ax, k) in enumerate(zip(axes, ks)):
        ax.plot(layers, own[:, j], marker="o", markersize=2.5, linewidth=1.4, label=f"prompt {prompt}")
        ax.plot(layers, pooled[:, j], marker="s", markersize=2.5, linewidth=1.4, linestyle="--",
                label=f"all {n_done} done prompts (every position)")
        ax.set_title(f"top-{k}: the next token among the {k} most probable" if k > 1
                     else "top-1: the most probable reading is the next token", fontsize=9)
        ax.set_xlabel("layer (0 = embeddings)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of positions")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Logit lens: next-token accuracy of each layer\n{caption}", fontsize=10, parse_math=False)
    return fig


def parse_tokens(text: str | None, n_tokens: int, prompt: int) -> range:
    """The positions ``--tokens A:B`` selects in a prompt of ``n_tokens`` (A included, B excluded, either end
    optional); None: the first DEFAULT_TOKENS. Raises :class:`UserError` outside 0..n_tokens or over MAX_TOKENS."""
    if text is None:
        return range(min(n_tokens, DEFAULT_TOKENS))
    match = _TOKENS.fullmatch(text.replace(" ", ""))
    if match is None:
        raise UserError(f"--tokens {text!r} is not a range A:B of positions (A included, B excluded); e.g. "
                        f"--tokens 0:{min(n_tokens, DEFAULT_TOKENS)}")
    start = int(match[1] or 0)
    stop = n_tokens if match[2] is None else int(match[2])
    if not start < stop <= n_tokens:
        raise UserError(f"--tokens {text} selects no positions of prompt {prompt}, whose positions are "
                        f"0..{n_tokens - 1}; give A:B with A < B ≤ {n_tokens}")
    if stop - start > MAX_TOKENS:
        raise UserError(f"--tokens {text} spans {stop - start} positions, more than the {MAX_TOKENS} one figure "
                        f"holds legibly; draw it in parts, e.g. --tokens {start}:{start + MAX_TOKENS}")
    return range(start, stop)


def _prompt(ds, prompt: int | None) -> int:
    n = ds.sizes["prompt"]
    if prompt is None:
        raise UserError(f"a lens store needs --prompt P (0..{n - 1}): the prompt whose layer × token grid to draw")
    if not 0 <= prompt < n:
        raise UserError(f"--prompt {prompt} is outside this lens store's prompts 0..{n - 1}")
    if not ds.done.values[prompt]:
        raise UserError(f"prompt {prompt} has no lens readings yet; complete the store with repgeo lens --resume, "
                        f"or choose a done prompt")
    return prompt


def lens_figures(ds, prompt: int | None = None, tokens: str | None = None, layers: str | None = None):
    """Check the options against the lens Dataset ``ds``, then return an iterator of (file stem, Figure).

    Options as ``repgeo plot``: ``prompt`` (required), ``tokens`` ("A:B", :func:`parse_tokens`), ``layers`` (rows:
    :func:`~toolkit.plot.store_layers`). Raises :class:`UserError` on a bad option before anything is drawn;
    figures are drawn one at a time as the iterator is consumed. Stems end in ``_p{prompt}``.
    """
    prompt = _prompt(ds, prompt)
    n_tokens = int(ds.n_tokens.values[prompt])
    positions = parse_tokens(tokens, n_tokens, prompt)
    rows = store_layers(ds, layers)
    return _draw(ds, prompt, positions, rows, n_tokens)


def _draw(ds, prompt: int, positions: range, rows: list, n_tokens: int):
    model = os.path.basename(str(ds.attrs["source"]["model"]).rstrip("/"))
    caption = f"{model}, prompt {prompt} ({n_tokens} tokens)"
    decoders = list(ds.decoder.values)
    for stem, (decoder, colour, title) in GRIDS.items():
        if decoder not in decoders:
            continue
        grid = lens_grid(ds, prompt, decoder, colour, positions, rows)
        where = f"{caption}, positions {positions.start}–{positions.stop - 1}; bold: the reading is the next token"
        yield f"{stem}_p{prompt}", grid_figure(grid, f"{title}\n{where}")
    if "output" in decoders:
        yield f"lens_accuracy_p{prompt}", accuracy_figure(ds, prompt, rows, caption)


def plot_lens(path: str, out_dir: str, prompt: int | None = None, tokens: str | None = None,
              layers: str | None = None) -> list:
    """Write the :func:`lens_figures` of the lens store at ``path`` as PNG files into ``out_dir``; return their
    paths."""
    from .store.lens_results import open_lens

    drawn = lens_figures(open_lens(path), prompt=prompt, tokens=tokens, layers=layers)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, fig in drawn:
        target = os.path.join(out_dir, f"{name}.png")
        # Glyphs the font lacks (e.g. CJK tokens) are drawn as boxes; one warning per glyph would flood the log.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            fig.savefig(target, dpi=LINE_DPI if name.startswith("lens_accuracy") else GRID_DPI)
        written.append(target)
    return written
