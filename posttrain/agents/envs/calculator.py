"""``calculator``: 3-4 digit sums and differences (bare or in a sentence), a safe calculator, an answer.

The tiny model does not add four-digit numbers in its head; with ``calc`` it only has to copy. The
grade reads the answer the environment recorded from ``answer(value)``, never the transcript: a
``calc`` result that holds the right number earns nothing until the policy states it.

``calc`` evaluates arithmetic by walking the expression's syntax tree (numbers, + - * / // % **, unary
signs, parentheses); anything else is refused, and a call, attribute or subscript (an attempt to run
code) is also flagged ``hack.attempt``.
"""

from __future__ import annotations

import ast
import operator
import random

from posttrain.agents.env import Grade, ToolEnv, tool
from posttrain.agents.envs import check_split, split_of
from posttrain.agents.policies import Call, Forge
from posttrain.tasks.arithmetic import fact_key

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_CODE = (ast.Call, ast.Attribute, ast.Subscript, ast.Lambda, ast.NamedExpr, ast.comprehension)

_STORIES = (
    ("add", "{name} has {a} coins and finds {b} more. How many coins now?"),
    ("add", "A shop sold {a} cups on Monday and {b} on Tuesday. How many cups in all?"),
    ("sub", "{name} had {a} stamps and gave away {b}. How many stamps are left?"),
    ("sub", "A tank holds {a} litres; {b} leak out. How many litres remain?"),
)
_NAMES = ("Ana", "Ben", "Cleo", "Dev", "Eva", "Finn")


class UnsafeExpression(ValueError):
    pass


def evaluate(expr: str) -> int | float:
    """The value of an arithmetic expression, without ``eval``.

    Raises:
        UnsafeExpression: the expression tries to run code (a call, attribute, subscript...).
        ValueError: anything else that is not plain arithmetic, or a result too large.
    """
    if len(expr) > 200:
        raise ValueError("expression longer than 200 characters")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {e.msg}") from None
    if any(isinstance(node, _CODE) for node in ast.walk(tree)):
        raise UnsafeExpression("only numbers and + - * / // % ** are allowed")

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
                raise ValueError("power too large")
            out = _BINARY[type(node.op)](left, right)
            if abs(out) > 1e30:
                raise ValueError("result too large")
            return out
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](value(node.operand))
        if isinstance(node, ast.Name):
            raise ValueError(f"unknown name {node.id!r}")
        raise ValueError(f"{type(node).__name__} is not allowed")

    return value(tree.body)


def number_text(x: int | float) -> str:
    """``7``, ``7`` (for 7.0), ``2.333333``."""
    if isinstance(x, float) and x.is_integer():
        x = int(x)
    return str(x) if isinstance(x, int) else f"{x:.6f}".rstrip("0")


def _normal(answer: str) -> str:
    text = answer.strip().replace(",", "")
    try:
        return number_text(float(text)) if "." in text else str(int(text))
    except ValueError:
        return text


class CalculatorEnv(ToolEnv):
    """Arithmetic with a calculator tool: calc the expression, then answer."""

    name = "calculator"
    fields = ("question", "expr", "answer")

    def __init__(self, task: dict, **options):
        super().__init__(task, **options)
        self.answered: str | None = None

    def reset(self) -> list[dict]:
        return [
            {"role": "system", "content": "Use calc, then answer."},
            {"role": "user", "content": self.task["question"]},
        ]

    @tool
    def calc(self, expr: str) -> str:
        """Evaluate an arithmetic expression.

        Args:
            expr: numbers with + - * / // % ** and parentheses, e.g. 1234+5678
        """
        try:
            return number_text(evaluate(expr))
        except UnsafeExpression:
            self.flag("hack.attempt")
            raise
        except ZeroDivisionError:
            raise ValueError("division by zero") from None

    @tool(terminal=True)
    def answer(self, value: str) -> str:
        """Give the final answer; the episode ends.

        Args:
            value: the number
        """
        self.answered = value
        return "ok"

    def grade(self) -> Grade:
        used = {"used_calc": float(self.n_calls.get("calc", 0) > 0)}
        if "hack.attempt" in self.flags:
            return Grade(
                0.0, False, {"correct": 0.0, **used}, "hack.attempt", "tried to run code through calc"
            )
        if self.answered is None:
            return Grade(0.0, False, {"correct": 0.0, **used}, "answer.none", "no answer given")
        correct = _normal(self.answered) == _normal(self.task["answer"])
        detail = f"answered {self.answered!r}, expected {self.task['answer']!r}"
        return Grade(
            float(correct),
            correct,
            {"correct": float(correct), **used},
            None if correct else "answer.wrong",
            detail,
        )

    # --- tasks, golden policy, probes ---------------------------------------------------------

    @classmethod
    def tasks(cls, n: int, *, split: str = "train", seed: int = 0) -> list[dict]:
        """``n`` tasks whose keys (``fact_key`` of the computation) fall in ``split``."""
        check_split(split)
        rng, out, seen = random.Random(f"calculator/{split}/{seed}"), [], set()
        while len(out) < n:
            op, digits = rng.choice(("add", "sub")), rng.choice((3, 4))
            a, b = (rng.randint(10 ** (digits - 1), 10**digits - 1) for _ in range(2))
            a, b = (max(a, b), min(a, b)) if op == "sub" else (a, b)
            key = fact_key(op, a, b)
            if key in seen or split_of(key) != split:
                continue
            seen.add(key)
            expr = f"{a}+{b}" if op == "add" else f"{a}-{b}"
            question = expr
            if rng.random() < 0.3:
                story = rng.choice([s for o, s in _STORIES if o == op])
                question = story.format(name=rng.choice(_NAMES), a=a, b=b)
            value = a + b if op == "add" else a - b
            out.append(
                {
                    "id": f"calculator/{split}/{seed}/{len(out)}",
                    "question": question,
                    "expr": expr,
                    "answer": str(value),
                    "key": list(key),
                }
            )
        return out

    @staticmethod
    def golden(task: dict):
        result = yield [Call("calc", {"expr": task["expr"]})]
        yield [Call("answer", {"value": result[0]})]

    @staticmethod
    def probes(task: dict) -> dict:
        """name -> (expected label, script factory)."""
        right, wrong = task["answer"], str(int(task["answer"]) + 1)

        def forged(task):  # writes the calculator's answer itself instead of waiting for it
            yield [Call("calc", {"expr": task["expr"]}), Forge(right)]

        def never_states(task):  # the tool output holds the answer; the policy never gives it
            yield [Call("calc", {"expr": task["expr"]})]
            yield ["The result is in the tool output above."]

        def code(task):
            yield [Call("calc", {"expr": "__import__('os').getcwd()"})]
            yield [Call("answer", {"value": right})]

        def wrong_answer(task):
            yield [Call("answer", {"value": wrong})]

        def spray(task):  # several answers in one turn, the right one last: only the first counts
            yield [Call("answer", {"value": wrong}), Call("answer", {"value": right})]

        return {
            "forged_observation": ("format.forged_observation", forged),
            "answer_never_stated": ("format.no_action", never_states),
            "code_in_calc": ("hack.attempt", code),
            "wrong_answer": ("answer.wrong", wrong_answer),
            "answer_spray": ("answer.wrong", spray),
        }
