"""``repgeo plot`` of an activation store with contributions (``extract --contributions``): where the representation
of one target token came from, and what each attention head writes.

- The information flow of one prompt into one target position T as a vertical Sankey diagram: a node per
  (layer, token), layer 0 (embeddings) at the bottom, the last layer on top, its width the node's stored importance
  ``flow[prompt, target, layer, token]``; a ribbon from node (l + 1, i) down to node (l, j) whose width is the
  importance that i at layer l + 1 draws from j at layer l (the flow rule of :mod:`toolkit.observables.flow`).
  The head-mixed attention the links need is not stored: it is recomputed by running the store's model on the
  prompt, and checked against the stored importances. Written as a self-contained HTML file (plotly, hover for
  every node and link, the plotly bundle inside: no network needed) and a PNG (matplotlib).
- Block × head maps of each head's mean write norm and mean cosine with the stream it writes into, over the
  prompt's tokens and over every token of every done prompt.

:func:`flow_graph` returns what the Sankey is drawn from (nodes, links), :func:`flow_links` the links of the flow
rule (pure numpy), :func:`sankey_layout` their geometry; :func:`flow_figures` writes every figure.
"""

from __future__ import annotations

import os
import textwrap
import warnings
from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from matplotlib.collections import PolyCollection
from matplotlib.colors import LogNorm, Normalize, to_hex
from matplotlib.figure import Figure

from .errors import UserError
from .plot_lens import cell_text

#: Node width per unit of importance, in token columns: the target on top (importance 1) fills 90 % of its column,
#: so neighbouring columns never touch.
NODE_SCALE = 0.9
#: Node height, in distances between layers; the ribbons fill the rest.
NODE_HEIGHT = 0.3
#: Points sampled along each side of a ribbon.
RIBBON_POINTS = 16
#: Layers are shaded with this colormap from LIGHTEST (layer 0) to DARKEST (last layer): one hue throughout.
NODE_COLOURS, LIGHTEST, DARKEST = "Blues", 0.3, 0.95
#: Links that stay in their column (residual stream, MLP, attention to itself) and links that attention moves from
#: an earlier token. An outline as thin as a hairline keeps a link of weight 0.01 (half a pixel wide) visible.
STAY_COLOUR, MOVE_COLOUR, LINK_ALPHA, LINK_OUTLINE = "#a0a0a0", "#e6550d", 0.5, 0.3
#: PNG size: inches per token column and per layer, and the limit of the width (wider prompts get narrower columns).
COLUMN_INCHES, LAYER_INCHES, MAX_WIDTH_INCHES = 0.42, 0.3, 60.0
#: A column narrower than this (inches) cannot hold a token label: only the tokens that matter get one.
LABEL_INCHES = 0.14
#: Characters of a token label; longer texts end in '…'.
LABEL_CHARS = 10
SANKEY_DPI, HEADS_DPI = 150, 130
#: Importances recomputed in float32 agree with the store's to ~1e-7 (the padded batch of extract against one
#: prompt alone); bfloat16 and float16, and another device's kernels, round far more coarsely.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}


@dataclass
class Links:
    """Links of the flow rule, from node (layer + 1, above) down to node (layer, below). Each (link,) array.

    weight: the importance that token ``above`` at layer + 1 draws from token ``below`` at layer, in units of the
    target's importance (1 at the top). out_offset: the summed weight of the links of the same upper node that come
    before this one (those to lower tokens), in the same units: where the ribbon starts along that node's width.
    in_offset: likewise along the lower node's width (the links from lower upper tokens come first).
    """

    layer: np.ndarray  # int64
    above: np.ndarray  # int64
    below: np.ndarray  # int64
    weight: np.ndarray  # float64
    out_offset: np.ndarray  # float64
    in_offset: np.ndarray  # float64


