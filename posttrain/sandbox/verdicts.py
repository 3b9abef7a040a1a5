"""Verdicts decided in the parent, where the program cannot reach them.

:func:`plan` reads each test snippet. A single ``assert`` whose expression this module can evaluate
itself, once the values only the program can compute are known, becomes a *parent* check: the
sub-expressions that need the program (calls of its functions, its variables: the *leaves*) are sent to
the sandbox, their values come back as plain data (:func:`decode`), and :func:`evaluate` computes the
assert here, with the real builtins, on rebuilt values. The expected values never enter the sandbox, so
no trick inside it (a frame walk, a lying ``__eq__``, patched builtins, an early exit) can make a wrong
answer pass: forging the verdict needs the right values, which is solving the task.

Equality is strict (:func:`strict_equal`): the types must match exactly (``True`` is not ``1``, a tuple
is not a list) except that ints and floats compare by value, as the tests' authors mean.

Straight-line tests (``x = f(1)`` then ``assert x == 2``) are parent checks too: the assignments run
inside, the asserts are decided here, and ``x`` itself is a leaf, so it must come back as plain data.
Anything else (loops, definitions, comprehensions, lambdas) is a free-form *snippet*, run inside the
sandbox in a fresh namespace with fresh builtins (see ``_boot``); its pass/fail comes back as a line
tagged with a nonce the program never sees.
"""

from __future__ import annotations

import ast
import math
import operator
from dataclasses import dataclass, field

_SAFE_CALLS = {
    f.__name__: f
    for f in (abs, round, len, sorted, set, list, tuple, dict, frozenset, sum, min, max, all, any, int,
              float, str, bool, isinstance, reversed, divmod, repr, type, complex, bytes, range, zip, enumerate)
}  # fmt: skip
_SAFE_NAMES = {"True": True, "False": False, "None": None}
_MATH = {
    "isclose",
    "fabs",
    "sqrt",
    "floor",
    "ceil",
    "isnan",
    "isinf",
    "isfinite",
    "pi",
    "e",
    "inf",
    "nan",
    "log",
}
_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.BitAnd: operator.and_,
    ast.BitOr: operator.or_, ast.BitXor: operator.xor, ast.LShift: operator.lshift, ast.RShift: operator.rshift,
}  # fmt: skip
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_, ast.Invert: operator.invert}
_MAX_ITEMS = 1_000_000  # the parent refuses to build anything bigger from a program's value


@dataclass
class Check:
    """One test. ``kind`` "parent": ``steps`` in order, each ``("run", source)`` (a statement that binds
    names, run inside the sandbox) or ``("assert", expr, leaves)`` (decided here: ``expr`` with its leaves
    replaced by ``__leaf_K__`` names). ``kind`` "snippet": run inside as a whole."""

    source: str
    kind: str
    steps: list[tuple] = field(default_factory=list)

    @property
    def asserts(self) -> list[tuple[ast.expr, list[str]]]:
        return [(step[1], step[2]) for step in self.steps if step[0] == "assert"]

    @property
    def leaves(self) -> list[str]:
        return [leaf for _, leaves in self.asserts for leaf in leaves]


def _parent_evaluable(node: ast.AST) -> bool:
    """Whether ``node`` itself is computed here (its children may still be leaves)."""
    if isinstance(node, (ast.Constant, ast.Tuple, ast.List, ast.Set, ast.Dict, ast.BoolOp, ast.Compare,
                         ast.IfExp, ast.Subscript, ast.Slice, ast.keyword)):  # fmt: skip
        return True
    if isinstance(node, ast.UnaryOp):
        return type(node.op) in _UNARY
    if isinstance(node, ast.BinOp):
        return type(node.op) in _BINOPS
    if isinstance(node, ast.Name):
        return node.id in _SAFE_NAMES
    if isinstance(node, ast.Attribute):
        return isinstance(node.value, ast.Name) and node.value.id == "math" and node.attr in _MATH
    if isinstance(node, ast.Call):
        func = node.func
        named = isinstance(func, ast.Name) and func.id in _SAFE_CALLS
        return (named or _parent_evaluable(func) and isinstance(func, ast.Attribute)) and not any(
            isinstance(a, ast.Starred) for a in node.args
        )
    return False


class _Leaves(ast.NodeTransformer):
    def __init__(self, source: str):
        self.source, self.leaves = source, []

    def visit(self, node):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _SAFE_CALLS:
            node.args = [self.visit(a) for a in node.args]
            node.keywords = [self.visit(k) for k in node.keywords]
            return node
        if isinstance(node, ast.Attribute) and _parent_evaluable(node):  # math.isclose: a name, not a leaf
            return node
        if _parent_evaluable(node) or isinstance(
            node, (ast.expr_context, ast.operator, ast.unaryop, ast.cmpop, ast.boolop)
        ):
            return self.generic_visit(node)
        if isinstance(node, ast.Name) and node.id in _SAFE_CALLS:  # a type as an argument: isinstance(x, int)
            return node
        self.leaves.append(ast.get_source_segment(self.source, node) or ast.unparse(node))
        return ast.copy_location(ast.Name(f"__leaf_{len(self.leaves) - 1}__", ast.Load()), node)


