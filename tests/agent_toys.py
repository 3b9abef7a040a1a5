"""Small environments for the agent-loop tests (importable as ``agent_toys:Toy``)."""

from __future__ import annotations

import time

from posttrain.agents.env import Grade, InfraError, ToolEnv, tool


class Toy(ToolEnv):
    """Answer the task's number. A turn that says BREAK makes the environment fail (infrastructure), one
    that says HANG makes the step never return in time, LONG gets a long tool result."""

    name = "toy"
    fields = ("id", "answer")

    def __init__(self, task, *, long_text: int = 200):
        super().__init__(task)
        self.answered, self.long_text = None, long_text

    def reset(self):
        return [{"role": "user", "content": f"say {self.task['answer']}"}]

    @tool
    def look(self) -> str:
        """Look around."""
        return "x" * self.long_text

    @tool(terminal=True)
    def answer(self, value: str) -> str:
        """Answer.

        Args:
            value: the answer
        """
        self.answered = value
        return "ok"

    def step(self, action):
        if "BREAK" in action.text:
            raise InfraError("the sandbox went away", "infra.sandbox")
        if "HANG" in action.text:
            time.sleep(3)
        return super().step(action)

    def grade(self):
        ok = self.answered == str(self.task["answer"])
        return Grade(float(ok), ok, {"correct": float(ok)}, None if ok else "answer.wrong")

    @classmethod
    def tasks(cls, n, *, split="train", seed=0):
        return [{"id": f"toy/{split}/{i}", "answer": str(100 + i)} for i in range(n)]


def says_x(prompts, completions, **_):
    """1.0 when the completion holds "xxxx" (the toy's tool output does; the assistant never writes it)."""
    return [float("xxxx" in c) for c in completions]


class Echo(ToolEnv):
    """Answers every turn with a short tool message, whatever the policy wrote; ``task['turns']`` turns
    (default 3), so that episodes of one batch can drop out of the waves at different turns."""

    name = "echo"

    def reset(self):
        return [{"role": "user", "content": f"say {self.task['id']}"}]

    @tool
    def noop(self) -> str:
        """Do nothing."""
        return "ok"

    def step(self, action):
        obs = super().step(action)
        turns = self.n_calls["turns"] = self.n_calls.get("turns", 0) + 1
        last = self.task.get("turns", 3)
        obs.done = turns >= last
        obs.events = [e for e in obs.events if e != "format.no_action"]
        obs.messages = obs.messages or [
            self.tool_message("noop", f"turn {turns} of {last}, task {self.task['id']}")
        ]
        return obs

    def grade(self):
        return Grade(1.0, True)