def flow_links(importance, attention, residual_share, min_weight: float = 0.0) -> Links:
    """The links between the layers' nodes: w_{l+1}(i) · [r_l(i) 1{i = j} + (1 − r_l(i)) A_l(i, j)].

    importance: (layer, token) w, layer 0 … block count; attention: (block, token, token) head-mixed weights A_l
    (query i, key j; rows summing to 1); residual_share: (block, token) r_l, the share a token keeps at block l
    (1 − attn_share). Block l reads layer l and writes layer l + 1. Only links of weight > 0 and ≥ ``min_weight``
    are returned; the offsets count every link, so a ribbon keeps its place when lighter ones are left out. With
    ``importance`` the flow of these attention and shares, the links out of each upper node sum to its importance
    and those into each lower node to its importance (:func:`~toolkit.observables.flow.attention_flow`).
    """
    w = np.asarray(importance, np.float64)
    attention = np.asarray(attention, np.float64)
    r = np.asarray(residual_share, np.float64)
    parts = []
    # One block at a time: the dense (token, token) matrix of a block is kept only until its links are picked.
    for layer in range(r.shape[0]):
        keep = r[layer][:, None] * np.eye(len(r[layer])) + (1 - r[layer])[:, None] * attention[layer]
        weights = w[layer + 1][:, None] * keep  # (above, below)
        out_offset = np.cumsum(weights, axis=1) - weights
        in_offset = np.cumsum(weights, axis=0) - weights
        above, below = np.nonzero((weights > 0) & (weights >= min_weight))
        parts.append((np.full(len(above), layer), above, below, weights[above, below], out_offset[above, below],
                      in_offset[above, below]))
    return Links(*(np.concatenate(column) for column in zip(*parts)))


@dataclass
class FlowGraph:
    """What the Sankey of one prompt and target is drawn from: nodes (layer, token) over positions 0 … target."""

    prompt: int
    target: int  # token position
    n_tokens: int  # of the whole prompt
    tokens: list  # (token,) each position's text, made visible (cell_text), positions 0 … target
    predicted: str  # the model's most probable next token at the target, made visible
    importance: np.ndarray  # (layer, token) float64: the stored flow, layer 0 … block count
    links: Links  # those of weight ≥ min_weight
    min_weight: float
    dropped: float  # the share of all link weight (summed over the blocks) left out by min_weight
    weighting: str  # how the heads' attention was mixed (the store's --flow-weighting)
    model: str  # the store's model id


def _check_options(group, path: str, prompt: int, target: int | None, min_weight: float) -> int:
    """The target position, after refusing (before any model is loaded) a store without contributions, a prompt or
    target it lacks, and a min_weight outside [0, 1)."""
    if "flow" not in group:
        raise UserError(f"{path} holds no contributions (flow, head_norm, …); extract it again with repgeo extract "
                        f"--contributions")
    n_prompts = group["done"].shape[0]
    if not 0 <= prompt < n_prompts:
        raise UserError(f"--prompt {prompt} is outside the prompts of {path} (0..{n_prompts - 1})")
    if not group["done"][prompt]:
        raise UserError(f"prompt {prompt} of {path} is not extracted yet; complete the store with repgeo extract "
                        f"--resume, or choose a done prompt")
    if not 0 <= min_weight < 1:
        raise UserError(f"--min-weight {min_weight} is outside [0, 1): links weigh a share of the target's "
                        f"importance; give e.g. 0.01")
    stored = [int(t) for t in group["flow_target"][prompt] if t >= 0]
    if not stored:
        raise UserError(f"prompt {prompt} of {path} has no flow target (its {int(group['n_tokens'][prompt])} tokens "
                        f"end before every --flow-targets position); choose another prompt")
    if target is None:
        return stored[0]
    if target not in stored:
        raise UserError(f"--target {target} is not a flow target of prompt {prompt}, whose stored targets are "
                        f"{', '.join(map(str, stored))}; choose one of them (extract --flow-targets sets them)")
    return target


