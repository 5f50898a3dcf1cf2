"""The ``--layers`` option that every command shares: layer numbers and Python-slice ranges of a model's layers."""

from __future__ import annotations

import re

from ..errors import UserError

# A number, or a range with either end optional; signs are matched so that "-1" is reported as out of range,
# not as garbage (it is not counted from the end, as a Python index would be).
NUMBER = re.compile(r"-?\d+")
_RANGE = re.compile(r"(-?\d+)?:(-?\d+)?")


def parse_indices(text: str, size: int, option: str, noun: str, scope: str, example: str,
                  number: str = "number") -> list[int]:
    """The indices 0..size-1 that ``text`` selects, sorted, without duplicates: comma-separated numbers and ``A:B``
    ranges (A included, B excluded, either end optional as in a Python slice).

    option, noun, scope, example, number name things in the one-line :class:`UserError` for an item that is not a
    number or range ("--layers", "layer", "the model", "--layers 1:", "number"), lies outside (a range's end may
    be ``size``), or selects nothing.
    """
    valid = f"{noun}s are 0..{size - 1}"
    chosen = set()
    for item in (piece.strip() for piece in text.split(",")):
        if not item:
            continue
        if NUMBER.fullmatch(item):
            if not 0 <= int(item) < size:
                raise UserError(f"{option} item {item!r} is outside {scope}; {valid}")
            chosen.add(int(item))
            continue
        match = _RANGE.fullmatch(item.replace(" ", ""))
        if match is None:
            raise UserError(f"{option} item {item!r} is neither a {noun} {number} nor an A:B range; {valid}, e.g. "
                            f"{example}")
        start = 0 if match[1] is None else int(match[1])
        stop = size if match[2] is None else int(match[2])
        if not (0 <= start < size and 0 <= stop <= size):
            raise UserError(f"{option} item {item!r} is outside {scope}; {valid} (a range may end at {size})")
        if start >= stop:
            raise UserError(f"{option} item {item!r} selects no {noun} (A:B runs from A up to B-1); {valid}")
        chosen.update(range(start, stop))
    if not chosen:
        raise UserError(f"{option} {text!r} selects no {noun}; {valid}")
    return sorted(chosen)


def parse_layers(text: str | None, n_layers: int) -> list[int]:
    """The layers that ``text`` selects among layers 0..n_layers-1 (0 = embeddings), sorted, without duplicates.

    ``text`` is comma-separated items, each a layer number or an ``A:B`` range (A included, B excluded, either
    end optional as in a Python slice): ``1:``, ``:5``, ``0,5,10:20``. None or blank selects every layer.
    Raises :class:`UserError` naming the item that is not a layer number or range, lies outside 0..n_layers-1
    (a range's end may be n_layers), or selects no layer.
    """
    if text is None or not text.strip():
        return list(range(n_layers))
    return parse_indices(text, n_layers, "--layers", "layer", "the model", f"--layers 1: or 0,5,10:{n_layers}")
