"""Sparse autoencoders in the SAELens directory layout: load, save, and encode hidden states into features.

A directory holds ``cfg.json`` (JSON, never unpickled) and ``sae_weights.safetensors`` with

- ``W_enc`` (d_in, d_sae), ``b_enc`` (d_sae,), ``W_dec`` (d_sae, d_in), ``b_dec`` (d_in,);
- JumpReLU only: ``threshold`` (d_sae,), or ``log_threshold`` (d_sae,) as SAELens training checkpoints store it.

cfg.json is read as standard JSON (no repeated keys, NaN, Infinity or lone surrogates). cfg fields read, in both
the SAELens <= 5 and the SAELens 6 spelling; each, when present, must have the JSON type given (strings where none
is given; ``activation_fn_kwargs`` an object):

- ``architecture``: ``"standard"`` or ``"relu"`` (ReLU), ``"jumprelu"``, ``"topk"``. Absent in very old
  configs: then ReLU. SAELens <= 5 stored TopK SAEs as ``"standard"`` with ``activation_fn_str`` (older:
  ``activation_fn``) ``"topk"``; that is read as TopK. Any other activation function (e.g. ``"tanh-relu"``)
  and other architectures (``"gated"``, ``"batchtopk"``, ...) are refused.
- ``k`` (SAELens 6) or ``activation_fn_kwargs.k`` (SAELens <= 5): the TopK count, a positive integer at most
  ``d_sae``.
- ``apply_b_dec_to_input`` (boolean): subtract ``b_dec`` before encoding; absent means true, SAELens 6's default.
- ``d_in``, ``d_sae`` (positive integers): checked against the tensor shapes when present.
- ``normalize_activations`` (string or null): only ``"none"`` (or absent/null) is accepted, because the other
  modes rescale the input with a factor that is not in the files (fold it into the weights first).
- ``rescale_acts_by_decoder_norm`` (SAELens 6 TopK, boolean): only false (or absent) is accepted.

Every tensor must be floating point (F32, F16, BF16 or F64) and finite.

Everything else in cfg (``hook_name``, ``model_name``, ...) is kept, unread, in ``SparseAutoencoder.cfg``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..prompts import strict_json

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
#: cfg spellings of the architectures → the name used here.
_ARCHITECTURE_NAMES = {"standard": "relu", "relu": "relu", "jumprelu": "jumprelu", "topk": "topk"}
_FIX_ARCH = "use a ReLU ('standard'), 'jumprelu' or 'topk' SAE"
_STRING = (lambda v: isinstance(v, str), "a string")
_BOOLEAN = (lambda v: isinstance(v, bool), "true or false")
_COUNT = (lambda v: type(v) is int and v >= 1, "a positive integer")  # type(): bool is an int subclass
#: cfg fields read here (path into cfg.json → test, what it must be), parents before children.
_CFG_FIELDS = {
    ("architecture",): _STRING,
    ("activation_fn_str",): _STRING,
    ("activation_fn",): _STRING,
    ("activation_fn_kwargs",): (lambda v: isinstance(v, dict), "an object"),
    ("activation_fn_kwargs", "k"): _COUNT,
    ("k",): _COUNT,
    ("d_in",): _COUNT,
    ("d_sae",): _COUNT,
    ("apply_b_dec_to_input",): _BOOLEAN,
    ("rescale_acts_by_decoder_norm",): _BOOLEAN,
    ("normalize_activations",): (lambda v: v is None or isinstance(v, str), "a string or null"),
}
#: safetensors dtypes read (BF16 through torch).
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


@dataclass(frozen=True)
class SparseAutoencoder:
    """An SAE's encoder and decoder as float32 numpy arrays.

    W_enc: (d_in, d_sae), b_enc: (d_sae,), W_dec: (d_sae, d_in) (rows are the decoder directions),
    b_dec: (d_in,). architecture: "relu", "jumprelu" or "topk"; k: TopK count (topk only);
    threshold: (d_sae,) JumpReLU thresholds (jumprelu only); cfg: the full cfg.json contents.
    """

    W_enc: np.ndarray
    b_enc: np.ndarray
    W_dec: np.ndarray
    b_dec: np.ndarray
    architecture: str
    apply_b_dec_to_input: bool
    k: int | None = None
    threshold: np.ndarray | None = None
    cfg: dict = field(default_factory=dict)

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]


def encode(sae: SparseAutoencoder, X) -> np.ndarray:
    """Feature activations of hidden states X: (token, d_in) float array → (token, d_sae) float32.

    pre = (X − b_dec·[apply_b_dec_to_input]) @ W_enc + b_enc, computed in float32, then
    relu: max(pre, 0); jumprelu: pre where pre > threshold, else 0 (as SAELens: ReLU(pre)·[pre > threshold]);
    topk: max(pre, 0) at the k largest entries of each row, 0 elsewhere (ties broken arbitrarily).
    """
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[1] != sae.d_in:
        raise ValueError(f"X must be (token, {sae.d_in}), got {X.shape}")
    if sae.apply_b_dec_to_input:
        X = X - sae.b_dec
    pre = X @ sae.W_enc + sae.b_enc
    if sae.architecture == "relu":
        return np.maximum(pre, 0, out=pre)
    if sae.architecture == "jumprelu":
        return np.where(pre > np.maximum(sae.threshold, 0), pre, np.float32(0))
    if sae.k >= pre.shape[1]:
        return np.maximum(pre, 0, out=pre)
    top = np.argpartition(pre, pre.shape[1] - sae.k, axis=1)[:, -sae.k:]
    acts = np.zeros_like(pre)
    rows = np.arange(pre.shape[0])[:, None]
    acts[rows, top] = np.maximum(pre[rows, top], 0)
    return acts


def _read_cfg(path: Path) -> dict:
    try:
        cfg = strict_json(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read SAE config {path} ({e}); it must be a JSON object in the SAELens layout")
    if not isinstance(cfg, dict):
        raise UserError(f"SAE config {path} is not a JSON object; write the SAELens cfg.json fields as an object")
    for keys, (valid, wanted) in _CFG_FIELDS.items():
        parent = cfg.get(keys[0], {}) if len(keys) == 2 else cfg
        if keys[-1] in parent and not valid(parent[keys[-1]]):
            raise UserError(f"{path}: {'.'.join(keys)} is {json.dumps(parent[keys[-1]])}, it must be {wanted}; "
                            f"correct it in the file")
    return cfg


def _read_tensors(path: Path) -> dict:
    """Every tensor in a safetensors file as float32 numpy (bfloat16 goes through torch: numpy lacks it)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            dtypes = {n: f.get_slice(n).get_dtype() for n in f.keys()}
            for name, dtype in dtypes.items():
                if dtype not in _FLOAT_DTYPES:
                    raise UserError(f"{path}: tensor {name} is {dtype}, not floating point; re-save the SAE with "
                                    f"{', '.join(_FLOAT_DTYPES)} tensors")
            if "BF16" not in dtypes.values():
                return {n: f.get_tensor(n).astype(np.float32) for n in dtypes}
        with safe_open(str(path), framework="pt") as f:
            return {n: f.get_tensor(n).float().numpy() for n in dtypes}
    except (SafetensorError, OSError, TypeError, ValueError) as e:
        raise UserError(f"cannot read SAE weights {path} ({e}); it must be a safetensors file "
                        f"(re-save the SAE with SAELens or repgeo's save_sae)")