def recompute_flow(model, ids, target: int, weighting: str):
    """Run ``model`` (eager attention, hooks of a ContributionRecorder) on the prompt's positions 0 … target.

    ids: (token,) the prompt's token ids. Returns (importance (layer, token) float64 of the target, attention
    (block, token, token) head-mixed, residual_share (block, token) = 1 − attn_share, predicted token id). Later
    positions change none of these (causal attention), so they are not run.
    """
    import torch

    from .extract.contributions import ContributionRecorder, FlowSettings

    device = model.get_input_embeddings().weight.device
    prefix = torch.as_tensor(np.asarray(ids[: target + 1], np.int64), device=device)[None]
    recorder = ContributionRecorder(model, weighting)
    with recorder, torch.inference_mode():
        recorder.start()
        logits = model(input_ids=prefix, use_cache=False, logits_to_keep=1).logits
        recorder.stop()
    n = target + 1
    arrays = recorder.prompt_arrays(0, n, FlowSettings((target,), weighting))
    attention = np.stack([record["attention"][0, :n, :n] for record in recorder.records])
    return (arrays["flow"][0].astype(np.float64), attention.astype(np.float64),
            1 - arrays["attn_share"].astype(np.float64), int(logits[0, -1].argmax()))


def _load(attrs: dict, model: str | None, path: str):
    """The store's model (sha-checked, eager attention, no gradients, in the store's compute dtype, on a GPU when
    one is present) and its tokenizer."""
    import torch

    from .models import load_model, load_tokenizer, model_of_store
    from .runtime.ranks import select_device

    ref = model_of_store(attrs, model, path)
    loaded = load_model(ref, getattr(torch, attrs["settings"]["compute_dtype"])).to(select_device(0))
    loaded.set_attn_implementation("eager")  # the attention weights are read from the attention modules
    loaded.requires_grad_(False)
    return loaded, load_tokenizer(ref)


def _visible(text: str) -> str:
    return cell_text(text, LABEL_CHARS)


def flow_graph(path: str, prompt: int, target: int | None = None, min_weight: float = 0.01,
               model: str | None = None) -> FlowGraph:
    """Nodes and links of the flow of ``prompt`` into ``target`` (a stored flow target; default the prompt's first).

    Loads the store's model (``model``: its files elsewhere, as ``--model``), recomputes the prompt's attention and
    shares, and refuses with :class:`UserError` when the recomputed importances differ from the stored ones (the
    store and the model disagree). Links: :func:`flow_links` with the stored importances.
    """
    from .store.validate import require_consistent

    group = require_consistent(path, "activations")
    target = _check_options(group, path, prompt, target, min_weight)
    k = [int(t) for t in group["flow_target"][prompt]].index(target)
    attrs = dict(group.attrs)
    weighting = attrs["settings"]["flow"]["weighting"]
    ids = group["input_ids"][prompt, : target + 1]
    stored = group["flow"][prompt, k, :, : target + 1].astype(np.float64)

    loaded, tokenizer = _load(attrs, model, path)
    importance, attention, residual_share, predicted = recompute_flow(loaded, ids, target, weighting)
    dtype = attrs["settings"]["compute_dtype"]
    gap = np.abs(importance - stored)
    if not gap.max() <= TOLERANCE[dtype]:  # not ≤: NaN differs too
        layer, token = np.unravel_index(np.nanargmax(gap), gap.shape)
        raise UserError(f"the flow recomputed with the model differs from the one stored in {path} by "
                        f"{gap[layer, token]:.2g} (layer {layer}, position {token}): the store and the model disagree; "
                        f"give the model the store was extracted with (--model PATH), or extract it again")
    links = flow_links(stored, attention, residual_share, min_weight)
    # All links of a block together weigh what its upper layer's nodes weigh (the links out of a node sum to it).
    total = stored[1:].sum()
    return FlowGraph(prompt=prompt, target=target, n_tokens=int(group["n_tokens"][prompt]),
                     tokens=[_visible(tokenizer.decode([int(i)])) for i in ids],
                     predicted=_visible(tokenizer.decode([predicted])), importance=stored, links=links,
                     min_weight=min_weight, dropped=float(1 - links.weight.sum() / total),
                     weighting=weighting, model=attrs["model"]["id"])


