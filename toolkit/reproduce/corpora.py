"""The prompt files of a study: its bundled default corpus (``toolkit/data``) or the user's ``--corpus``."""

from __future__ import annotations

import json
import os
import random
import re
from importlib import resources

from ..errors import UserError
from ..prompts import Prompt, read_prompts
from .report import write_if_changed


def _data(*parts: str) -> str:
    return str(resources.files("toolkit").joinpath("data", *parts))


def speeches() -> list:
    """The bundled long English texts (US presidential inaugural addresses, public domain), label ``source``."""
    folder = _data("speeches")
    return [Prompt(open(os.path.join(folder, name), encoding="utf-8").read().strip(), {"source": name[:-4]})
            for name in sorted(os.listdir(folder)) if name.endswith(".txt")]


#: Bundled UDHR texts: file stem → (language ISO 639-3, script ISO 15924).
UDHR = {"eng": ("eng", "Latn"), "srp_cyrl": ("srp", "Cyrl"), "srp_latn": ("srp", "Latn"),
        "uzn_cyrl": ("uzn", "Cyrl"), "uzn_latn": ("uzn", "Latn"), "azj_cyrl": ("azj", "Cyrl"),
        "azj_latn": ("azj", "Latn"), "bos_cyrl": ("bos", "Cyrl"), "bos_latn": ("bos", "Latn"),
        "tuk_cyrl": ("tuk", "Cyrl"), "tuk_latn": ("tuk", "Latn")}


def chunks(text: str, size: int) -> list:
    """``text`` cut at line ends into pieces of at least ``size`` characters (the last piece may be shorter)."""
    pieces, current = [], []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        current.append(line)
        if sum(len(x) + 1 for x in current) >= size:
            pieces.append("\n".join(current))
            current = []
    if current:
        pieces.append("\n".join(current))
    return pieces


def udhr(stems: list, chunk_chars: int, n_chunks: int | None) -> list:
    """The first ``n_chunks`` pieces of ``chunk_chars`` characters of each bundled UDHR text, labelled
    ``language``, ``script``, ``variety`` (language_script) and ``grammatical`` (true)."""
    prompts = []
    for stem in stems:
        language, script = UDHR[stem]
        text = open(_data("udhr", f"{stem}.txt"), encoding="utf-8").read()
        for piece in chunks(text, chunk_chars)[:n_chunks]:
            prompts.append(Prompt(piece, {"language": language, "script": script, "variety": f"{language}_{script}",
                                          "grammatical": True}))
    return prompts


_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")


def word_shuffled(text: str, seed: int) -> str:
    """``text`` with the words of each sentence in a seeded random order (punctuation stays on its word)."""
    rng = random.Random(seed)
    sentences = []
    for line in text.splitlines():
        for sentence in _SENTENCE_END.split(line.strip()):
            words = sentence.split()
            rng.shuffle(words)
            sentences.append(" ".join(words))
    return " ".join(s for s in sentences if s)


def user_corpus(path: str, labels: tuple, study: str) -> list:
    """The prompts of the user's ``--corpus`` (any file ``repgeo extract --prompts`` reads); refused unless every
    prompt has the ``labels`` the study needs."""
    source = read_prompts(path)
    for index, prompt in enumerate(source.prompts):
        missing = [name for name in labels if name not in prompt.labels]
        if missing:
            raise UserError(f"--corpus {path}: prompt {index} has no label {', '.join(missing)}; the {study} study "
                            f"needs the labels {', '.join(labels)} on every prompt (JSONL fields next to \"text\")")
    if not source.prompts:
        raise UserError(f"--corpus {path} holds no prompts")
    return source.prompts


def write_prompts(path: str, prompts: list) -> bool:
    """Write ``prompts`` as the JSONL file ``repgeo extract --prompts`` reads (unless it already holds them)."""
    lines = [json.dumps(dict(p.labels, text=p.text), ensure_ascii=False) for p in prompts]
    return write_if_changed(path, "\n".join(lines) + "\n")
