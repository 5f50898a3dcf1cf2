"""The ``--layers`` option that every command shares: layer numbers and Python-slice ranges of a model's layers."""

from __future__ import annotations

import re

from ..errors import UserError

# A number, or a range with either end optional; signs are matched so that "-1" is reported as out of range,
# not as garbage (it is not counted from the end, as a Python index would be).
_NUMBER = re.compile(r"-?\d+")
_RANGE = re.compile(r"(-?\d+)?:(-?\d+)?")


def parse_layers(text: str | None, n_layers: int) -> list[int]:
    """The layers that ``text`` selects among layers 0..n_layers-1 (0 = embeddings), sorted, without duplicates.

    ``text`` is comma-separated items, each a layer number or an ``A:B`` range (A included, B excluded, either
    end optional as in a Python slice): ``1:``, ``:5``, ``0,5,10:20``. None or blank selects every layer.
    Raises :class:`UserError` naming the item that is not a layer number or range, lies outside 0..n_layers-1
    (a range's end may be n_layers), or selects no layer.
    """
    if text is None or not text.strip():
        return list(range(n_layers))
    valid = f"layers are 0..{n_layers - 1}"
    chosen = set()
    for item in (piece.strip() for piece in text.split(",")):
        if not item:
            continue
        if _NUMBER.fullmatch(item):
            layer = int(item)
            if not 0 <= layer < n_layers:
                raise UserError(f"--layers item {item!r} is outside the model; {valid}")
            chosen.add(layer)
            continue
        match = _RANGE.fullmatch(item.replace(" ", ""))
        if match is None:
            raise UserError(f"--layers item {item!r} is neither a layer number nor an A:B range; {valid}, "
                            f"e.g. --layers 1: or 0,5,10:{n_layers}")
        start = 0 if match[1] is None else int(match[1])
        stop = n_layers if match[2] is None else int(match[2])
        if not (0 <= start < n_layers and 0 <= stop <= n_layers):
            raise UserError(f"--layers item {item!r} is outside the model; {valid} (a range may end at {n_layers})")
        if start >= stop:
            raise UserError(f"--layers item {item!r} selects no layer (A:B runs from A up to B-1); {valid}")
        chosen.update(range(start, stop))
    if not chosen:
        raise UserError(f"--layers {text!r} selects no layer; {valid}")
    return sorted(chosen)