@dataclass
class SankeyLayout:
    """Geometry of a vertical Sankey in data units: x in token columns (column t centred on x = t), y in layers
    (layer l centred on y = l)."""

    nodes: np.ndarray  # (layer, token, corner, xy) the four corners of each node's rectangle
    ribbons: np.ndarray  # (link, point, xy) each ribbon's outline: its left side downwards, its right side upwards


def sankey_layout(graph: FlowGraph) -> SankeyLayout:
    """Node rectangles centred on their column, NODE_SCALE columns wide per unit importance; each ribbon leaves the
    bottom of its upper node and enters the top of its lower node at its offsets, with the same width at both ends
    (its weight)."""
    n_layers, n = graph.importance.shape
    width = NODE_SCALE * graph.importance
    left = np.arange(n)[None, :] - width / 2  # (layer, token)
    y = np.arange(n_layers)[:, None] + np.zeros(n)
    half = NODE_HEIGHT / 2
    nodes = np.stack([np.stack([left, y - half], -1), np.stack([left + width, y - half], -1),
                      np.stack([left + width, y + half], -1), np.stack([left, y + half], -1)], axis=2)

    links = graph.links
    top_x = left[links.layer + 1, links.above] + NODE_SCALE * links.out_offset  # (link,) left end at the upper node
    bottom_x = left[links.layer, links.below] + NODE_SCALE * links.in_offset
    ribbon_width = NODE_SCALE * links.weight
    t = np.linspace(0, 1, RIBBON_POINTS)
    # x follows a smoothstep from the upper to the lower end: the ribbon leaves and enters its nodes vertically.
    s = 3 * t**2 - 2 * t**3
    top_y, bottom_y = links.layer + 1 - half, links.layer + half
    ys = top_y[:, None] + (bottom_y - top_y)[:, None] * t  # (link, point)
    left_side = top_x[:, None] + (bottom_x - top_x)[:, None] * s
    right_side = left_side + ribbon_width[:, None]
    ribbons = np.concatenate([np.stack([left_side, ys], -1), np.stack([right_side, ys], -1)[:, ::-1]], axis=1)
    return SankeyLayout(nodes=nodes, ribbons=ribbons)


def layer_colours(n_layers: int) -> list:
    """One RGBA colour per layer: one hue, light at layer 0 and dark at the last layer."""
    cmap = colormaps[NODE_COLOURS]
    return [cmap(LIGHTEST + (DARKEST - LIGHTEST) * layer / max(1, n_layers - 1)) for layer in range(n_layers)]


def _titles(graph: FlowGraph) -> tuple:
    """(title, caption) of the Sankey figures."""
    target_text = graph.tokens[graph.target]
    title = (f"Information flow into position {graph.target} ({target_text}), which predicts {graph.predicted}: "
             f"{os.path.basename(graph.model.rstrip('/'))}, prompt {graph.prompt} ({graph.n_tokens} tokens)")
    caption = (f"node width: importance for the target (heads mixed by {graph.weighting}); links: grey stays at its "
               f"token, orange comes from an earlier token by attention;\nlinks under {graph.min_weight:g} not drawn "
               f"({100 * graph.dropped:.1f} % of the flow)")
    return title, caption


def _labelled(graph: FlowGraph, column_inches: float) -> list:
    """Positions that get a token label: all when a column holds one, else those whose importance reaches
    min_weight at some layer below the top (the rest are too many to read), and the target."""
    n = graph.importance.shape[1]
    if column_inches >= LABEL_INCHES:
        return list(range(n))
    matters = (graph.importance[:-1] >= max(graph.min_weight, 1e-12)).any(axis=0)
    matters[graph.target] = True
    return np.flatnonzero(matters).tolist()


