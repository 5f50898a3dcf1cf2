"""``repgeo sae train``: a TopK sparse autoencoder trained on one layer of an activation store, streaming.

Model (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): for an input x (d_in,),

    pre = (x − b_dec) W_enc + b_enc,   a = ReLU(pre) at the k largest entries of pre, 0 elsewhere,
    x̂ = a W_dec + b_dec,    loss = ‖x − x̂‖² / d_in  +  (1/32) · AuxK loss

W_dec rows (the decoder directions) are kept at unit norm; W_enc starts as W_dec transposed and b_dec at the
data mean. AuxK: features that have not fired for ``dead_after_tokens`` tokens reconstruct the residual x − x̂
with their own top-k_aux (k_aux = d_in / 2), which revives them. Inputs are scaled by one constant so that their
median squared norm is d_in; the scale is folded back into the saved weights, so the saved SAE reads raw hidden
states. Tokens with a special id (e.g. <s>, whose vector is an outlier) are left out of training and evaluation.

Memory: one prompt slab plus a shuffle buffer of ``buffer_tokens`` vectors plus the SAE and Adam's state
(≈ 5 × 2 · d_in · d_sae floats): independent of the store's size.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from .. import __version__
from ..errors import UserError
from ..runtime.partial import Partial
from ..runtime.ranks import select_device
from ..store.activations import source_identity
from ..store.validate import require_consistent
from .files import encode, load_sae, save_sae
from .layer import StoreLayer, sae_hook_name

#: Weight of the AuxK loss (Gao et al. 2024).
AUX_COEFFICIENT = 1 / 32


@dataclass(frozen=True)
class TrainSettings:
    store: str
    layer: int
    out: str
    features: int | None = None  # default: 8 · d_model
    k: int = 32
    epochs: int = 4
    batch_tokens: int = 1024
    lr: float = 3e-3
    buffer_tokens: int = 65536
    dead_after_tokens: int = 100_000
    seed: int = 0
    device: str = "auto"


def _log(msg: str):
    print(msg, file=sys.stderr, flush=True)


class TopKSAE:
    """TopK SAE parameters as torch tensors, with encode/decode and the training loss."""

    def __init__(self, d_in: int, d_sae: int, k: int, mean, generator, device):
        import torch

        W_dec = torch.randn(d_sae, d_in, generator=generator, dtype=torch.float32)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_enc = W_dec.T.contiguous().to(device).requires_grad_()
        self.W_dec = W_dec.to(device).requires_grad_()
        self.b_enc = torch.zeros(d_sae, device=device, requires_grad=True)
        self.b_dec = torch.as_tensor(mean, dtype=torch.float32, device=device).clone().requires_grad_()
        self.k, self.k_aux = k, max(1, min(d_in // 2, d_sae))

    def parameters(self) -> list:
        return [self.W_enc, self.b_enc, self.W_dec, self.b_dec]

    def loss(self, x, dead):
        """Training loss of a batch x (batch, d_in) and the (d_sae,) bool mask of features that fired in it.

        dead: (d_sae,) bool, features to train with the AuxK loss.
        """
        import torch

        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        top = pre.topk(self.k, dim=1)
        acts = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
        x_hat = acts @ self.W_dec + self.b_dec
        residual = x - x_hat
        loss = residual.pow(2).sum(dim=1).mean() / x.shape[1]
        if dead.any():
            k_aux = min(self.k_aux, int(dead.sum()))
            aux_top = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=1)
            aux_acts = torch.zeros_like(pre).scatter(1, aux_top.indices, aux_top.values.relu())
            target = residual.detach()
            aux = (aux_acts @ self.W_dec - target).pow(2).sum(dim=1).mean() / target.pow(2).sum(dim=1).mean()
            loss = loss + AUX_COEFFICIENT * torch.nan_to_num(aux)
        return loss, (acts > 0).any(dim=0)

    def normalize_decoder(self):
        import torch

        with torch.no_grad():
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _token_batches(layer: StoreLayer, prompts, settings: TrainSettings, rng, scale: float):
    """Batches (batch_tokens, d_in) float32 of scaled non-special token vectors, shuffled within a buffer."""
    buffer, size = [], 0

    def drain(keep_tail: bool):
        data = np.concatenate(buffer)
        data = data[rng.permutation(len(data))]
        cut = len(data) - len(data) % settings.batch_tokens if keep_tail else len(data)
        batches = [data[i:i + settings.batch_tokens] for i in range(0, cut, settings.batch_tokens)]
        return batches, data[cut:]

    for p in prompts:
        vectors, special = layer.slab(int(p))
        rows = vectors[~special] * scale
        if len(rows):
            buffer.append(rows)
            size += len(rows)
        if size >= settings.buffer_tokens:
            batches, tail = drain(keep_tail=True)
            yield from batches
            buffer, size = [tail], len(tail)
    if size:
        yield from drain(keep_tail=False)[0]


def _input_scale(layer: StoreLayer, prompts) -> tuple:
    """(scale, mean): the constant making the median squared norm of the (first ≤ 64 prompts') vectors d_in, and
    their mean vector (the initial b_dec, in scaled units)."""
    sample = [v[~s] for v, s in (layer.slab(int(p)) for p in prompts[:64])]
    sample = np.concatenate(sample).astype(np.float64)
    if len(sample) == 0:
        raise UserError(f"layer {layer.layer} of {layer.path} has no token other than special tokens; nothing to "
                        f"train on")
    # the median, not the mean: a prompt's first position often carries a "massive activation" 100x the others
    scale = np.sqrt(layer.d_model / np.median(np.einsum("ij,ij->i", sample, sample)))
    return float(scale), sample.mean(axis=0) * scale


def evaluate_sae(sae, layer: StoreLayer) -> dict:
    """Explained variance and dead features of an SAE on every non-special token of the layer (one pass).

    explained_variance = 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² over the tokens (float64 sums),
    x̂ = encode(x) W_dec + b_dec;
    a feature is dead when its activation is 0 on every token. Returns a dict with those, the token count and
    the mean number of active features per token (L0).
    """
    sse = 0.0
    total = np.zeros(layer.d_model)
    total_sq = 0.0
    n = 0
    fired = np.zeros(sae.d_sae, dtype=bool)
    active = 0
    for p in layer.prompts:
        vectors, special = layer.slab(int(p))
        x = vectors[~special]
        if not len(x):
            continue
        acts = encode(sae, x)
        x_hat = acts @ sae.W_dec + sae.b_dec
        x64 = x.astype(np.float64)
        sse += float(np.sum((x64 - x_hat) ** 2))
        total += x64.sum(axis=0)
        total_sq += float(np.sum(x64 ** 2))
        n += len(x)
        nonzero = acts > 0
        fired |= nonzero.any(axis=0)
        active += int(nonzero.sum())
    sst = total_sq - float(total @ total) / n
    return {"explained_variance": 1.0 - sse / sst, "dead_features": int((~fired).sum()), "tokens": n,
            "mean_l0": active / n}


def train_sae(settings: TrainSettings) -> dict:
    """Train, save to ``settings.out`` (SAELens layout) and evaluate; returns the evaluation dict."""
    if os.path.exists(settings.out):
        raise UserError(f"{settings.out} already exists; choose a new --out (an SAE directory is never overwritten)")
    require_consistent(settings.store, "activations")
    layer = StoreLayer(settings.store, settings.layer)
    d_in = layer.d_model
    d_sae = settings.features or 8 * d_in
    if not 1 <= settings.k <= d_sae:
        raise UserError(f"--k {settings.k} must lie in 1..--features ({d_sae})")
    if min(settings.epochs, settings.batch_tokens, settings.buffer_tokens) < 1 or settings.lr <= 0:
        raise UserError("--epochs, --batch-tokens and the buffer must be at least 1 and --lr positive")
    with Partial(settings.out, "repgeo sae train") as partial:  # claimed first: a second start is refused now
        report, t0 = _train_into(partial.path, settings, layer, d_in, d_sae)
        partial.finish()
    _log(f"sae train: saved {settings.out}: explained variance {report['explained_variance']:.4f}, "
         f"{report['dead_features']} dead features of {d_sae}, mean L0 {report['mean_l0']:.1f}, "
         f"{report['tokens']} tokens evaluated ({time.monotonic() - t0:.0f} s)")
    return report


def _train_into(partial: str, settings: TrainSettings, layer, d_in: int, d_sae: int) -> tuple:
    """Train and evaluate; save the SAE into the directory ``partial``. Returns (evaluation, start time)."""
    import torch

    device = select_device(0, settings.device)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    scale, mean = _input_scale(layer, layer.prompts)
    sae = TopKSAE(d_in, d_sae, settings.k, mean, torch.Generator().manual_seed(settings.seed), device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=settings.lr)
    since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
    _log(f"sae train: layer {settings.layer} of {settings.store}, {len(layer.prompts)} prompts, d_in {d_in}, "
         f"{d_sae} features, k {settings.k}, {settings.epochs} epochs on {device}")
    t0 = last = time.monotonic()
    seen, loss_sum, loss_n = 0, 0.0, 0
    for epoch in range(settings.epochs):
        for batch in _token_batches(layer, rng.permutation(layer.prompts), settings, rng, scale):
            x = torch.from_numpy(batch).to(device)
            loss, fired = sae.loss(x, since_fired >= settings.dead_after_tokens)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sae.normalize_decoder()
            since_fired += len(batch)
            since_fired[fired] = 0
            seen += len(batch)
            loss_sum, loss_n = loss_sum + float(loss.detach()), loss_n + 1
            now = time.monotonic()
            if now - last >= 10:
                last = now
                _log(f"sae train: epoch {epoch + 1}/{settings.epochs}, {seen} tokens, {seen / (now - t0):.0f} "
                     f"tokens/s, loss {loss_sum / loss_n:.4f}")
                loss_sum, loss_n = 0.0, 0

    with torch.no_grad():  # fold the input scale back: the saved SAE reads raw hidden states
        W_enc = sae.W_enc.cpu().numpy() * scale
        W_dec = sae.W_dec.cpu().numpy() / scale
        b_dec = sae.b_dec.cpu().numpy() / scale
        b_enc = sae.b_enc.cpu().numpy()
    provenance = {"source": source_identity(settings.store, layer.group), "layer": settings.layer,
                  "toolkit_version": __version__,
                  "training": dict(asdict(settings), features=d_sae, device=device, input_scale=scale,
                                   tokens_seen=seen, seconds=round(time.monotonic() - t0, 1))}
    save_sae(partial, W_enc, b_enc, W_dec, b_dec, "topk", k=settings.k,
             extra_cfg={"model_name": layer.group.attrs["model"]["id"], "hook_name": sae_hook_name(settings.layer),
                        "repgeo": provenance})
    report = evaluate_sae(load_sae(partial, d_in), layer)
    cfg_path = os.path.join(partial, "cfg.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["repgeo"]["evaluation"] = report
    with open(cfg_path, "w") as f:
        f.write(json.dumps(cfg, indent=2) + "\n")
    return report, t0
