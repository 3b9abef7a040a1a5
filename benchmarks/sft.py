"""SFT side by side: posttrain against TRL's SFTTrainer on the same model, data and settings.

    python benchmarks/sft.py --sizes tiny,small --steps 30

What runs: for each model size (``tiny`` ~1.07M parameters, where per-step overhead dominates;
``small`` ~25M, where the maths dominates) and each variant below, one child process trains
W warm-up + N measured steps and prints one JSON line; the parent prints a table and writes
all results to ``--out`` (default ``benchmarks/results/sft.json``). One process per run, so
that each framework's peak RSS is its own.

Variants:
    posttrain                  posttrain's defaults: padding-free packing into rows of max_length
    posttrain-padded           data.packing=false: one example per row, right-padded, batches of
                               similar lengths (posttrain's padded default, data.group_by_length)
    posttrain-padded-random    data.packing=false, data.group_by_length=false: random batches padded
                               to their longest example, the same padding as TRL's default
    trl                        SFTTrainer, padded random batches (TRL's default)
    trl-padding-free           SFTTrainer with padding_free=True (the batch as one row; needs
                               max_length=None without packing: we check no row exceeds it instead)
    trl-grouped                (not run by default) train_sampling_strategy="group_by_length"

Read the posttrain rows top to bottom against ``trl``: padded-random shows the loops alone on the
same padding, padded adds length grouping, the default adds packing. ``fill`` is the share of
token positions that are real tokens: what padding costs.

Same work for everyone: arithmetic chat rows from ``posttrain.tasks.arithmetic.sft_rows`` (one
user and one assistant turn; posttrain reads them as jsonl ``messages``, TRL as conversational
prompt/completion so that it also trains on the completion only; the parent checks that both
give the same token ids and the same number of loss tokens per example), the same saved model
from ``posttrain.tasks.tiny.build_tiny``, batch 32, lr 1e-3 constant, no warmup, AdamW with
each framework's defaults (betas 0.9/0.999, no weight decay, clip 1.0), max_length 128, fp32
on CPU, no gradient checkpointing, ``torch.set_num_threads(2)``. TRL gets its best CPU
settings: ``use_cpu=True, bf16=False, gradient_checkpointing=False``, no workers, no reports,
no saving, and logging only every 10^6 steps.

Same batches: TRL reads the rows in the order of posttrain's seeded random plan
(``plan_batches``) with a sequential sampler, so step k of ``trl``, ``trl-padding-free``,
``posttrain`` and ``posttrain-padded-random`` trains on the same 32 examples: equal padding for
the padded ones, and the same loss at step 1 up to float rounding (a check of the maths, not
only of the speed). ``posttrain-padded`` and ``trl-grouped`` regroup by length, so their
batches, and their loss@1, differ.

Metrics, defined identically for every framework:
    s/step     wall time from the end of step W to the end of step W+N, divided by N
               (collation, forward, backward, clipping, optimiser step, per-step bookkeeping)
    tokens/s   non-padding tokens of the N measured steps / that wall time. posttrain: the
               `tokens` and `time` fields of metrics.jsonl; TRL: attention_mask.sum() of each
               batch (the batch length when padding-free), counted in training_step, and a
               callback's clock at on_step_end.
    peak MiB   ru_maxrss of the child process at the end (imports, data, model, training)
    loss@1     mean NLL per loss token of step 1, from the same initial weights.
    fill       real tokens / token positions (rows x row length) of the measured batches.

On a shared machine another program's load wrecks CPU timings (torch's threads wait for each
other), so the parent waits for a quiet machine before each run, measures the cores other
programs kept busy during it (/proc/stat minus the child's own CPU time), reruns a disturbed
run once, and marks a run that stayed disturbed with `!`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import (
    TRL_CPU_ARGS,
    bench_main,
    emit_result,
    fmt,
    ids_digest,
    measured_window,
    peak_rss_mib,
    ratio,
    read_jsonl,
    run_quietly,
    setup_child,
    trl_step_clock,
    versions,
)

BATCH = 32
LR = 1e-3
MAX_LENGTH = 128
THREADS = 2
SEED = 0

VARIANTS: dict[str, dict] = {
    "posttrain": {"framework": "posttrain", "packing": True},
    "posttrain-padded": {"framework": "posttrain", "packing": False},
    "posttrain-padded-random": {"framework": "posttrain", "packing": False, "group_by_length": False},
    "trl": {"framework": "trl"},
    "trl-padding-free": {"framework": "trl", "padding_free": True},
    "trl-grouped": {"framework": "trl", "group_by_length": True},
}
DEFAULT_VARIANTS = [v for v in VARIANTS if v != "trl-grouped"]
# Variants that regroup the rows by length; every other one trains on the same batches (see same_order).
GROUPED = {"posttrain-padded", "trl-grouped"}
BASELINE = "trl"  # ratios are against this variant

METHOD = (
    "tokens/s = non-padding tokens of the measured steps / wall time from the end of warm-up step W to the "
    "end of step W+N (posttrain: metrics.jsonl `tokens` and `time`; TRL: attention_mask.sum() per batch, "
    "or the row length when padding-free, and a callback clock at on_step_end). loss@1 = mean NLL per loss "
    "token at step 1, same initial weights; TRL reads the rows in posttrain's random batch order, so loss@1 "
    "agrees to rounding except for the length-grouped variants (other batches). "
    "fill = real tokens / token positions (rows x row length) of the measured batches. "
    "ratios = variant / trl (speed: tokens/s, higher is faster; memory: peak RSS, lower is leaner)."
)


# ----------------------------------------------------------------------------------- children


def posttrain_config(spec: dict) -> dict:
    """The run config: the benchmark's shared settings, everything else posttrain's defaults."""
    return {
        "algorithm": "sft",
        "out": spec["run_dir"],
        "model": {"path": spec["model"]},
        "data": {
            "train": spec["data"],
            "max_length": MAX_LENGTH,
            "packing": spec["packing"],
            "group_by_length": spec.get("group_by_length", True),
        },
        "train": {
            "lr": LR,
            "batch_size": BATCH,
            "max_steps": spec["warmup"] + spec["steps"],
            "schedule": "constant",
            "warmup_steps": 0,
            "precision": "fp32",
            "seed": SEED,
            "log_every": 1,
            "progress": False,
            "tensorboard": False,
        },
    }


def posttrain_batches(spec: dict, packing: bool) -> tuple[int, int]:
    """(real tokens, token positions = rows x row length) of the measured batches.

    The loop logs real tokens only, so the batches are rebuilt after the run with posttrain's
    public plan and collate functions, as the loop calls them on one process without
    accumulation (one collated batch per step). The caller checks the real-token count against
    the logged one, so a drift between this mirror and the loop shows instead of a wrong fill.
    """
    from transformers import AutoTokenizer

    from posttrain.data.batching import collate, plan_batches
    from posttrain.data.templates import encode_sft_row

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    examples = [encode_sft_row(row, tokenizer, max_length=MAX_LENGTH) for row in read_jsonl(spec["data"])]
    grouped = spec.get("group_by_length", True) and not packing
    plan = plan_batches([len(ex) for ex in examples], BATCH, seed=SEED, epoch=0, group_by_length=grouped)
    tokens = positions = 0
    for ix in plan[spec["warmup"] : spec["warmup"] + spec["steps"]]:
        batch = collate(
            [examples[i] for i in ix], pad_id=tokenizer.pad_token_id, packing=packing, max_length=MAX_LENGTH
        )
        tokens += int((batch["example_index"] >= 0).sum())
        positions += batch["input_ids"].numel()
    return tokens, positions


def child_posttrain(spec: dict) -> dict:
    """Train through the public API; read per-step times and token counts back from metrics.jsonl."""
    from posttrain.engine.run import read_metrics
    from posttrain.train import train

    config = posttrain_config(spec)
    result = train(config)
    peak = peak_rss_mib()  # before the bookkeeping below allocates anything
    records = [r for r in read_metrics(result.run_dir) if "step_s" in r]
    cumulative = [0] + [r["tokens"] for r in records]
    tokens = [b - a for a, b in zip(cumulative, cumulative[1:])]
    window = measured_window([r["time"] for r in records], tokens, spec["warmup"], spec["steps"])
    inner = records[spec["warmup"] : spec["warmup"] + spec["steps"]]
    packing = json.loads((Path(result.run_dir) / "manifest.json").read_text())["data"]["packing"]
    rebuilt_tokens, positions = posttrain_batches(spec, packing)
    return {
        **window,
        "peak_rss_mib": peak,
        "fill": rebuilt_tokens / positions if rebuilt_tokens == window["measured_tokens"] else None,
        "steps_run": len(records),
        "first_loss": records[0]["loss"],
        "last_loss": records[-1]["loss"],
        # step_s leaves out writing the metrics line: a check on the wall-clock window above.
        "inner_s_per_step": sum(r["step_s"] for r in inner) / len(inner),
        "packing_used": packing,
    }


def trl_dataset(rows: list[dict]):
    """The same chat rows as conversational prompt/completion, so that TRL's loss is on the completion."""
    from datasets import Dataset

    def split(messages: list[dict]) -> dict:
        (user, assistant) = messages
        return {"prompt": [user], "completion": [assistant]}

    return Dataset.from_list([split(row["messages"]) for row in rows])