def sankey_png(graph: FlowGraph, layout: SankeyLayout) -> Figure:
    """The Sankey as a matplotlib Figure: token texts under the columns, layer numbers on the left, the predicted
    token above the target's top node."""
    n_layers, n = graph.importance.shape
    width = min(MAX_WIDTH_INCHES, max(6.0, n * COLUMN_INCHES + 1.6))
    column_inches = (width - 1.6) / n
    fig = Figure(figsize=(width, n_layers * LAYER_INCHES + 2.2), layout="constrained")
    ax = fig.subplots()
    for x in range(n):  # faint guides: a column's nodes can be far apart when the importance between is tiny
        ax.axvline(x, color="#e6e6e6", linewidth=0.5, zorder=0)
    moves = graph.links.above != graph.links.below
    for chosen, colour in ((~moves, STAY_COLOUR), (moves, MOVE_COLOUR)):
        ax.add_collection(PolyCollection(layout.ribbons[chosen], facecolors=colour, edgecolors=colour,
                                         linewidths=LINK_OUTLINE, alpha=LINK_ALPHA, zorder=1))
    colours = np.repeat(np.array(layer_colours(n_layers)), n, axis=0)
    ax.add_collection(PolyCollection(layout.nodes.reshape(-1, 4, 2), facecolors=colours, linewidths=0, zorder=2))
    ticks = _labelled(graph, column_inches)
    ax.set_xticks(ticks, [graph.tokens[t] for t in ticks], rotation=90, fontsize=7, parse_math=False)
    top = ax.secondary_xaxis("top")
    top.set_xticks(ticks, [str(t) for t in ticks], fontsize=6, rotation=90)
    top.tick_params(length=0)
    top.spines["top"].set_visible(False)
    ax.set_yticks(range(n_layers), [str(layer) for layer in range(n_layers)], fontsize=6)
    ax.tick_params(length=0)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(-0.6, n_layers + 0.4)
    ax.text(graph.target, n_layers - 1 + NODE_HEIGHT, f"→ {graph.predicted}", ha="center", va="bottom",
            fontsize=8, fontweight="bold", parse_math=False)
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_ylabel("layer (0 = embeddings)", fontsize=8)
    ax.set_xlabel("the prompt's token at each position", fontsize=8)
    # Wrapped to the figure's width (about 13 characters per inch at 9 points): suptitle does not wrap by itself.
    text = "\n".join(textwrap.fill(line, int(width * 13)) for line in "\n".join(_titles(graph)).splitlines())
    fig.suptitle(text, fontsize=9, parse_math=False)
    return fig


def _outlines(polygons: np.ndarray) -> tuple:
    """x and y lists of closed polygons (polygon, point, xy), separated by None: one plotly trace fills them all."""
    closed = np.concatenate([polygons, polygons[:, :1]], axis=1)
    gap = np.full((len(polygons), 1), np.nan)
    xs = np.concatenate([closed[..., 0], gap], axis=1).ravel()
    ys = np.concatenate([closed[..., 1], gap], axis=1).ravel()
    return [None if np.isnan(v) else float(v) for v in xs], [None if np.isnan(v) else float(v) for v in ys]