def _architecture(cfg: dict, where: Path) -> str:
    name = cfg.get("architecture", "relu")
    arch = _ARCHITECTURE_NAMES.get(name.lower())
    if arch is None:
        raise UserError(f"{where}: SAE architecture {name!r} is not supported; {_FIX_ARCH}")
    activation = cfg.get("activation_fn_str", cfg.get("activation_fn"))
    if arch == "relu" and activation is not None:
        activation = activation.lower()
        if activation == "topk":
            return "topk"
        if activation != "relu":
            raise UserError(f"{where}: SAE activation function {activation!r} is not supported; {_FIX_ARCH}")
    return arch


def _topk_count(cfg: dict, where: Path, d_sae: int) -> int:
    """The TopK count; `_read_cfg` has checked its type."""
    k = cfg.get("k", cfg.get("activation_fn_kwargs", {}).get("k"))
    if k is None:
        raise UserError(f"{where}: TopK SAE needs a positive integer 'k' in cfg.json (or activation_fn_kwargs.k); "
                        f"add it")
    if k > d_sae:
        raise UserError(f"{where / CFG_FILE}: k={k} exceeds d_sae={d_sae} of the weights; set k to at most {d_sae}")
    return k


def load_sae(directory, d_model: int | None) -> SparseAutoencoder:
    """Load the SAE in ``directory`` (SAELens layout, see the module docstring) and check it fits ``d_model``.

    d_model: the hidden size the SAE will encode (None skips that check). Every problem raises UserError.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"SAE directory {directory} does not exist; pass the directory holding {CFG_FILE} and "
                        f"{WEIGHTS_FILE}")
    for name in (CFG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise UserError(f"SAE directory {directory} has no {name}; an SAE directory holds {CFG_FILE} and "
                            f"{WEIGHTS_FILE} (SAELens layout)")
    cfg = _read_cfg(directory / CFG_FILE)
    arch = _architecture(cfg, directory)
    normalize = cfg.get("normalize_activations")
    if normalize not in (None, "none"):
        raise UserError(f"{directory}: normalize_activations={normalize!r} needs a scaling factor not stored with "
                        f"the SAE; fold it into W_enc/b_dec and set normalize_activations to 'none'")
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise UserError(f"{directory}: rescale_acts_by_decoder_norm is not supported; fold the decoder norms "
                        f"into W_enc/b_enc/W_dec and set it to false")
    tensors = _read_tensors(directory / WEIGHTS_FILE)
    needed = ["W_enc", "b_enc", "W_dec", "b_dec"]
    if arch == "jumprelu" and "threshold" not in tensors and "log_threshold" in tensors:
        tensors["threshold"] = np.exp(tensors["log_threshold"])
    if arch == "jumprelu":
        needed.append("threshold")
    missing = [n for n in needed if n not in tensors]
    if missing:
        raise UserError(f"{directory / WEIGHTS_FILE} lacks tensor(s) {', '.join(missing)} needed by a {arch} SAE; "
                        f"re-save it with all of {', '.join(needed)}")
    W_enc = tensors["W_enc"]
    if W_enc.ndim != 2 or 0 in W_enc.shape:
        raise UserError(f"{directory}: W_enc has shape {W_enc.shape}, expected (d_in, d_sae), both at least 1; "
                        f"re-save the SAE")
    d_in, d_sae = W_enc.shape
    expected = {"b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,), "threshold": (d_sae,)}
    for name in needed[1:]:
        if tensors[name].shape != expected[name]:
            raise UserError(f"{directory}: {name} has shape {tensors[name].shape}, expected {expected[name]} "
                            f"from W_enc {W_enc.shape}; re-save the SAE with consistent tensors")
    for key, size in (("d_in", d_in), ("d_sae", d_sae)):
        if key in cfg and cfg[key] != size:
            raise UserError(f"{directory}: cfg.json says {key}={cfg[key]} but the weights have {size}; "
                            f"correct cfg.json")
    if d_model is not None and d_in != d_model:
        raise UserError(f"SAE {directory} reads d_in={d_in} but the hidden states have d_model={d_model}; "
                        f"use an SAE trained on this model")
    bad = [n for n, t in tensors.items() if not np.isfinite(t).all()]
    if bad:
        raise UserError(f"{directory}: tensor(s) {', '.join(bad)} hold NaN or infinity (as float32); use an intact "
                        f"SAE file")
    return SparseAutoencoder(
        W_enc=W_enc, b_enc=tensors["b_enc"], W_dec=tensors["W_dec"], b_dec=tensors["b_dec"], architecture=arch,
        apply_b_dec_to_input=cfg.get("apply_b_dec_to_input", True),
        k=_topk_count(cfg, directory, d_sae) if arch == "topk" else None,
        threshold=tensors["threshold"] if arch == "jumprelu" else None, cfg=cfg,
    )


def save_sae(directory, W_enc, b_enc, W_dec, b_dec, architecture, k=None, threshold=None, extra_cfg=None, *,
             apply_b_dec_to_input=True) -> Path:
    """Write an SAE in the SAELens 6 layout (float32 tensors, cfg.json fields as above) that `load_sae` reads.

    W_enc: (d_in, d_sae), b_enc: (d_sae,), W_dec: (d_sae, d_in), b_dec: (d_in,) float arrays;
    architecture: "relu" (written "standard"), "standard", "jumprelu" (needs threshold (d_sae,)) or "topk"
    (needs k). extra_cfg: further cfg.json fields (e.g. hook_name); it may not repeat the fields written here.
    Creates ``directory`` if needed and returns it.
    """
    arch = _ARCHITECTURE_NAMES.get(str(architecture).lower())
    if arch is None:
        raise ValueError(f"architecture must be one of standard/relu, jumprelu, topk, got {architecture!r}")
    tensors = {name: np.ascontiguousarray(value, dtype=np.float32)
               for name, value in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec))}
    d_in, d_sae = tensors["W_enc"].shape
    cfg = {"architecture": "standard" if arch == "relu" else arch, "d_in": int(d_in), "d_sae": int(d_sae),
           "dtype": "float32", "apply_b_dec_to_input": bool(apply_b_dec_to_input), "normalize_activations": "none"}
    if arch == "jumprelu":
        if threshold is None:
            raise ValueError("a jumprelu SAE needs threshold (d_sae,)")
        tensors["threshold"] = np.ascontiguousarray(threshold, dtype=np.float32)
    if arch == "topk":
        if k is None:
            raise ValueError("a topk SAE needs k")
        cfg["k"] = int(k)
    clash = sorted(set(extra_cfg or {}) & set(cfg))
    if clash:
        raise ValueError(f"extra_cfg may not set {clash}; pass them as arguments")
    cfg.update(extra_cfg or {})

    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS_FILE))
    (directory / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return directory
