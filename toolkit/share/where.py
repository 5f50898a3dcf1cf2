"""``--where``: a label expression such as ``language == "srp" and year >= 1990``, parsed with :mod:`ast`, never
evaluated by Python.

The grammar: comparisons of a label with a literal (``==``, ``!=``, ``<``, ``<=``, ``>``, ``>=``; chains such as
``1990 <= year < 2000``; ``label in [...]`` / ``not in`` a literal list or tuple), joined by ``and``, ``or``,
``not`` and parentheses. Literals are strings, numbers (with an optional sign) and ``True`` / ``False``. A label is
compared only with literals of its own type (strings with strings, numbers with numbers, booleans with booleans,
which are not ordered). Anything else (calls, attributes, arithmetic, subscripts, unknown labels, two labels or
two literals compared) is refused, naming the part of the expression at fault. Labels are named as Python names,
so a label whose name is not one (``my-label``) cannot be used here.

A comparison follows the stored values: a missing number (NaN) equals nothing, so it satisfies only ``!=`` and
``not in``; a missing string is the empty string ``""``.
"""

from __future__ import annotations

import ast
import operator

import numpy as np

from ..errors import UserError

OPERATORS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
             ast.Gt: operator.gt, ast.GtE: operator.ge}
MEMBERSHIP = (ast.In, ast.NotIn)
#: What a refused node is, in the error message.
KINDS = {ast.Call: "a call", ast.Attribute: "an attribute", ast.BinOp: "arithmetic", ast.Subscript: "a subscript",
         ast.Lambda: "a lambda", ast.NamedExpr: "an assignment", ast.IfExp: "a conditional expression",
         ast.JoinedStr: "an f-string", ast.Starred: "a starred expression", ast.Name: "a label",
         ast.Constant: "a literal", ast.Compare: "a comparison used as a value", ast.List: "a list (only `in` takes "
         "one)", ast.Tuple: "a tuple (only `in` takes one)"}
RULE = ("--where takes only comparisons of labels with literals (==, !=, <, <=, >, >=, in [...], not in [...]) "
        "joined by and, or, not, e.g. 'language == \"srp\" and year >= 1990'")
#: Returned by :meth:`_Evaluator.literal` for a node that is no literal.
NOT_LITERAL = object()


def select_where(expression: str, labels: dict) -> np.ndarray:
    """(prompt,) bool: the prompts whose labels satisfy ``expression``.

    labels: name → (prompt,) array (bool, int64, float64 with NaN = missing, or strings): the store's labels.
    Raises :class:`UserError` naming the part of the expression that is not allowed.
    """
    try:
        tree = ast.parse(expression.strip(), mode="eval")
        return _Evaluator(expression, labels).mask(tree.body)
    except SyntaxError as e:
        shown = expression if len(expression) <= 80 else expression[:77] + "..."
        raise UserError(f"--where {shown!r} is not a valid expression ({e.msg}); {RULE}") from None
    except (RecursionError, MemoryError):
        raise UserError(f"--where nests too deeply; {RULE}") from None


def _type_of_literal(value) -> str:
    return "boolean" if isinstance(value, bool) else "string" if isinstance(value, str) else "number"


def _type_of_label(values: np.ndarray) -> str:
    return {"b": "boolean", "i": "number", "u": "number", "f": "number"}.get(values.dtype.kind, "string")


