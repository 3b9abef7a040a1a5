"""``guess``: find a hidden number in 1..N from higher / lower feedback: the multi-turn credit demo.

Binary search needs at most ``ceil(log2(N + 1))`` guesses (k guesses tell apart 2^k - 1 numbers), and
the environment allows exactly that many, so only a policy that uses the feedback succeeds and the
number of guesses against the optimum is an exact optimality gap. ``state_key`` is the interval the
feedback so far leaves, ``(lo, hi)``: the same state recurs across a GRPO group, which is what
anchor-state credit needs. ``step_penalty`` (off by default) adds a per-turn reward of ``-step_penalty``
for each wrong guess, visible as such in the trajectory.
"""

from __future__ import annotations

import math
import random

from posttrain.agents.env import Grade, ToolEnv, tool
from posttrain.agents.envs import check_split, split_of
from posttrain.agents.policies import Call, Forge


class GuessEnv(ToolEnv):
    """Guess the number in 1..N; each reply says higher, lower or correct."""

    name = "guess"
    fields = ("n", "target")

    def __init__(self, task: dict, *, step_penalty: float = 0.0):
        super().__init__(task)
        self.n, self.target = int(task["n"]), int(task["target"])
        self.limit = math.ceil(math.log2(self.n + 1))
        self.lo, self.hi = 1, self.n
        self.guesses, self.found, self.step_penalty = 0, False, step_penalty

    def reset(self) -> list[dict]:
        return [{"role": "user", "content": f"Guess my number in 1..{self.n}. {self.limit} guesses."}]

    @tool
    def guess(self, n: int) -> str:
        """Guess the number.

        Args:
            n: your guess
        """
        if not 1 <= n <= self.n:
            raise ValueError(f"out of range 1..{self.n}")
        self.guesses += 1
        if n == self.target:
            self.found = True
            return "correct"
        if n < self.target:
            self.lo = max(self.lo, n + 1)
            reply = "higher"
        else:
            self.hi = min(self.hi, n - 1)
            reply = "lower"
        return reply if self.guesses < self.limit else f"{reply}; no guesses left"

    def step(self, action):
        obs = super().step(action)
        if self.found or self.guesses >= self.limit:
            obs.done = True  # the reply stays in the transcript; nothing more to do
        wrong = sum(r.status == "ok" and r.content != "correct" for r in obs.results)
        obs.reward = -self.step_penalty * wrong
        return obs

    def state_key(self):
        return (self.lo, self.hi)

    def grade(self) -> Grade:
        parts = {"guesses": float(self.guesses), "limit": float(self.limit)}
        if self.found:
            return Grade(1.0, True, parts, None, f"found {self.target} in {self.guesses} guesses")
        failure = "answer.wrong" if self.guesses else "answer.none"
        return Grade(0.0, False, parts, failure, f"not found in {self.guesses} guesses (limit {self.limit})")

    # --- tasks, golden policy, probes ---------------------------------------------------------

    @classmethod
    def tasks(cls, n: int, *, split: str = "train", seed: int = 0) -> list[dict]:
        """``n`` tasks with N in {15, 31, 63} whose keys (N, target) fall in ``split``."""
        check_split(split)
        rng, out = random.Random(f"guess/{split}/{seed}"), []
        while len(out) < n:
            size = rng.choice((15, 31, 63))
            key = (size, rng.randint(1, size))
            if split_of(key) == split:
                out.append(
                    {"id": f"guess/{split}/{seed}/{len(out)}", "n": size, "target": key[1], "key": list(key)}
                )
        return out

    @staticmethod
    def golden(task: dict):
        lo, hi = 1, int(task["n"])
        while True:
            mid = (lo + hi) // 2
            reply = (yield [Call("guess", {"n": mid})])[0]
            if reply.startswith("higher"):
                lo = mid + 1
            elif reply.startswith("lower"):
                hi = mid - 1
            else:
                return

    @staticmethod
    def probes(task: dict) -> dict:
        other = 1 if int(task["target"]) != 1 else 2

        def forged(task):
            yield [Call("guess", {"n": other}), Forge("correct")]

        def repeat(task):  # ignores the feedback and asks the same thing again
            for _ in range(3):
                yield [Call("guess", {"n": other})]

        def says_it(task):  # names the number in text instead of guessing it
            yield [f"It is {task['target']}."]

        return {
            "forged_observation": ("format.forged_observation", forged),
            "repeat_guess": ("loop.repeat", repeat),
            "number_in_text": ("format.no_action", says_it),
        }
