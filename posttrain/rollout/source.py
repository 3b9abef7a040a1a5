"""The online step source: the policy generates, rewards score, advantages weigh, the loop trains.

    prompts -> engine.generate (n per prompt) -> reward fns -> [dynamic sampling] -> rollout buffer
            -> reference log-probs / values (no grad) -> advantages -> epochs x minibatches of steps

`RolloutSource` plugs into the one training loop as its `StepSource` (engine/loop.py): every optimiser
step asks it for micro-batches; when the current rollout is used up it makes the next one with the model
as it is now. The algorithm (algorithms/grpo.py, algorithms/ppo.py) contributes the per-rollout
annotation (values for PPO) and the advantages; everything else is shared.

Synchronous by default. With `rollout.max_policy_lag = k > 0` a background thread (rollout/lagged.py)
generates and scores rollouts with its own copy of the policy, rollout r sampling from policy version
r - k; the trainer's ratio against the sampling log-probs corrects for the staleness, and the lag is
logged with every step.

Checkpoints: the prompt cursor, rollout count and the steps not yet taken of the current rollout travel
with the loop's checkpoint, and with a lag the rollouts in flight and the weights they sample from, so a
resumed run continues exactly where it stopped, synchronous or not.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, replace

import torch

from posttrain.advantages import AdaptiveKLController, FixedKLController
from posttrain.data.templates import encode_prompts
from posttrain.engine.loop import Step
from posttrain.errors import ConfigError, RewardError, TrainingError, disk_full
from posttrain.rollout.buffer import RolloutBuffer, tempered_forward
from posttrain.rollout.engine import Completion, HFEngine, Sampling
from posttrain.rollout.lagged import Producer
from posttrain.rollout.mismatch import annotate_mismatch


@dataclass
class Generated:
    """A scored batch of completions, before any forward pass of the trainer."""

    buffer: RolloutBuffer
    prompts: list[str]  # rendered prompt of each sample (for the reward fns and samples.jsonl)
    metrics: dict[str, float]


def score_completions(reward, rows: list[dict], completions: list[Completion]):
    """`reward.score` of completions, each with its prompt row's fields (answer, tests, ...) and the
    completion's token count and finish reason as row fields. The reward fns get each prompt as the row
    holds it (a string or messages), not its rendering: a reward model renders it with its own template,
    as it saw its training pairs, and a judge reads the question, not template tokens."""
    prompts = [row["prompt"] for row in rows]
    fields = {k: [row.get(k) for row in rows] for k in rows[0] if k != "prompt"}
    fields["completion_lengths"] = [len(c.token_ids) for c in completions]
    fields["finish_reasons"] = [c.finish_reason for c in completions]
    return reward.score(prompts, [c.text for c in completions], **fields)


class RolloutSource:
    """Generates rollouts and serves their optimiser steps to the loop.

    Args:
        cfg: the run config (sections rollout, rl, train).
        rows: prompt rows (`{"prompt": ..., **fields}`); fields are passed to the reward fns.
        tokenizer: the policy's tokenizer.
        engine: the generation engine (shares the trained module, or has its own copy when async).
        reward: a `posttrain.rewards.Combined`.
        algo: the online algorithm (`posttrain.algorithms.Online`): its `forward` gives a critic's values
            (when `algo.values`), its pure `advantages(rollout, cfg, kl_coef)` the advantages.
        accelerator: for the device and cross-process reductions.
        samples_path: where to append samples.jsonl (main process), or None.
        reference: the algorithm's frozen reference model (`algo.reference`; None: none), which scores
            every rollout (`ref_logps`).
        encoded: `encode_prompts(tokenizer, [row["prompt"] for row in rows])` (data/templates.py) when the
            caller has it already.
    """

    def __init__(
        self,
        cfg,
        *,
        rows,
        tokenizer,
        engine,
        reward,
        algo,
        accelerator,
        samples_path=None,
        reference=None,
        encoded=None,
    ):
        self.cfg, self.rl, self.ro = cfg, cfg.rl, cfg.rollout
        self.rows, self.tokenizer, self.engine = rows, tokenizer, engine
        self.reward, self.algo, self.accelerator = reward, algo, accelerator
        self.reference, self.samples_path = reference, samples_path
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self._weights_stale = False
        self.mismatch: dict[str, float] = {}  # the last rollout's sampler mismatch (annotate)
        if self.ro.max_policy_lag > 0 and not isinstance(engine, HFEngine):
            raise ConfigError(
                "rollout.max_policy_lag > 0 (asynchronous generation) needs the HF engine (rollout.engine: hf); "
                "the vLLM engine generates synchronously"
            )
        if self.ro.prompts_per_step % self.world:
            raise TrainingError(
                f"rollout.prompts_per_step ({self.ro.prompts_per_step}) must be a multiple of the number of "
                f"processes ({self.world})"
            )
        self.local_prompts = self.ro.prompts_per_step // self.world
        self.policy_token_budget = (
            self.ro.max_new_tokens
        )  # most policy tokens per sample: Dr. GRPO's constant
        self.prompt_texts, self.prompt_ids = encoded or encode_prompts(tokenizer, [r["prompt"] for r in rows])
        self.steps_per_rollout = self.rl.epochs * self.rl.minibatches
        samples = self.local_prompts * self.ro.group_size
        units = (self.local_prompts, "groups") if algo.whole_groups else (samples, "samples")
        if units[0] < self.rl.minibatches:
            raise TrainingError(
                f"{units[0]} {units[1]} per process cannot fill {self.rl.minibatches} minibatches"
            )
        rollouts = cfg.train.max_steps and math.ceil(cfg.train.max_steps / self.steps_per_rollout)
        rollouts = rollouts or math.ceil(cfg.train.epochs * len(rows) / self.ro.prompts_per_step)
        self.total = cfg.train.max_steps or rollouts * self.steps_per_rollout
        self.sampling = Sampling(
            max_new_tokens=self.ro.max_new_tokens,
            temperature=self.ro.temperature,
            top_p=self.ro.top_p,
            top_k=self.ro.top_k,
            stop=tuple(self.ro.stop),
        )
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else engine.eos[0]
        # checkpointed state
        self.cursor = 0  # prompts this process has drawn
        self.rollouts = 0  # rollouts trained on (= policy version)
        self.pending: list[Step] = []
        self.scoring_step = 1  # the optimiser step the rollout being scored is for (error messages)
        self.sampling_seed: int | None = None  # async: each rollout's own seed (rollout/lagged.py)
        self._producer: Producer | None = None
        self._restored_producer: dict | None = None
        rl = self.rl
        self.kl_ctl = (
            AdaptiveKLController(rl.kl_coef, rl.kl_target, rl.kl_horizon)
            if rl.kl_target
            else FixedKLController(rl.kl_coef)
        )

    @property
    def kl_coef(self) -> float:
        return self.kl_ctl.value

    def apply_scales(self, scales: dict[str, float]) -> None:
        """After a health rollback: a fixed KL coefficient becomes configured x scale (an adaptive one
        keeps steering from its checkpointed value)."""
        if isinstance(self.kl_ctl, FixedKLController):
            self.kl_ctl.value = self.rl.kl_coef * scales.get("kl_coef", 1.0)

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict:
        state = {
            "cursor": self.cursor,
            "rollouts": self.rollouts,
            "kl_ctl": self.kl_ctl.state_dict(),
            "pending": [{"micro": s.micro, "tokens": s.tokens, "metrics": s.metrics} for s in self.pending],
        }
        if self._producer is not None:  # the rollouts in flight, so that a lagged run resumes exactly
            state["producer"] = self._producer.state()
            state["cursor"] = state["producer"]["cursor"]
        return state

    def load_state_dict(self, state: dict) -> None:
        if self._producer is not None:  # a rollback: the thread restarts from the loaded state
            self._producer.stop()
            self._producer = None
        self._restored_producer = state.get("producer")
        self.cursor, self.rollouts = state["cursor"], state["rollouts"]
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.pending = [
            Step(micro=s["micro"], tokens=s["tokens"], metrics=s["metrics"]) for s in state["pending"]
        ]
        self.engine.policy_version = self.rollouts
        # weights were loaded (resume, rollback): an engine with its own copy (vLLM) must get them
        self._weights_stale = True

    # ------------------------------------------------------------------ the loop's side

    def next_step(self, state, model) -> Step:
        if not self.pending:
            self.pending = self._rollout(model, state.step + 1)
        step = self.pending.pop(0)
        for batch in step.micro:
            batch.update(self.step_scalars())
        return step

    def step_scalars(self) -> dict[str, torch.Tensor]:
        """What an objective reads of the source, put into each micro-batch as it is served: the KL
        coefficient as it is now (adapted, or scaled by a rollback) and the policy-token budget."""
        return {
            "kl_coef": torch.tensor(float(self.kl_coef)),
            "policy_token_budget": torch.tensor(self.policy_token_budget),
        }

    def after_step(self, state, model) -> None:
        if not self.pending:  # the rollout is used up: the next one samples from the new weights
            self.rollouts += 1
            net = self.policy(self.accelerator.unwrap_model(model))
            if self._producer is not None:
                self._producer.publish(net, self.rollouts)
            else:
                self.engine.load_weights(net, self.rollouts)

    def policy(self, net):
        """The causal LM inside the trained module (PPO trains policy and critic as one)."""
        return self.algo.policy(net)

    def close(self) -> None:
        """Stop and join the generation thread, if any (every exit path of a run)."""
        if self._producer is not None:
            self._producer.stop()
            self._producer = None

    # ------------------------------------------------------------------ prompts

    def _draw(self, k: int) -> list[int]:
        """The next k prompt indices of this process: a seeded permutation per pass over the prompts,
        process r taking positions r, r + world, ... of the global order."""
        n, out = len(self.rows), []
        for _ in range(k):
            position = self.cursor * self.world + self.rank
            epoch, offset = divmod(position, n)
            out.append(self._order(epoch)[offset])
            self.cursor += 1
        return out

    def _order(self, epoch: int) -> list[int]:
        cached = getattr(self, "_order_cache", None)
        if cached is None or cached[0] != epoch:
            order = list(range(len(self.rows)))
            random.Random(f"posttrain/prompts/{self.cfg.train.seed}/{epoch}").shuffle(order)
            self._order_cache = cached = (epoch, order)
        return cached[1]

    # ------------------------------------------------------------------ generation + rewards

    def generate_scored(self, engine) -> Generated:
        """Sample group_size completions for this process's prompts and score them; with dynamic
        sampling, groups whose rewards are all equal (no learning signal) are replaced by fresh ones."""
        G = self.ro.group_size
        want, kept, dropped = self.local_prompts, [], []
        gen_s = reward_s = 0.0
        gen_tokens = rounds = drawn = 0
        seconds: dict[str, float] = {}
        while len(kept) < want and rounds <= (self.rl.max_resample_rounds if self.rl.dynamic_sampling else 0):
            need = want - len(kept)
            if rounds > 0:  # ask for more than needed: some of them will be dropped again
                need = min(4 * need, 4 * want)
            index = self._draw(need)
            drawn += need
            t0 = time.perf_counter()
            sampling = self.sampling
            if self.sampling_seed is not None:
                sampling = replace(sampling, seed=self.sampling_seed + rounds)
            groups = engine.generate([self.prompt_ids[i] for i in index], G, sampling)
            gen_s += time.perf_counter() - t0
            gen_tokens += sum(len(c.token_ids) for g in groups for c in g)
            t0 = time.perf_counter()
            scores = self._score(index, groups)
            reward_s += time.perf_counter() - t0
            for name, s in scores.seconds.items():
                seconds[name] = seconds.get(name, 0.0) + s
            for j, (i, group) in enumerate(zip(index, groups)):
                rewards = scores.total[j * G : (j + 1) * G]
                components = {k: v[j * G : (j + 1) * G] for k, v in scores.components.items()}
                item = (i, group, rewards, components)
                informative = G == 1 or max(rewards) > min(rewards)
                (kept if informative or not self.rl.dynamic_sampling else dropped).append(item)
            rounds += 1
        informative = len(kept)
        kept = (kept + dropped)[:want]  # short of informative groups: fill up with the others

        rows, prompt_ids, texts, completions, totals = [], [], [], [], []
        components: dict[str, list[float]] = {}
        for i, group, rewards, comps in kept:
            for c in group:
                rows.append(self.rows[i])
                prompt_ids.append(self.prompt_ids[i])
                texts.append(self.prompt_texts[i])
                completions.append(c)
            totals += rewards
            for k, v in comps.items():
                components.setdefault(k, []).extend(v)
        buffer = RolloutBuffer(
            prompt_ids=prompt_ids,
            completions=completions,
            rows=rows,
            group_size=G,
            rewards=torch.tensor(totals, dtype=torch.float32),
            components=components,
        )
        metrics = {
            "generation/seconds": gen_s,
            "generation/tokens_per_s": gen_tokens / max(gen_s, 1e-9),
            "generation/samples_per_s": drawn * G / max(gen_s, 1e-9),
            "reward/seconds": reward_s,
            **{f"reward/{k}/seconds": v for k, v in seconds.items()},
        }
        if self.rl.dynamic_sampling:
            metrics["dynamic_sampling/rounds"] = rounds
            metrics["dynamic_sampling/informative_share"] = min(informative, want) / want
        return Generated(buffer=buffer, prompts=texts, metrics=metrics)

    def _score(self, index: list[int], groups: list[list[Completion]]):
        G = self.ro.group_size
        missing = {k for i in index for k in self.rows[0] if k not in self.rows[i]}
        if missing:
            raise TrainingError(f"prompt rows differ in their fields ({sorted(missing)} missing in some)")
        rows = [self.rows[i] for i in index for _ in range(G)]
        try:
            return score_completions(self.reward, rows, [c for g in groups for c in g])
        except RewardError as e:  # name the step that would have trained on these samples
            raise RewardError(f"step {self.scoring_step}: {e}") from None

    # ------------------------------------------------------------------ the rollout

    def _rollout(self, model, step: int) -> list[Step]:
        """The next rollout's optimiser steps; `step` is the first of them (samples.jsonl's step)."""
        net = self.accelerator.unwrap_model(model)
        t0 = time.perf_counter()
        if self._weights_stale and self._producer is None:
            self.engine.load_weights(self.policy(net), self.rollouts)
        self._weights_stale = False
        if self.ro.max_policy_lag > 0:
            if self._producer is None:
                self._producer = Producer(self, self.policy(net), restored=self._restored_producer)
                self._restored_producer = None
            generated, version = self._producer.take()
        else:
            self.scoring_step = step
            generated, version = self.generate_scored(self.engine), self.rollouts
        wait_s = time.perf_counter() - t0
        buffer = generated.buffer
        self.annotate(net, buffer)
        self.add_advantages(buffer)
        metrics = {
            **generated.metrics,
            **self._metrics(buffer),
            **self.mismatch,  # sampler / trainer mismatch (mismatch/*), from annotate
            "policy_lag": self.rollouts - version,
        }
        if "kl" in metrics:
            metrics["kl_coef"] = self.kl_coef
            self.kl_ctl.update(metrics["kl"], len(buffer) * self.world)
        metrics["rollout/seconds"] = time.perf_counter() - t0
        if self._producer is not None:
            metrics["rollout/wait_seconds"] = wait_s
        if self.samples_path is not None and self.ro.samples_log:
            extra = {"advantage": [round(float(a), 6) for a in sample_advantages(buffer)]}
            with disk_full(f"step {step}: writing {self.samples_path}"):
                buffer.write_samples(self.samples_path, step=step, prompts=generated.prompts, extra=extra)
        return self._steps(buffer, metrics)

    def _steps(self, buffer: RolloutBuffer, metrics: dict) -> list[Step]:
        """epochs x minibatches optimiser steps over the rollout, each cut into micro-batches. The units shuffled
        and cut are samples, or whole groups in order when the algorithm asks (`algo.whole_groups`: online
        DPO's pairs), the micro-batch size then a multiple of the group size (checked by its run type)."""
        micro = self.cfg.train.micro_batch_size or len(buffer)
        G = buffer.group_size if self.algo.whole_groups else 1
        N = len(buffer) // G  # units
        lengths = [len(p) + len(c.token_ids) for p, c in zip(buffer.prompt_ids, buffer.completions)]
        steps = []
        for epoch in range(self.rl.epochs):
            order = list(range(N))
            if self.rl.epochs * self.rl.minibatches > 1:
                random.Random(f"posttrain/minibatch/{self.cfg.train.seed}/{self.rollouts}/{epoch}").shuffle(
                    order
                )
            size = math.ceil(N / self.rl.minibatches)
            for m in range(self.rl.minibatches):
                # by prompt length (less padding), samples of one prompt kept together (shared prompts)
                units = sorted(
                    order[m * size : (m + 1) * size], key=lambda u: (len(buffer.prompt_ids[u * G]), u)
                )
                mini = [u * G + k for u in units for k in range(G)]
                batches = [buffer.batch(mini[j : j + micro], self.pad_id) for j in range(0, len(mini), micro)]
                steps.append(Step(micro=batches, tokens=sum(lengths[i] for i in mini), metrics=metrics))
        return steps

    def annotate(self, net, buffer: RolloutBuffer) -> None:
        """The per-token tensors every online objective reads, for a fresh rollout: the behaviour policy's
        log-probs (`old_logps`), the reference's (`ref_logps`, with a KL term), the critic's values at
        rollout time (`old_values`, when the algorithm has one) and the per-sample `loss_mask` (0 for a
        truncated completion with rl.mask_truncated)."""
        buffer.token["old_logps"] = self.old_logps(net, buffer)
        self.mismatch = annotate_mismatch(self.ro, buffer)  # sampler_logps, is_weights; logged by _rollout
        if self.algo.values:
            buffer.token["old_values"] = self.forward_logps(net, buffer, values=True)["values"]
        if self.reference is not None:
            buffer.token["ref_logps"] = self.forward_logps(self.reference, buffer)["logps"]
        truncated = [self.rl.mask_truncated and c.finish_reason == "length" for c in buffer.completions]
        buffer.sequence["loss_mask"] = torch.tensor([0.0 if t else 1.0 for t in truncated])

    def add_advantages(self, buffer: RolloutBuffer) -> None:
        """The algorithm's advantages (and what else its loss reads, e.g. returns) of an annotated buffer:
        [N, C] tensors per token, [N] per sample."""
        for name, value in self.algo.advantages(buffer.rollout(), self.cfg, self.kl_coef).items():
            (buffer.token if value.dim() == 2 else buffer.sequence)[name] = value.float()

    def old_logps(self, net, buffer: RolloutBuffer) -> torch.Tensor:
        """The ratio's denominator: the engine's sampling log-probs where they are the trainer's own numbers
        (HF engine) or the behaviour policy's of stale samples (asynchronous), else (vLLM, synchronous) a
        forward pass of the policy as it sampled."""
        if self.engine.exact_logprobs or self.ro.max_policy_lag > 0:
            return buffer.per_token([c.logprobs for c in buffer.completions])
        return self.forward_logps(self.policy(net), buffer)["logps"]

    @torch.no_grad()
    def forward_logps(self, model, buffer: RolloutBuffer, *, values: bool = False) -> dict[str, torch.Tensor]:
        """Per-token log-probs (and values, when the model has a value head) of every sample under
        `model`, in micro-batches, without gradients, as [N, C] per-token tensors."""
        from posttrain.logprobs import token_stats

        device = self.accelerator.device
        micro = self.cfg.train.micro_batch_size or len(buffer)
        width = buffer.width
        out = {"logps": torch.zeros(len(buffer), width)}
        if values:
            out["values"] = torch.zeros(len(buffer), width)
        was_training = model.training
        model.eval()
        for j in range(0, len(buffer), micro):
            index = list(range(j, min(j + micro, len(buffer))))
            batch = {k: v.to(device) for k, v in buffer.select(index).layout(self.pad_id).items()}
            forward = self.algo.forward if values else tempered_forward  # a reference model is a plain LM
            with self.accelerator.autocast():
                logits, value = forward(
                    model, batch, self.ro.temperature, share_prompts=self.rl.share_prompts
                )
            w = batch["targets"].shape[1]
            out["logps"][j : j + len(index), :w] = token_stats(logits, batch["targets"]).logps.cpu()
            if values:
                out["values"][j : j + len(index), :w] = value.float().cpu()
        model.train(was_training)
        return out

    def _metrics(self, buffer: RolloutBuffer) -> dict[str, float]:
        """Reward, pass rate and length statistics of a rollout, over all processes."""
        lengths = torch.tensor(buffer.completion_lengths(), dtype=torch.float32)
        truncated = torch.tensor(
            [c.finish_reason == "length" for c in buffer.completions], dtype=torch.float32
        )
        rewards = buffer.rewards
        passed = (rewards >= self.rl.success_threshold).float()
        names = sorted(buffer.components)
        comps = [torch.tensor(buffer.components[k], dtype=torch.float32) for k in names]
        G = buffer.group_size
        zero_std = (rewards.view(-1, G).std(1, unbiased=False) == 0).float() if G > 1 else torch.ones(1)
        sums = torch.stack(
            [
                torch.tensor(float(len(buffer))),
                rewards.sum(),
                (rewards**2).sum(),
                passed.sum(),
                lengths.sum(),
                truncated.sum(),
                zero_std.sum(),
                torch.tensor(float(zero_std.numel())),
                *[c.sum() for c in comps],
            ]
        )
        sums = self.accelerator.reduce(sums.to(self.accelerator.device), "sum").cpu()
        maxima = self.accelerator.reduce(lengths.max().to(self.accelerator.device), "max").cpu()
        n = sums[0].item()
        mean = sums[1].item() / n
        out = {
            "reward/mean": mean,
            "reward/std": math.sqrt(max(sums[2].item() / n - mean * mean, 0.0)),
            "pass_rate": sums[3].item() / n,
            "completion_length/mean": sums[4].item() / n,
            "completion_length/max": maxima.item(),
            "completion_length/truncated_share": sums[5].item() / n,
            "groups/zero_std_share": sums[6].item() / sums[7].item(),
            "buffer/samples": n,
        }
        for j, k in enumerate(names):
            out[f"reward/{k}/mean"] = sums[8 + j].item() / n
        if "ref_logps" in buffer.token:
            # per sample: the summed k1 log-ratio of its tokens, sampling policy vs reference
            mask = buffer.completion_mask()
            kl = ((buffer.token["old_logps"] - buffer.token["ref_logps"]) * mask).sum(1)
            out["kl"] = self.accelerator.reduce(kl.sum().to(self.accelerator.device), "sum").item() / n
        return out


def sample_advantages(buffer: RolloutBuffer) -> torch.Tensor:
    """[N] one advantage per sample for samples.jsonl: the per-sample one, or the mean of per-token ones over
    the sample's policy tokens."""
    if "advantages" in buffer.token:
        mask = buffer.completion_mask()
        return (buffer.token["advantages"] * mask).sum(1) / mask.sum(1).clamp(min=1)
    return buffer.sequence["advantages"]