def counting_trainer(base):
    """A subclass of SFTTrainer that records each step's non-padding tokens and loss.

    Counting happens on the already collated batch: attention_mask.sum() when padded, the row
    length when padding-free (that collator adds no padding with pad_to_multiple_of=None).
    """

    class CountingSFTTrainer(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.step_tokens: list[int] = []
            self.step_positions: list[int] = []
            self.step_losses: list[float] = []

        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs.get("attention_mask")
            self.step_tokens.append(int(mask.sum()) if mask is not None else inputs["input_ids"].numel())
            self.step_positions.append(inputs["input_ids"].numel())
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.step_losses.append(float(loss))
            return loss

    return CountingSFTTrainer


def trl_examples_summary(dataset) -> dict:
    """Lengths, loss tokens and token-id digest of TRL's processed training examples (in order)."""
    ids = [list(x) for x in dataset["input_ids"]]
    # The model shifts labels by one: labels[0] is never predicted, so it is not a loss token.
    loss_tokens = [sum(t != -100 for t in labels[1:]) for labels in dataset["labels"]]
    return {"lengths": [len(x) for x in ids], "loss_tokens": loss_tokens, "ids_sha256": ids_digest(ids)}


def child_trl(spec: dict) -> dict:
    """SFTTrainer in its best CPU settings, timed by a callback at every step end."""
    from trl import SFTConfig, SFTTrainer

    padding_free = spec.get("padding_free", False)
    grouped = spec.get("group_by_length", False)
    args = SFTConfig(
        output_dir=spec["run_dir"],
        max_steps=spec["warmup"] + spec["steps"],
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        # padding_free without packing refuses a max_length; the parent checks no row exceeds it.
        max_length=None if padding_free else MAX_LENGTH,
        padding_free=padding_free,
        # Rows arrive in posttrain's batch order (see same_order) and are read sequentially.
        train_sampling_strategy="group_by_length" if grouped else "sequential",
        **TRL_CPU_ARGS,
        seed=SEED,
    )
    clock = trl_step_clock()
    rows = read_jsonl(spec["data"])
    rows = rows if grouped else [rows[i] for i in spec["order"]]
    trainer = counting_trainer(SFTTrainer)(
        model=spec["model"], args=args, train_dataset=trl_dataset(rows), callbacks=[clock]
    )
    examples = trl_examples_summary(trainer.train_dataset) if spec.get("report_examples") else None
    trainer.train()
    peak = peak_rss_mib()
    window = measured_window(clock.end_times, trainer.step_tokens, spec["warmup"], spec["steps"])
    w, n = spec["warmup"], spec["steps"]
    inner = [e - b for b, e in zip(clock.begin_times[w : w + n], clock.end_times[w : w + n])]
    return {
        **window,
        "peak_rss_mib": peak,
        "fill": window["measured_tokens"] / sum(trainer.step_positions[w : w + n]),
        "steps_run": len(clock.end_times),
        "first_loss": trainer.step_losses[0],
        "last_loss": trainer.step_losses[-1],
        # on_step_begin -> on_step_end leaves out fetching and collating the batch.
        "inner_s_per_step": sum(inner) / len(inner),
        "optim": getattr(args.optim, "value", str(args.optim)),
        "attn_implementation": trainer.model.config._attn_implementation,
        "examples": examples,
    }


def child_main(spec: dict) -> None:
    setup_child(THREADS)
    run = child_posttrain if spec["framework"] == "posttrain" else child_trl
    emit_result(run(spec))


# ------------------------------------------------------------------------------------- parent


def prepare(work: Path, sizes: list[str], n_rows: int) -> tuple[dict[str, str], str]:
    """Build one saved model per size and write the rows as jsonl; returns (model paths, data path)."""
    from posttrain.tasks.arithmetic import sft_rows
    from posttrain.tasks.tiny import build_tiny

    models = {size: str(build_tiny(work / f"model-{size}", size=size, seed=SEED)) for size in sizes}
    data = work / "sft.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in sft_rows(n_rows, seed=SEED)))
    return models, str(data)


def same_order(n_rows: int) -> list[int]:
    """The row order of posttrain's epoch-0 plan without length grouping (packed, or padded with
    data.group_by_length=false): a seeded shuffle that ignores the lengths. TRL reads the rows in
    this order, so step k of trl, trl-padding-free, posttrain and posttrain-padded-random trains
    on the same 32 examples."""
    from posttrain.data.batching import plan_batches

    return [i for batch in plan_batches([1] * n_rows, BATCH, seed=SEED, epoch=0) for i in batch]


def check_loss_tokens(trl_examples: dict | None, model: str, data: str, order: list[int]) -> dict:
    """Compare posttrain's encoding of the rows with TRL's processed dataset (which holds the rows
    in `order`), example by example."""
    from transformers import AutoTokenizer

    from posttrain.data.templates import encode_sft_row

    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = read_jsonl(data)
    encoded = [encode_sft_row(rows[i], tokenizer, max_length=MAX_LENGTH) for i in order]
    mine = {
        "lengths": [len(ex) for ex in encoded],
        "loss_tokens": [ex.num_loss_tokens for ex in encoded],
        "ids_sha256": ids_digest([ex.input_ids for ex in encoded]),
    }
    check = {
        "examples": len(encoded),
        "max_length_tokens": max(mine["lengths"]),
        "max_length_limit": MAX_LENGTH,
        "posttrain_loss_tokens_total": sum(mine["loss_tokens"]),
    }
    if trl_examples is None:
        return {**check, "verdict": "TRL not run: posttrain side only"}
    same_ids = mine["ids_sha256"] == trl_examples["ids_sha256"]
    differ = sum(a != b for a, b in zip(mine["loss_tokens"], trl_examples["loss_tokens"]))
    differ += abs(len(mine["loss_tokens"]) - len(trl_examples["loss_tokens"]))
    check.update(
        trl_examples=len(trl_examples["lengths"]),
        trl_loss_tokens_total=sum(trl_examples["loss_tokens"]),
        same_token_ids=same_ids,
        examples_with_different_loss_tokens=differ,
    )
    ok = same_ids and differ == 0 and len(trl_examples["lengths"]) == len(encoded)
    check["verdict"] = "identical" if ok else "DIFFERENT: the frameworks do not train on the same tokens"
    return check


def run_size(
    size: str, variants: list[str], models: dict, data: str, order: list[int], work: Path, args
) -> dict:
    """Run every variant of one size, each in its own child process."""
    results = {}
    for name in variants:
        spec = {
            **VARIANTS[name],
            "size": size,
            "model": models[size],
            "data": data,
            "run_dir": str(work / f"run-{size}-{name}"),
            "warmup": args.warmup,
            "steps": args.steps,
            "order": order,
            "report_examples": size == "tiny" and name == BASELINE,
        }
        results[name] = run_quietly(__file__, spec, f"[{size}] {name}", args, args.retries)
    return results


def add_ratios(results: dict) -> None:
    """speed_ratio = tokens/s over the baseline's; memory_ratio = peak RSS over the baseline's."""
    base = results.get(BASELINE, {})
    for r in results.values():
        r["speed_ratio"] = ratio(r.get("tokens_per_s"), base.get("tokens_per_s"))
        r["memory_ratio"] = ratio(r.get("peak_rss_mib"), base.get("peak_rss_mib"))


def loss_agreement(results: dict) -> float | None:
    """Largest |loss@1 - TRL's loss@1| over the variants that train on TRL's batches."""
    base = results.get(BASELINE, {}).get("first_loss")
    same = [r["first_loss"] for name, r in results.items() if name not in GROUPED and "first_loss" in r]
    return None if base is None or not same else max(abs(x - base) for x in same)


def print_table(all_results: dict) -> None:
    """One line per (size, variant); `!` marks a run disturbed by another program."""
    head = (
        f"{'size':6} {'framework':24} {'s/step':>8} {'tokens/s':>9} {'fill':>5} {'peak MiB':>9} {'loss@1':>8}"
        "  | ratio vs TRL (speed, memory)"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for size, results in all_results.items():
        for name, r in results.items():
            if "error" in r:
                print(f"{size:6} {name:24} error: {r['error']}")
                continue
            label = name + ("!" if r.get("noisy") else "")
            print(
                f"{size:6} {label:24} {r['s_per_step']:8.4f} {r['tokens_per_s']:9.0f} {fmt(r['fill'], '5.2f'):>5} "
                f"{r['peak_rss_mib']:9.0f} {r['first_loss']:8.5f}  | "
                f"{fmt(r['speed_ratio'], '5.2f', 'x')}  {fmt(r['memory_ratio'], '5.2f', 'x')}"
            )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="tiny,small", help="comma-separated model sizes (tiny, small)")
    p.add_argument(
        "--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, from {list(VARIANTS)}"
    )
    p.add_argument("--steps", type=int, default=30, help="measured steps N")
    p.add_argument("--warmup", type=int, default=5, help="warm-up steps W, excluded from the figures")
    p.add_argument("--out", default="benchmarks/results/sft.json", help="JSON results file")
    p.add_argument("--work", default=None, help="keep models, data and runs here (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per child run")
    p.add_argument(
        "--wait-quiet", type=float, default=600, help="seconds to wait for a quiet machine before each run"
    )
    p.add_argument("--retries", type=int, default=1, help="reruns of a run disturbed by another program")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))
    bench_main(args, VARIANTS, run_all, "sft")