def sankey_html(graph: FlowGraph, layout: SankeyLayout):
    """The Sankey as a plotly Figure: the same geometry as :func:`sankey_png`, with the importance of every node and
    the weight of every link on hover."""
    import plotly.graph_objects as go

    n_layers, n = graph.importance.shape
    fig = go.Figure()
    links = graph.links
    moves = links.above != links.below
    for chosen, colour in ((~moves, STAY_COLOUR), (moves, MOVE_COLOUR)):
        if chosen.any():
            xs, ys = _outlines(layout.ribbons[chosen])
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", fill="toself", fillcolor=colour, opacity=LINK_ALPHA,
                                     line={"width": 0.5, "color": colour}, hoverinfo="skip", showlegend=False))
    if len(links.weight):
        middle = layout.ribbons[:, RIBBON_POINTS // 2]  # halfway down each ribbon's left side
        text = [f"layer {l + 1} position {i} {graph.tokens[i]} ← layer {l} position {j} {graph.tokens[j]}: "
                f"{w:.4f}" for l, i, j, w in zip(links.layer, links.above, links.below, links.weight)]
        fig.add_trace(go.Scatter(x=middle[:, 0] + NODE_SCALE * links.weight / 2, y=middle[:, 1], mode="markers",
                                 marker={"size": 6, "opacity": 0}, hovertext=text, hoverinfo="text",
                                 showlegend=False))
    for layer, colour in enumerate(layer_colours(n_layers)):
        xs, ys = _outlines(layout.nodes[layer])
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", fill="toself", fillcolor=to_hex(colour),
                                 line={"width": 0}, hoverinfo="skip", showlegend=False))
    layers, tokens = np.meshgrid(np.arange(n_layers), np.arange(n), indexing="ij")
    text = [f"layer {l} position {t} {graph.tokens[t]}: importance {graph.importance[l, t]:.4f}"
            for l, t in zip(layers.ravel(), tokens.ravel())]
    fig.add_trace(go.Scatter(x=tokens.ravel(), y=layers.ravel(), mode="markers", marker={"size": 8, "opacity": 0},
                             hovertext=text, hoverinfo="text", showlegend=False))
    fig.add_annotation(x=graph.target, y=n_layers - 1 + NODE_HEIGHT, text=f"<b>→ {graph.predicted}</b>",
                       showarrow=False, yanchor="bottom")
    title, caption = _titles(graph)
    fig.update_layout(
        title={"text": f"{title}<br><sup>{caption.replace(chr(10), '<br>')}</sup>"}, plot_bgcolor="white",
        hovermode="closest",
        width=max(700, 40 * n + 200), height=28 * n_layers + 260,
        xaxis={"tickvals": list(range(n)), "ticktext": graph.tokens, "tickangle": -90, "range": [-0.6, n - 0.4],
               "title": "the prompt's token at each position", "showgrid": True, "gridcolor": "#eeeeee",
               "zeroline": False},
        yaxis={"tickvals": list(range(n_layers)), "range": [-0.6, n_layers + 0.4], "title": "layer (0 = embeddings)",
               "showgrid": False, "zeroline": False})
    return fig


def head_means(group, prompt: int) -> dict:
    """Mean ``head_norm`` and ``head_cosine`` per (block, head): scope → (norm, cosine, prompts, tokens).

    Scopes: "prompt" (the prompt's tokens) and "all" (every token of every done prompt, each token weighing the
    same). Norms in the residual stream's units; read one prompt at a time (one chunk each).
    """
    n_tokens, done = group["n_tokens"][:], group["done"][:]

    def summed(p):
        n = int(n_tokens[p])
        return group["head_norm"][p][..., :n].sum(-1), group["head_cosine"][p][..., :n].sum(-1), n

    norm, cosine, n = summed(prompt)
    scopes = {"prompt": (norm / n, cosine / n, 1, n)}
    total_norm, total_cosine, total = np.zeros_like(norm, np.float64), np.zeros_like(cosine, np.float64), 0
    for p in np.flatnonzero(done):
        norm, cosine, n = summed(int(p))
        total_norm += norm
        total_cosine += cosine
        total += n
    scopes["all"] = (total_norm / total, total_cosine / total, int(done.sum()), total)
    return scopes


