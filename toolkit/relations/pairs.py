"""Read a relations file: JSONL, one ``{"relation", "subject", "object"}`` object per line.

Read strictly, so that nothing fails after the model has loaded: standard JSON (`toolkit.prompts.strict_json`),
exactly the three fields, non-empty words without surrounding spaces or control characters, no repeated pair,
and at least 3 pairs per relation (an averaged delta needs two pairs besides the one it predicts).
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..prompts import strict_json

FIELDS = ("relation", "subject", "object")
#: The bundled file: 12 relations of 24 pairs (toolkit/data/README.md).
BUNDLED = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "relations.jsonl")
MIN_PAIRS = 3


@dataclass(frozen=True)
class RelationPairs:
    """The pairs of a relations file, in file order.

    relations: relation names in first-seen order (the ``relation`` dim); relation: (pair,) index into them;
    subjects, objects: (pair,) words; words: every distinct word, subjects and objects, in first-seen order (the
    ``word`` dim); subject_word, object_word: (pair,) indices into ``words``.
    """

    path: str
    sha256: str
    relations: tuple
    relation: np.ndarray
    subjects: tuple
    objects: tuple
    words: tuple
    subject_word: np.ndarray
    object_word: np.ndarray

    @property
    def n_pairs(self) -> int:
        return len(self.subjects)


def _check_text(value, field: str, where: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: \"{field}\" must be a string (got {type(value).__name__})")
    if not value.strip():
        raise UserError(f"{where}: \"{field}\" is empty; give the word")
    if value != value.strip() or any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in value):
        raise UserError(f"{where}: \"{field}\" {value!r} has surrounding spaces or control characters; write the bare "
                        f"word (repgeo puts the space before it)")
    return value


def read_pairs(path: str | None) -> RelationPairs:
    """Read and check the relations file at ``path`` (None: the bundled one); raise UserError naming the line."""
    path = path or BUNDLED
    if not os.path.isfile(path):
        raise UserError(f"relations file {path} does not exist; give --pairs a JSONL file of {{relation, subject, "
                        f"object}} lines, or leave it out for the bundled file")
    raw = open(path, "rb").read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); re-encode it, "
                        f"e.g. iconv -f latin1 -t utf-8") from None
    rows, seen = [], {}
    for lineno, line in enumerate(text.split("\n"), start=1):  # only "\n" ends a JSON Lines record
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            obj = strict_json(line, where)
        except json.JSONDecodeError as e:
            raise UserError(f"{where} is not valid JSON ({e.msg}); fix or remove that line") from None
        if not isinstance(obj, dict):
            raise UserError(f"{where} is not a JSON object; write one {{\"relation\", \"subject\", \"object\"}} "
                            f"object per line")
        unknown = [k for k in obj if k not in FIELDS]
        if unknown:
            raise UserError(f"{where}: unknown field {unknown[0]!r}; a line has exactly the fields relation, subject, "
                            f"object")
        missing = [k for k in FIELDS if k not in obj]
        if missing:
            raise UserError(f"{where} has no {missing[0]!r} field; a line has exactly the fields relation, subject, "
                            f"object")
        relation, subject, obj_ = (_check_text(obj[k], k, where) for k in FIELDS)
        if subject == obj_:
            raise UserError(f"{where}: subject and object are both {subject!r}; an analogy never returns its subject, "
                            f"so remove the pair")
        key = (relation, subject, obj_)
        if key in seen:
            raise UserError(f"{where} repeats the pair of line {seen[key]}; remove one of them")
        seen[key] = lineno
        rows.append(key)
    if not rows:
        raise UserError(f"{path} holds no pairs; add lines like {{\"relation\": \"capital\", \"subject\": "
                        f"\"France\", \"object\": \"Paris\"}}")
    relations = tuple(dict.fromkeys(r for r, _, _ in rows))
    counts = {r: sum(1 for row in rows if row[0] == r) for r in relations}
    few = [r for r in relations if counts[r] < MIN_PAIRS]
    if few:
        raise UserError(f"{path}: relation {few[0]!r} has {counts[few[0]]} pair(s); analogies need at least "
                        f"{MIN_PAIRS} per relation: add pairs or remove it")
    words = tuple(dict.fromkeys(w for _, s, o in rows for w in (s, o)))
    index = {w: i for i, w in enumerate(words)}
    return RelationPairs(
        path=os.path.abspath(path), sha256=hashlib.sha256(raw).hexdigest(), relations=relations,
        relation=np.array([relations.index(r) for r, _, _ in rows], dtype=np.int64),
        subjects=tuple(s for _, s, _ in rows), objects=tuple(o for _, _, o in rows), words=words,
        subject_word=np.array([index[s] for _, s, _ in rows], dtype=np.int64),
        object_word=np.array([index[o] for _, _, o in rows], dtype=np.int64))