def run_all(args, sizes: list[str], variants: list[str], work: Path) -> dict:
    """Prepare, run every (size, variant), check the loss tokens, print; returns the JSON report."""
    n_rows = BATCH * (args.warmup + args.steps)  # one epoch, every batch full
    models, data = prepare(work, sizes, n_rows)
    order = same_order(n_rows)
    all_results = {size: run_size(size, variants, models, data, order, work, args) for size in sizes}
    for results in all_results.values():
        add_ratios(results)

    check = None
    if "tiny" in sizes:
        trl_examples = all_results["tiny"].get(BASELINE, {}).pop("examples", None)
        check = check_loss_tokens(trl_examples, models["tiny"], data, order)
        print(f"\nloss tokens per example (tiny): {check['verdict']}; {json.dumps(check)}")
    for results in all_results.values():
        for r in results.values():
            r.pop("examples", None)

    print_table(all_results)
    agreement = {size: loss_agreement(results) for size, results in all_results.items()}
    same = ", ".join(v for v in variants if v not in GROUPED)
    for size, diff in agreement.items():
        if diff is not None:
            print(f"loss@1 on identical batches ({same}), {size}: max |diff| vs trl = {fmt(diff, '.2e')}")
    if any(r.get("noisy") for results in all_results.values() for r in results.values()):
        print("! another program competed for the CPU during this run: its figures are not reliable")
    print(METHOD)
    return {
        "settings": {
            "batch_size": BATCH,
            "lr": LR,
            "schedule": "constant",
            "max_length": MAX_LENGTH,
            "threads": THREADS,
            "precision": "fp32",
            "warmup_steps_excluded": args.warmup,
            "measured_steps": args.steps,
            "rows": n_rows,
        },
        "method": METHOD,
        "versions": versions(),
        "loss_token_check": check,
        "loss1_max_abs_diff_same_batches": agreement,
        "results": all_results,
    }


if __name__ == "__main__":
    main()
