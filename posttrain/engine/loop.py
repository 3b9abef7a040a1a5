"""The one training loop.

Every algorithm hands the loop an `Objective` that says how a micro-batch becomes a loss;
everything else lives here once: AdamW, warmup + decay, gradient accumulation, clipping,
autocast, the non-finite guard, checkpoints and exact resume, signals, metrics, progress.

Normalisation is written once. An objective returns the *sum* of its per-unit losses over a
micro-batch (units are whatever it averages over: loss tokens for SFT, pairs for DPO) and
says how many units the micro-batch holds (`weight`). The loop divides by the number of
units in the whole global batch, over every micro-batch and every process, so gradient
accumulation and the number of processes change neither the loss nor the gradients.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from tqdm.auto import tqdm

from posttrain.config import TrainConfig
from posttrain.engine import checkpoint
from posttrain.engine.run import Run
from posttrain.errors import ConfigError, TrainingError


class Objective(Protocol):
    def weight(self, batch: dict) -> float:
        """Number of units (tokens, sequences, pairs) that `loss` sums over in this micro-batch."""

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(summed loss over the micro-batch's units, dict of metrics summed over the same units)."""


@dataclass
class LoopData:
    """What the loop needs to know of a dataset: a deterministic plan, and how to batch indices."""

    plan: Callable[[int], list[list[int]]]  # epoch -> global batches of example indices
    collate: Callable[[list[int]], dict]  # indices -> one micro-batch of tensors
    tokens: Callable[[dict], int]  # non-padding tokens in a micro-batch (throughput)
    num_examples: int
    examples: list | None = None  # the encoded examples, for one-off passes over them


@dataclass
class LoopResult:
    step: int
    interrupted: str | None = None  # name of the signal that stopped the run early
    metrics: dict = field(default_factory=dict)  # last logged metrics
    eval_metrics: dict = field(default_factory=dict)


def lr_lambda(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr after `step` optimiser steps: linear warmup, then decay."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


class _Schedule:
    """Picklable lr lambda (LambdaLR stores callable objects' state in its state_dict)."""

    def __init__(self, **kw):
        self.kw = kw

    def __call__(self, step: int) -> float:
        return lr_lambda(step, **self.kw)


def make_accelerator(precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if precision == "auto":
        bf16_gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        precision = "bf16" if bf16_gpu else "fp32"
    # With no accelerator device, say so: accelerate then runs several processes (torchrun or
    # `accelerate launch --multi_gpu`) as CPU data-parallel over gloo instead of as copies.
    # One process may run several stages (quickstart, pipelines, tests) with different precisions;
    # accelerate keeps its settings in a singleton, so start each stage from a clean one. The
    # process group (PartialState) is kept.
    AcceleratorState._reset_state()
    no_device = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    return Accelerator(mixed_precision="no" if precision == "fp32" else precision, cpu=no_device)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases and norm weights (1-D tensors), as is standard."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters")
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def micro_batches_per_process(cfg: TrainConfig, world: int) -> int:
    """Gradient-accumulation steps, derived from the global and micro batch sizes."""
    micro = cfg.micro_batch_size or max(1, cfg.batch_size // world)
    if cfg.batch_size % (micro * world):
        raise ConfigError(
            f"train.batch_size ({cfg.batch_size}) must be a multiple of train.micro_batch_size ({micro}) "
            f"x processes ({world})"
        )
    return cfg.batch_size // (micro * world)


class _Signals:
    """SIGTERM/SIGINT ask the loop to checkpoint and stop after the current step.
    A second SIGINT stops at once (the default handler)."""

    def __init__(self):
        self.received: str | None = None
        self._old = {}

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, self._old.get(signal.SIGINT, signal.default_int_handler))

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def schedule_of(cfg: TrainConfig, data: LoopData, world: int) -> tuple[Callable[[int], list[list[int]]], int]:
    """(epoch -> the global batches the loop will run, total optimiser steps)."""
    chunks = world * micro_batches_per_process(cfg, world)

    def batches(epoch: int) -> list[list[int]]:
        # A trailing batch too small to give every process its micro-batches is dropped; the
        # per-epoch reshuffle puts its examples in full batches in the other epochs.
        return [b for b in data.plan(epoch) if len(b) >= chunks]

    steps_per_epoch = len(batches(0))
    if steps_per_epoch == 0:
        raise TrainingError(
            f"{data.num_examples} training examples do not fill one batch of {cfg.batch_size}; "
            "lower train.batch_size or add data"
        )
    return batches, cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)