class _Evaluator:
    """Walks the expression's syntax tree over the labels' (prompt,) arrays; refuses every node outside the
    grammar."""

    def __init__(self, expression: str, labels: dict):
        self.expression, self.labels = expression, labels

    def text(self, node) -> str:
        return ast.get_source_segment(self.expression, node) or ast.dump(node)

    def refuse(self, node, what: str):
        raise UserError(f"--where refuses `{self.text(node)}`: {what}; {RULE}")

    def mask(self, node) -> np.ndarray:
        if isinstance(node, ast.BoolOp):
            combine = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
            return combine.reduce([self.mask(value) for value in node.values])
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return ~self.mask(node.operand)
        if isinstance(node, ast.Compare):
            if any(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops):
                self.refuse(node, "`is` compares identity, not values; use == or !=")
            operands = [node.left, *node.comparators]
            masks = [self.compare(*triple) for triple in zip(operands, node.ops, operands[1:])]
            return np.logical_and.reduce(masks)
        if isinstance(node, (ast.Name, ast.Constant)):
            self.refuse(node, f"{KINDS[type(node)]} alone is not a comparison")
        self.refuse(node, KINDS.get(type(node), "not a comparison"))

    def compare(self, left, op, right) -> np.ndarray:
        """One comparison of a label with a literal, in either order (``in`` only with the label on the left)."""
        if isinstance(op, MEMBERSHIP):
            name, values = self.label(left)
            if not isinstance(right, (ast.List, ast.Tuple)):
                self.refuse(right, "`in` takes a literal list such as [\"srp\", \"hrv\"]")
            choices = [self.literal_of(element, name, values, op) for element in right.elts]
            found = np.fromiter((v in choices for v in values.tolist()), dtype=bool, count=len(values))
            return found if isinstance(op, ast.In) else ~found
        if isinstance(left, ast.Name) and isinstance(right, ast.Name):
            self.refuse(left, f"it is compared with another label ({right.id}), not with a literal")
        if isinstance(right, ast.Name):
            name, values = self.label(right)
            return np.asarray(OPERATORS[type(op)](self.literal_of(left, name, values, op), values), dtype=bool)
        if isinstance(left, ast.Name):
            name, values = self.label(left)
            return np.asarray(OPERATORS[type(op)](values, self.literal_of(right, name, values, op)), dtype=bool)
        for side in (left, right):
            if self.literal(side) is NOT_LITERAL:
                self.refuse(side, KINDS.get(type(side), "neither a label nor a literal"))
        self.refuse(left, "two literals are compared; compare a label with a literal")

    def label(self, node):
        """(name, (prompt,) values) of a label."""
        if not isinstance(node, ast.Name):
            self.refuse(node, f"{KINDS.get(type(node), 'not a label')}, where a label belongs")
        if node.id not in self.labels:
            raise UserError(f"--where: unknown label `{node.id}`; the store's labels are: "
                            f"{', '.join(self.labels) or '(none)'}")
        return node.id, self.labels[node.id]

    def literal(self, node):
        """The value of a literal (a string, a number with an optional sign, True or False), else NOT_LITERAL."""
        signed = isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd))
        inner = node.operand if signed else node
        if not isinstance(inner, ast.Constant) or not isinstance(inner.value, (str, int, float)):
            return NOT_LITERAL
        if signed and _type_of_literal(inner.value) != "number":
            return NOT_LITERAL
        return -inner.value if signed and isinstance(node.op, ast.USub) else inner.value

    def literal_of(self, node, name: str, values: np.ndarray, op):
        """The literal compared with label ``name`` by ``op``, refused unless its type is the label's."""
        value = self.literal(node)
        if value is NOT_LITERAL:
            if isinstance(node, (ast.Constant, ast.UnaryOp)):
                self.refuse(node, "a literal other than a string, a number, True or False")
            self.refuse(node, f"{KINDS.get(type(node), 'an operand')}, where a literal belongs")
        label_type, literal_type = _type_of_label(values), _type_of_literal(value)
        if label_type != literal_type:
            raise UserError(f"--where: `{self.text(node)}` is a {literal_type}, but label {name} holds {label_type}s; "
                            f"compare {name} with a {label_type}")
        if label_type == "boolean" and not isinstance(op, (ast.Eq, ast.NotEq, *MEMBERSHIP)):
            raise UserError(f"--where: label {name} holds booleans, which are not ordered; compare it with == or !=")
        return value