def heads_figure(norm: np.ndarray, cosine: np.ndarray, title: str) -> Figure:
    """Two block × head maps side by side, block 0 at the bottom, each cell with its value: the mean write norm
    (logarithmic colours: late blocks write tens of times more than early ones) and the mean cosine with the stream
    entering the block (diverging colours around 0)."""
    n_blocks, n_heads = norm.shape
    fig = Figure(figsize=(2 * (n_heads * 0.5 + 1.4), n_blocks * 0.2 + 1.6), layout="constrained")
    limit = max(float(np.abs(cosine).max()), 1e-3)
    positive = norm[norm > 0]
    norm_scale = (LogNorm(vmin=positive.min(), vmax=positive.max()) if len(positive) and positive.max() >
                  positive.min() else Normalize(vmin=0, vmax=max(float(norm.max()), 1e-12)))
    panels = ((norm, "mean write norm (log colours)", "viridis", norm_scale, "{:.3g}"),
              (cosine, "mean cosine with the stream entering the block", "RdBu_r", Normalize(-limit, limit),
               "{:+.2f}"))
    for ax, (values, label, cmap_name, scale, fmt) in zip(fig.subplots(1, 2), panels):
        cmap = colormaps[cmap_name]
        image = ax.imshow(values, cmap=cmap, norm=scale, origin="lower", aspect="auto", interpolation="nearest")
        for (block, head), value in np.ndenumerate(values):
            r, g, b, _ = cmap(scale(value))
            ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(head, block, fmt.format(value), ha="center", va="center", fontsize=5, color=ink)
        ax.set_xticks(range(n_heads), [str(h) for h in range(n_heads)], fontsize=7)
        ax.set_yticks(range(n_blocks), [str(b) for b in range(n_blocks)], fontsize=6)
        ax.set_xlabel("head", fontsize=8)
        ax.set_ylabel("block (reads layer b, writes layer b + 1)", fontsize=8)
        ax.set_title(label, fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02, aspect=30).ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=9, parse_math=False)
    return fig


def flow_figures(path: str, out_dir: str, prompt: int, target: int | None = None, min_weight: float = 0.01,
                 model: str | None = None) -> list[str]:
    """Write the figures of the activation store at ``path`` (made with ``extract --contributions``) into
    ``out_dir``; return their paths.

    ``flow_p{P}_t{T}.html`` and ``.png``: the Sankey of :func:`flow_graph` (``target`` a token position, default the
    prompt's first flow target; links under ``min_weight`` left out; ``model`` as ``--model``).
    ``heads_p{P}.png`` and ``heads_all.png``: :func:`heads_figure` over the prompt's tokens and over every done
    prompt. Raises :class:`UserError` before anything is written.
    """
    from .store.activations import open_activation_group

    graph = flow_graph(path, prompt, target, min_weight, model)
    layout = sankey_layout(graph)
    group = open_activation_group(path)
    model_name = os.path.basename(graph.model.rstrip("/"))
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"flow_p{prompt}_t{graph.target}")
    sankey_html(graph, layout).write_html(f"{stem}.html", include_plotlyjs=True, full_html=True)
    written = [f"{stem}.html", f"{stem}.png"]
    figures = [(f"{stem}.png", sankey_png(graph, layout), SANKEY_DPI)]
    for scope, (norm, cosine, n_prompts, n_tokens) in head_means(group, prompt).items():
        over = (f"the {n_tokens} tokens of prompt {prompt}" if scope == "prompt" else
                f"the {n_tokens} tokens of all {n_prompts} done prompts")
        title = f"What each attention head writes into the residual stream, {model_name}: mean over {over}"
        name = os.path.join(out_dir, f"heads_p{prompt}.png" if scope == "prompt" else "heads_all.png")
        figures.append((name, heads_figure(norm, cosine, title), HEADS_DPI))
        written.append(name)
    for name, fig, dpi in figures:
        # Glyphs the font lacks (e.g. CJK tokens) are drawn as boxes; one warning per glyph would flood the log.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            fig.savefig(name, dpi=dpi)
    return written