_INSIDE_ONLY = (
    ast.Lambda,
    ast.GeneratorExp,
    ast.ListComp,
    ast.SetComp,
    ast.DictComp,
    ast.NamedExpr,
    ast.Await,
)


def plan(tests: list[str]) -> tuple[list[Check], set[str]]:
    """One :class:`Check` per snippet, and the module names the snippets use (imported before the program,
    so the sandbox can put their state back before each test)."""
    checks, modules = [], set()
    for source in tests:
        try:
            tree = ast.parse(source)
        except SyntaxError:
            checks.append(Check(source, "snippet"))  # fails inside, with the interpreter's message
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                modules.add(node.module.split(".")[0])
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                modules.add(node.value.id)
        inlined = _inline_check(tree)
        if inlined is not None:  # HumanEval's `def check(candidate): ...` then `check(f)`
            source, tree = inlined, ast.parse(inlined)
        checks.append(_steps(source, tree.body) or Check(source, "snippet"))
    return checks, {m for m in modules if m.isidentifier()}


def _inline_check(tree: ast.Module) -> str | None:
    """HumanEval's form (``METADATA = ...``, ``def check(candidate): <asserts>``, ``check(f)``) as the
    straight line it stands for, ``candidate`` replaced by ``f``; None for any other shape."""
    body = tree.body
    if len(body) < 2 or not isinstance(body[-1], ast.Expr) or not isinstance(body[-2], ast.FunctionDef):
        return None
    func, call = body[-2], body[-1].value
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == func.name):
        return None
    params = func.args.args
    if len(params) != 1 or len(call.args) != 1 or not isinstance(call.args[0], ast.Name) or call.keywords:
        return None
    if func.decorator_list or func.args.vararg or func.args.kwarg or func.args.kwonlyargs:
        return None
    if not all(isinstance(s, (ast.Assign, ast.Import, ast.ImportFrom)) for s in body[:-2]):
        return None
    old, new = params[0].arg, call.args[0].id

    class Rename(ast.NodeTransformer):
        def visit_Name(self, node):
            return ast.copy_location(ast.Name(new, node.ctx), node) if node.id == old else node

    inlined = [Rename().visit(stmt) for stmt in func.body]
    return ast.unparse(ast.Module(body=[*body[:-2], *inlined], type_ignores=[]))


def _steps(source: str, body: list[ast.stmt]) -> Check | None:
    """Straight-line tests (assignments, imports, calls, then asserts: ``x = f(1)`` / ``assert x == 2``) as
    parent checks; None for anything with control flow, definitions or no assert at all."""
    straight = (ast.Assert, ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Expr, ast.Import, ast.ImportFrom)
    if not any(isinstance(s, ast.Assert) for s in body) or not all(isinstance(s, straight) for s in body):
        return None
    steps = []
    for stmt in body:
        if not isinstance(stmt, ast.Assert):
            steps.append(("run", ast.get_source_segment(source, stmt) or ast.unparse(stmt)))
            continue
        # A leaf must not depend on names bound inside the expression (comprehensions, lambdas).
        if any(isinstance(n, _INSIDE_ONLY) for n in ast.walk(stmt.test)):
            return None
        finder = _Leaves(source)
        steps.append(("assert", finder.visit(stmt.test), finder.leaves))
    return Check(source, "parent", steps)


def decode(tagged, depth: int = 0):
    """Rebuild a value encoded by ``_boot.encode``; anything malformed raises ValueError."""
    if depth > 60 or not isinstance(tagged, list) or not tagged or not isinstance(tagged[0], str):
        raise ValueError("malformed value")
    tag, rest = tagged[0], tagged[1:]

    def one(kind):
        if len(rest) != 1 or type(rest[0]) is not kind:
            raise ValueError(f"malformed {tag}")
        return rest[0]

    if tag == "none" and not rest:
        return None
    if tag == "bool":
        return one(bool)
    if tag == "int":
        text = one(str)
        if len(text) > 4300:
            raise ValueError("int too long")
        return int(text)
    if tag == "float":
        return float.fromhex(one(str))
    if tag == "complex" and len(rest) == 2 and all(type(r) is str for r in rest):
        return complex(float.fromhex(rest[0]), float.fromhex(rest[1]))
    if tag == "str":
        return one(str)
    if tag == "bytes":
        return bytes.fromhex(one(str))
    if tag == "range" and len(rest) == 3 and all(type(r) is str and len(r) < 30 for r in rest):
        return range(*(int(r) for r in rest))
    if tag in ("list", "tuple", "set", "frozenset"):
        items = [decode(v, depth + 1) for v in one(list)]
        return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[tag](items)
    if tag == "dict":
        pairs = one(list)
        if not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise ValueError("malformed dict")
        return {decode(k, depth + 1): decode(v, depth + 1) for k, v in pairs}
    raise ValueError(f"unknown tag {tag!r}")