def used_examples(cfg: TrainConfig, data: LoopData, world: int) -> list[int]:
    """Indices of every example the whole run will train on (sorted): one-off passes over the
    data (reference log-probs) need not touch the rest."""
    batches, total = schedule_of(cfg, data, world)
    used: set[int] = set()
    epoch = 0
    while total > 0:
        plan = batches(epoch)[:total]
        for b in plan:
            used.update(b)
        total -= len(plan)
        epoch += 1
    return sorted(used)


def train_loop(
    cfg: TrainConfig,
    *,
    accelerator,
    model: torch.nn.Module,
    objective: Objective,
    data: LoopData,
    run: Run,
    eval_data: LoopData | None = None,
    resume: bool = False,
) -> LoopResult:
    """Optimise `objective` over `data`; returns where it stopped. `model` is not yet prepared."""
    world, rank = accelerator.num_processes, accelerator.process_index
    accum = micro_batches_per_process(cfg, world)
    chunks = world * accum  # micro-batches per global batch, over all processes
    batches, total = schedule_of(cfg, data, world)
    steps_per_epoch = len(batches(0))

    optimizer = make_optimizer(model, cfg)
    schedule = _Schedule(
        warmup=cfg.warmup_steps, total=total, schedule=cfg.schedule, min_ratio=cfg.min_lr_ratio
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = checkpoint.LoopState()
    # The scheduler is not `prepare`d: accelerate's wrapper would step it once per process.
    accelerator.register_for_checkpointing(scheduler, state)

    ckpt_root = run.checkpoints
    last = checkpoint.latest(ckpt_root)
    if resume and last is not None:
        checkpoint.load(accelerator, last)
        accelerator.print(f"resumed from {last} (step {state.step})")
    elif last is not None:
        raise TrainingError(
            f"{run.path} already holds checkpoints; pass --resume to continue it, or use a new out"
        )
    run.open_metrics(resume_step=state.step if resume and last else None, tensorboard=cfg.tensorboard)

    fp16 = accelerator.mixed_precision == "fp16"
    device = accelerator.device
    result = LoopResult(step=state.step)
    show = cfg.progress and accelerator.is_main_process
    # In a log file (no terminal) a bar redrawn ten times a second is noise: redraw rarely.
    redraw = 0.1 if sys.stderr.isatty() else 30
    bar = tqdm(total=total, initial=state.step, disable=not show, unit="step", mininterval=redraw)
    with _Signals() as signals:
        while state.step < total:
            plan = batches(state.epoch)
            if state.batch_in_epoch >= len(plan):
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                continue
            t0 = time.perf_counter()
            indices = plan[state.batch_in_epoch]
            size = math.ceil(len(indices) / chunks)
            mine = [indices[(c * world + rank) * size : (c * world + rank + 1) * size] for c in range(accum)]
            micro = [data.collate(ix) for ix in mine]

            weight_local = sum(float(objective.weight(b)) for b in micro)
            weight = accelerator.reduce(torch.tensor(weight_local, device=device), "sum").item()
            if weight == 0:
                raise TrainingError(f"step {state.step}: the batch holds no loss units (all targets masked?)")

            model.train()
            loss_sum = torch.zeros((), device=device)
            metric_sums: dict[str, torch.Tensor] = {}
            tokens = 0
            for i, batch in enumerate(micro):
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                sync = contextlib.nullcontext() if i == len(micro) - 1 else accelerator.no_sync(model)
                with sync, accelerator.autocast():
                    loss, metrics = objective.loss(model, batch)
                    # x world: DDP averages gradients over processes, we want their sum / weight.
                    accelerator.backward(loss * (world / weight))
                loss_sum += loss.detach().float()
                for k, v in metrics.items():
                    metric_sums[k] = metric_sums.get(k, 0) + torch.as_tensor(v, dtype=torch.float32).detach()
                tokens += data.tokens(batch)

            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
            grad_norm = float(grad_norm)
            keys = sorted(metric_sums)
            stats = torch.stack(
                [
                    loss_sum,
                    torch.tensor(float(tokens), device=device),
                    torch.tensor(float(signals.received is not None), device=device),
                ]
                + [metric_sums[k].to(device) for k in keys]
            )
            stats = accelerator.reduce(stats, "sum").cpu()
            loss_value = stats[0].item() / weight
            nonfinite = not math.isfinite(loss_value) or (not fp16 and not math.isfinite(grad_norm))
            if nonfinite:
                # Skip the update, keep the weights. A single bad batch happens (an fp16 overflow, a
                # pathological row); a streak means the run has diverged and must stop loudly.
                optimizer.zero_grad(set_to_none=True)
                state.nonfinite_streak += 1
                accelerator.print(
                    f"warning: step {state.step}: non-finite loss ({loss_value}) or gradient norm ({grad_norm}); "
                    f"update skipped ({state.nonfinite_streak} in a row)"
                )
                if state.nonfinite_streak > cfg.max_nonfinite_steps:
                    last_ok = checkpoint.latest(ckpt_root)
                    raise TrainingError(
                        f"loss or gradients were NaN/Inf for {state.nonfinite_streak} consecutive steps at step "
                        f"{state.step}: the run diverged. Lower train.lr, keep train.max_grad_norm set, or check the "
                        f"data. Last good checkpoint: {last_ok or 'none'}"
                    )
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state.nonfinite_streak = 0
            lr = scheduler.get_last_lr()[0]
            with warnings.catch_warnings():  # a skipped first update makes torch warn about the call order
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()
            state.step += 1
            state.batch_in_epoch += 1
            state.tokens += int(stats[1].item())
            dt = time.perf_counter() - t0
            bar.update(1)

            if state.step % cfg.log_every == 0 or state.step == total or nonfinite:
                metrics = {
                    "loss": loss_value,
                    **{k: stats[3 + j].item() / weight for j, k in enumerate(keys)},
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "epoch": state.epoch + state.batch_in_epoch / steps_per_epoch,
                    "tokens": state.tokens,
                    "tokens_per_s": stats[1].item() / dt,
                    "step_s": dt,
                }
                if nonfinite:
                    metrics["nonfinite_skipped"] = 1
                run.log(state.step, metrics)
                result.metrics = metrics
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")

            if (
                eval_data is not None
                and cfg.eval_every
                and (state.step % cfg.eval_every == 0 or state.step == total)
            ):
                result.eval_metrics = evaluate(accelerator, model, objective, eval_data, cfg)
                run.log(state.step, result.eval_metrics)

            stop = stats[2].item() > 0  # any process got a signal
            if stop or (cfg.save_every and state.step % cfg.save_every == 0):
                checkpoint.save(accelerator, ckpt_root, state.step, keep=cfg.keep_checkpoints)
            if stop:
                result.interrupted = signals.received or "signal"
                accelerator.print(f"\nstopped at step {state.step}; checkpoint saved. Resume with --resume.")
                break
    bar.close()
    run.close()
    result.step = state.step
    return result


@torch.no_grad()
def evaluate(accelerator, model, objective: Objective, data: LoopData, cfg: TrainConfig) -> dict[str, float]:
    """Mean loss (and the objective's metrics) over the whole eval set, sharded over processes."""
    world, rank = accelerator.num_processes, accelerator.process_index
    net = accelerator.unwrap_model(model)  # no DDP collectives in a forward-only pass
    was_training = net.training
    net.eval()
    micro = cfg.micro_batch_size or max(1, cfg.batch_size // world)
    indices = list(range(data.num_examples))
    mine = [indices[i : i + micro] for i in range(0, len(indices), micro)][rank::world]
    sums: dict[str, torch.Tensor] = {}
    weight = torch.zeros((), device=accelerator.device)
    for ix in mine:
        batch = {
            k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in data.collate(ix).items()
        }
        with accelerator.autocast():
            loss, metrics = objective.loss(net, batch)
        weight += float(objective.weight(batch))
        for k, v in {"loss": loss, **metrics}.items():
            sums[k] = sums.get(k, 0) + torch.as_tensor(v, dtype=torch.float32).detach()
    keys = ["loss"] + sorted(k for k in sums if k != "loss")
    stacked = torch.stack(
        [weight] + [torch.as_tensor(sums.get(k, 0.0), device=accelerator.device) for k in keys]
    )
    stacked = accelerator.reduce(stacked, "sum").cpu()
    net.train(was_training)
    return {f"eval/{k}": stacked[1 + j].item() / max(stacked[0].item(), 1e-12) for j, k in enumerate(keys)}
