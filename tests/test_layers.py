"""The shared ``--layers`` grammar: numbers and Python-slice ranges, checked against the model's layers."""

from __future__ import annotations

import pytest

from toolkit.errors import UserError
from toolkit.runtime.layers import parse_layers


@pytest.mark.parametrize("text, expected", [
    (None, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]),
    ("", list(range(12))),
    ("  ", list(range(12))),
    ("1:", list(range(1, 12))),
    (":5", [0, 1, 2, 3, 4]),
    (":", list(range(12))),
    ("3", [3]),
    ("0,5,10:12", [0, 5, 10, 11]),
    ("10:12, 0 ,5", [0, 5, 10, 11]),  # sorted, spaces allowed
    ("2:5,3,4:6", [2, 3, 4, 5]),  # overlaps counted once
    ("1 : 3", [1, 2]),
    ("11", [11]),
    ("0:12", list(range(12))),  # a range may end at n_layers (excluded)
    ("4,", [4]),
])
def test_selects_the_layers(text, expected):
    assert parse_layers(text, 12) == expected


@pytest.mark.parametrize("text, piece, problem", [
    ("12", "'12'", "outside the model"),
    ("-1", "'-1'", "outside the model"),
    ("0,-2:", "'-2:'", "outside the model"),
    ("3:13", "'3:13'", "outside the model"),
    ("12:", "'12:'", "outside the model"),
    ("a", "'a'", "neither a layer number nor an A:B range"),
    ("1,x:3", "'x:3'", "neither a layer number nor an A:B range"),
    ("1:2:3", "'1:2:3'", "neither a layer number nor an A:B range"),
    ("1.5", "'1.5'", "neither a layer number nor an A:B range"),
    ("1 2", "'1 2'", "neither a layer number nor an A:B range"),
    ("1_0", "'1_0'", "neither a layer number nor an A:B range"),  # int() would read 10
    ("5:2", "'5:2'", "selects no layer"),
    ("4:4", "'4:4'", "selects no layer"),
    (",", "','", "selects no layer"),
])
def test_refuses_what_selects_no_valid_layer(text, piece, problem):
    with pytest.raises(UserError) as e:
        parse_layers(text, 12)
    message = str(e.value)
    assert "\n" not in message
    assert piece in message and problem in message and "layers are 0..11" in message
