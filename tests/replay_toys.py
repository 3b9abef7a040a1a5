"""Environments for the replay tests (importable as ``replay_toys:Dice``)."""

from __future__ import annotations

import random

from posttrain.agents.env import Grade, ToolEnv, tool


class Dice(ToolEnv):
    """Answer the task's number; ``count`` is deterministic, ``roll`` is not (a flaky tool on purpose)."""

    name = "dice"
    fields = ("id", "answer")

    def __init__(self, task):
        super().__init__(task)
        self.answered, self.counted = None, 0

    def reset(self):
        return [{"role": "user", "content": f"say {self.task['answer']}"}]

    @tool
    def count(self) -> str:
        """Count up."""
        self.counted += 1
        return str(self.counted)

    @tool
    def roll(self) -> str:
        """Roll a die with a million faces."""
        return str(random.randint(1, 10**6))

    @tool(terminal=True)
    def answer(self, value: str) -> str:
        """Answer.

        Args:
            value: the answer
        """
        self.answered = value
        return "ok"

    def state_key(self):
        return self.counted

    def grade(self):
        ok = self.answered == str(self.task["answer"])
        return Grade(float(ok), ok, {"correct": float(ok)}, None if ok else "answer.wrong")

    @classmethod
    def tasks(cls, n, *, split="train", seed=0):
        return [{"id": f"dice/{split}/{i}", "answer": str(100 + i)} for i in range(n)]
