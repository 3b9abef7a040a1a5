"""Asynchronous generation (`rollout.max_policy_lag = k > 0`): a thread that generates rollouts ahead of
training with its own copy of the policy.

Deterministic by construction, so a lagged run resumes bit-identically:

- rollout r samples from exactly policy version max(r - k, base) (the weights the trainer published
  after its rollout r - k), never "the newest at that moment", which would depend on thread timing;
- it samples with its own generator, seeded from (train.seed, process, r), not the global RNG that the
  trainer's dropout draws from;
- `state` pauses the thread between rollouts and returns what a checkpoint needs to continue exactly: the
  rollouts generated and not yet trained on, how many were produced, and the weight snapshots that the
  rollouts still to come will sample from (at most k + 1 policy copies).

`stop` joins the thread (every exit path of a run calls it): a generation thread still running torch at
interpreter exit aborts the process (exit 134, "terminate called without an active exception").
"""

from __future__ import annotations

import collections
import hashlib
import threading

from posttrain.errors import TrainingError
from posttrain.rollout.engine import HFEngine


def rollout_seed(seed: int, rank: int, rollout: int) -> int:
    """The sampling seed of one rollout on one process."""
    digest = hashlib.sha256(f"posttrain/rollout/{seed}/{rank}/{rollout}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Producer:
    """The generation thread of one `RolloutSource` (see the module docstring).

    Args:
        source: the RolloutSource; its `generate_scored`, prompt cursor and `sampling_seed` are used from
            this thread only while it runs.
        model: the policy as it is now; the engine's own copy is made from it.
        restored: `state()` of a checkpoint, or None for a fresh start at `source.rollouts`.
    """

    def __init__(self, source, model, restored: dict | None = None):
        self.source = source
        self.lag = source.ro.max_policy_lag
        self.engine = HFEngine.copy_of(model, source.tokenizer, batch_size=source.ro.generation_batch_size)
        self.cond = threading.Condition()
        self.consumed = source.rollouts  # newest version published by the trainer
        if restored is None:
            self.produced, self.base = source.rollouts, source.rollouts
            self.ready: collections.deque = collections.deque()
            self.snapshots = {source.rollouts: _snapshot(model)}
            self.engine.policy_version = source.rollouts
        else:
            self.produced, self.base = restored["produced"], restored["base"]
            self.ready = collections.deque(restored["ready"])
            self.snapshots = dict(restored["snapshots"])
            self.engine.policy_version = -1  # load the right snapshot before the first generation
        # Made at a rollout boundary: `model` is exactly version `source.rollouts`, which a restored thread
        # may need (it was published after the checkpoint, before this thread existed).
        self.snapshots.setdefault(source.rollouts, _snapshot(model))
        self.stopping = self.pausing = self.idle = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="posttrain-rollout", daemon=True)
        self.thread.start()

    def version_for(self, rollout: int) -> int:
        return max(rollout - self.lag, self.base)

    # ------------------------------------------------------------------ the trainer's side

    def publish(self, model, version: int) -> None:
        """The trainer's weights after `version` rollouts."""
        snapshot = _snapshot(model)
        with self.cond:
            self.consumed = version
            self.snapshots[version] = snapshot
            self.cond.notify_all()

    def take(self) -> tuple[object, int]:
        """The next rollout (a `Generated`) and the policy version it was sampled from."""
        with self.cond:
            while not self.ready:
                if self.error is not None:
                    raise TrainingError(f"rollout generation failed: {self.error}") from self.error
                self.cond.wait(timeout=1.0)
            return self.ready.popleft()

    def state(self) -> dict:
        """What a checkpoint needs (module docstring); waits for the rollout being generated, if any."""
        with self.cond:
            self.pausing = True
            self.cond.notify_all()
            while not self.idle and self.thread.is_alive():
                self.cond.wait(timeout=1.0)
            state = {
                "produced": self.produced,
                "base": self.base,
                "ready": list(self.ready),
                "snapshots": {
                    v: w for v, w in self.snapshots.items() if v >= self.version_for(self.produced)
                },
                "cursor": self.source.cursor,  # the prompts drawn by the rollouts produced so far
            }
            self.pausing = False
            self.cond.notify_all()
        return state

    def stop(self) -> None:
        """End the thread and wait for it (after the rollout it is generating, if any)."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not threading.current_thread():
            self.thread.join()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        source = self.source
        try:
            while True:
                with self.cond:
                    # rollout r waits until version r - lag is published (and while a checkpoint reads state)
                    while not self.stopping and (
                        self.pausing or self.consumed < self.version_for(self.produced)
                    ):
                        self.idle = True
                        self.cond.notify_all()
                        self.cond.wait()
                    self.idle = False
                    if self.stopping:
                        return
                    r = self.produced
                    version = self.version_for(r)
                    weights = self.snapshots[version]
                    for old in [v for v in self.snapshots if v < version]:
                        del self.snapshots[old]  # no later rollout samples from these
                if self.engine.policy_version != version:
                    self.engine.model.load_state_dict(weights)
                    self.engine.policy_version = version
                source.scoring_step = r * source.steps_per_rollout + 1
                source.sampling_seed = rollout_seed(source.cfg.train.seed, source.rank, r)
                generated = source.generate_scored(self.engine)
                with self.cond:
                    self.ready.append((generated, version))
                    self.produced += 1
                    self.cond.notify_all()
        except BaseException as e:  # surfaced to the trainer by take()
            with self.cond:
                self.error = e
                self.idle = True
                self.cond.notify_all()
