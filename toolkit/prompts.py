"""Read prompt sources into texts with per-prompt labels.

Sources: a JSONL file (one object per line: ``"text"`` plus label fields), a ``.txt`` file (one prompt), or a
directory or glob of ``.txt`` files (one prompt per file, label ``source``). Prompt order is input order
(sorted file names for directories and globs).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, field

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


def _read_jsonl(path: str, raw: bytes) -> list:
    prompts = []
    for lineno, line in enumerate(_decode(raw, path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
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
            if not key or "/" in key or key.startswith("."):
                raise UserError(f"{path} line {lineno}: label name {key!r} cannot name an array; use a non-empty "
                                f"name without '/' that does not start with '.'")
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
        raw = open(p, "rb").read()
        digest.update(os.path.basename(p).encode() + b"\0" + hashlib.sha256(raw).digest())
        text = _decode(raw, p)
        if not text.strip():
            raise UserError(f"{p} is empty; remove it or give it text")
        prompts.append(Prompt(text, {"source": os.path.splitext(os.path.basename(p))[0]}))
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