def strict_equal(a, b) -> bool:
    """``a == b`` with exact types: bool only equals bool, int and float compare by value, containers
    must be of the same type and equal item by item."""
    ta, tb = type(a), type(b)
    numbers = (int, float)
    if ta is not tb and not (ta in numbers and tb in numbers):
        return False
    if ta in (list, tuple):
        return len(a) == len(b) and all(strict_equal(x, y) for x, y in zip(a, b))
    if ta is dict:
        return a.keys() == b.keys() and all(strict_equal(a[k], b[k]) for k in a)
    return a == b


def _size(x) -> int:
    return len(x) if isinstance(x, (str, bytes, list, tuple, set, frozenset, dict)) else 1


def _binop(op, a, b):
    if op is operator.pow and isinstance(b, int) and isinstance(a, int) and abs(b) > 10_000 and abs(a) > 1:
        raise ValueError("power too large to compute")
    if op is operator.lshift and isinstance(b, int) and b > 100_000:
        raise ValueError("shift too large to compute")
    if op is operator.mul and max(_size(a), 1) * max(_size(b), 1) > _MAX_ITEMS and _size(a) + _size(b) > 2:
        raise ValueError("product too large to compute")
    return op(a, b)


_COMPARE = {
    ast.Eq: strict_equal, ast.NotEq: lambda a, b: not strict_equal(a, b), ast.Lt: operator.lt,
    ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_,
    ast.IsNot: operator.is_not, ast.In: lambda a, b: any(strict_equal(a, x) for x in b) if isinstance(b, (list, tuple)) else a in b,
    ast.NotIn: lambda a, b: not (any(strict_equal(a, x) for x in b) if isinstance(b, (list, tuple)) else a in b),
}  # fmt: skip


def evaluate(node: ast.AST, leaves: list):
    """The value of a parent check's expression, given its leaves' values."""

    def ev(n):
        if isinstance(n, ast.Constant):
            return n.value
        if isinstance(n, ast.Name):
            if n.id.startswith("__leaf_"):
                return leaves[int(n.id[7:-2])]
            if n.id in _SAFE_NAMES:
                return _SAFE_NAMES[n.id]
            return _SAFE_CALLS[n.id]
        if isinstance(n, ast.Attribute):
            return getattr(math, n.attr)
        if isinstance(n, (ast.Tuple, ast.List, ast.Set)):
            items = [ev(e) for e in n.elts]
            return {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(n)](items)
        if isinstance(n, ast.Dict):
            return {ev(k): ev(v) for k, v in zip(n.keys, n.values)}
        if isinstance(n, ast.UnaryOp):
            return _UNARY[type(n.op)](ev(n.operand))
        if isinstance(n, ast.BinOp):
            return _binop(_BINOPS[type(n.op)], ev(n.left), ev(n.right))
        if isinstance(n, ast.BoolOp):
            value = None
            for v in n.values:
                value = ev(v)
                if isinstance(n.op, ast.And) != bool(value):
                    return value
            return value
        if isinstance(n, ast.Compare):
            left = ev(n.left)
            for op, comparator in zip(n.ops, n.comparators):
                right = ev(comparator)
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(n, ast.IfExp):
            return ev(n.body) if ev(n.test) else ev(n.orelse)
        if isinstance(n, ast.Subscript):
            return ev(n.value)[ev(n.slice)]
        if isinstance(n, ast.Slice):
            return slice(*(ev(p) if p is not None else None for p in (n.lower, n.upper, n.step)))
        if isinstance(n, ast.Call):
            func = ev(n.func)
            args = [ev(a) for a in n.args]
            if func in (range, sorted, list, tuple, set, sum, min, max) and any(
                _size(a) > _MAX_ITEMS for a in args
            ):
                raise ValueError("too large to compute")
            if func is range and any(isinstance(a, int) and abs(a) > _MAX_ITEMS for a in args):
                raise ValueError("range too large")
            return func(*args, **{k.arg: ev(k.value) for k in n.keywords})
        raise ValueError(f"cannot evaluate {type(n).__name__}")

    return ev(node)


def same_output(got: str, expected: str) -> bool:
    """stdin/stdout cases: equal up to trailing whitespace on each line and trailing blank lines (the usual
    judge rule)."""

    def norm(text: str) -> list[str]:
        lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
        while lines and not lines[-1]:
            lines.pop()
        return lines

    return norm(got) == norm(expected)
