"""Read prompt sources into texts with per-prompt labels.

Sources: a JSONL file (one object per line: ``"text"`` plus label fields), a ``.txt`` file (one prompt), or a
directory or glob of ``.txt`` files (one prompt per file, label ``source``). Prompt order is input order
(sorted file names for directories and globs).

Files are read strictly, so that nothing fails later, after a model has loaded: JSONL lines are standard JSON
(`strict_json`), label names can name a Zarr array and an xarray variable, and all text is valid UTF-8.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import unicodedata
from dataclasses import dataclass, field

import xarray as xr

from .errors import UserError

#: Label values must be scalars so that they become 1-D coordinates on ``prompt``.
LABEL_TYPES = (str, int, float, bool)


@dataclass
class Prompt:
    text: str
    labels: dict = field(default_factory=dict)


@dataclass
class PromptSource:
    """The prompts of one source, in input order, and the sha256 of the bytes they came from."""

    path: str
    prompts: list
    sha256: str


def _decode(raw: bytes, path: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            f"re-encode it, e.g. iconv -f latin1 -t utf-8"
        ) from None


class _NotStandard(ValueError):
    """What Python's json module reads but standard JSON (or a UTF-8 writer later) does not allow."""


def _utf8(s: str) -> bool:
    """Whether s can be written as UTF-8: \\ud800-style JSON escapes and undecodable file names (which Python
    maps to lone surrogates) cannot."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_value(key: str, value):
    if isinstance(value, str) and not _utf8(value):
        raise _NotStandard(f"field {key!r} holds a lone surrogate (an unpaired \\ud800-\\udfff escape); write "
                           f"the character itself or its full surrogate pair")
    if isinstance(value, float) and not math.isfinite(value):
        raise _NotStandard(f"field {key!r} is {value}, not a finite number (JSON has no NaN or Infinity, and "
                           f"float64 ends near 1.8e308); write a finite number or leave the field out")
    if isinstance(value, list):
        for item in value:  # objects inside were checked by their own hook call
            _check_value(key, item)


def _checked_object(pairs: list) -> dict:
    """json's object_pairs_hook: called for every object, innermost first, so every field can be named."""
    obj = {}
    for key, value in pairs:
        if not _utf8(key):
            raise _NotStandard(f"field name {key!r} holds a lone surrogate; write the character itself")
        if key in obj:
            # Python's json would keep the last value silently.
            raise _NotStandard(f"field {key!r} appears twice in one object; keep one of them")
        _check_value(key, value)
        obj[key] = value
    return obj


def _integer(digits: str) -> int:
    try:
        return int(digits)
    except ValueError:  # beyond sys.get_int_max_str_digits(); json lets int()'s ValueError through unwrapped
        raise _NotStandard(f"a number has {len(digits)} digits, too many to read; write it as a string") from None


def strict_json(text: str, where: str):
    """Parse standard JSON: repeated keys, NaN/Infinity, numbers beyond float64 and lone surrogates, which
    Python's json lets through, raise UserError naming ``where`` and the field. Syntax errors raise
    json.JSONDecodeError, for the caller to word for its file."""
    try:
        return json.loads(text, object_pairs_hook=_checked_object, parse_int=_integer)
    except _NotStandard as e:
        raise UserError(f"{where}: {e}") from None


def _check_label_name(key: str, where: str):
    if (not key or "/" in key or key.startswith((".", "zarr.", "__"))
            or any(unicodedata.category(c) == "Cc" for c in key)):
        # Each label becomes an array, named like the label, in a Zarr v3 store.
        raise UserError(f"{where}: label name {key!r} cannot name an array; use a non-empty name without '/' or "
                        f"control characters that starts with none of '.', 'zarr.', '__'")
    if hasattr(xr.Dataset, key):
        # ds.<name> and ds.<name>(...) would reach the method, not the label, with no error.
        raise UserError(f"{where}: label name {key!r} is also an xarray.Dataset attribute, which would hide it; "
                        f"rename the field, e.g. to {key + '_label'!r}")


def _read_jsonl(path: str, raw: bytes) -> list:
    prompts = []
    # Only "\n" ends a JSON Lines record; str.splitlines() would also cut at U+2028, U+0085, ... inside strings.
    for lineno, line in enumerate(_decode(raw, path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = strict_json(line, f"{path} line {lineno}")
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {lineno} is not valid JSON ({e.msg}); fix or remove that line") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path} line {lineno} is not a JSON object; write one object per line with a \"text\" field")
        if "text" not in obj:
            raise UserError(f"{path} line {lineno} has no \"text\" field; every line needs the prompt under \"text\"")
        text = obj.pop("text")
        if not isinstance(text, str):
            raise UserError(f"{path} line {lineno}: \"text\" must be a string")
        if not text.strip():
            raise UserError(f"{path} line {lineno} has an empty \"text\"; remove the line or give it text")
        for key, value in obj.items():
            _check_label_name(key, f"{path} line {lineno}")
            if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
                raise UserError(f"{path} line {lineno}: label {key!r} = {value} does not fit in 64 bits; "
                                f"write it as a string")
            if not isinstance(value, LABEL_TYPES) or value is None:
                raise UserError(
                    f"{path} line {lineno}: label {key!r} is {type(value).__name__}; labels must be strings, numbers "
                    f"or booleans"
                )
        prompts.append(Prompt(text, obj))
    if not prompts:
        raise UserError(f"{path} holds no prompts; add lines like {{\"text\": \"...\"}}")
    return prompts


def _read_txt_files(paths: list, what: str) -> PromptSource:
    digest = hashlib.sha256()
    prompts = []
    for p in paths:
        name = os.path.basename(p)
        if not _utf8(name):
            raise UserError(f"the name of {p!r} is not UTF-8, so it cannot become its 'source' label; rename the file")
        raw = open(p, "rb").read()
        digest.update(name.encode() + b"\0" + hashlib.sha256(raw).digest())
        text = _decode(raw, p)
        if not text.strip():
            raise UserError(f"{p} is empty; remove it or give it text")
        prompts.append(Prompt(text, {"source": os.path.splitext(name)[0]}))
    return PromptSource(what, prompts, digest.hexdigest())


def read_prompts(path: str) -> PromptSource:
    """Read the prompts named by ``path`` (JSONL file, .txt file, directory or glob of .txt files)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.endswith(".txt") and os.path.isfile(os.path.join(path, f)))
        if not files:
            raise UserError(f"directory {path} holds no .txt files; put one prompt per .txt file there")
        return _read_txt_files(files, path)
    if os.path.isfile(path):
        raw = open(path, "rb").read()
        if path.endswith(".txt"):
            return _read_txt_files([path], path)
        if path.endswith((".jsonl", ".json", ".ndjson")):
            return PromptSource(path, _read_jsonl(path, raw), hashlib.sha256(raw).hexdigest())
        raise UserError(f"{path}: unknown prompt file type; use a .jsonl file, a .txt file, or a directory of .txt files")
    if glob.has_magic(path):
        files = sorted(f for f in glob.glob(path) if os.path.isfile(f))
        if not files:
            raise UserError(f"no files match {path}; check the pattern (quote it so the shell does not expand it)")
        return _read_txt_files(files, path)
    raise UserError(f"prompt file {path} does not exist; give --prompts a .jsonl file, a .txt file or a directory")
