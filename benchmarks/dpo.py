"""DPO side by side: posttrain against TRL's DPOTrainer on the same model, data, batches and settings.

    python benchmarks/dpo.py                                 # tiny and small, 2 repeats (~8 min on 2 cores)
    python benchmarks/dpo.py --sizes tiny --repeats 1        # a quick look
    python benchmarks/dpo.py --variants posttrain,posttrain-padded,trl,trl-precompute

What runs: for each model size (``tiny`` ~1.07M parameters, where per-step overhead dominates;
``small`` ~25M, where the maths dominates), each variant below and each repeat, one child process
trains W warm-up + N measured steps and prints one ``RESULT {json}`` line; the parent prints two
tables (speed and memory; agreement of the numbers) and writes everything to ``--out`` (default
``benchmarks/results/dpo.json``). One process per run, so each framework's peak RSS is its own.
Repeats are interleaved (every variant once, then every variant again) so that a burst of load
from another program hits one repeat, not one framework; both repeats are reported.

Variants:
    posttrain          posttrain's defaults: reference log-probs computed once before training, for
                       the pairs the run uses (no reference model in memory during training), packed
                       batches (the 2x32 sequences of a step share rows, no padding)
    posttrain-padded   (not run by default) data.packing=false: one sequence per row, right-padded,
                       the same padding as TRL
    trl                DPOTrainer's default: a second copy of the model kept in memory as the
                       reference, one extra no-grad forward per step
    trl-precompute     DPOTrainer with precompute_ref_log_probs=True: a reference pass over the whole
                       dataset inside the trainer's constructor, no reference model during training

Same work for everyone: ``posttrain.tasks.preference.preference_rows(n, seed=0)`` in conversational
form (prompt = [user message], chosen / rejected = [assistant message]), n = 32 x (W + N): exactly
one epoch of full batches, so "the pairs the run uses" is every pair for both frameworks. The same
saved model from ``posttrain.tasks.tiny.build_tiny``, batch 32 pairs, lr 1e-4 constant (high end of
the usual 5e-7..1e-4, so that one update moves the loss measurably), no warmup, AdamW (betas
0.9/0.999, eps 1e-8, no weight decay), clip 1.0, beta 0.1, loss sigmoid (``--kind``), max_length
128, fp32 on CPU, ``torch.set_num_threads(2)`` (``--threads``). TRL gets ``use_cpu=True, bf16=False,
gradient_checkpointing=False``, no workers, no reports, no saving, logging every 10^6 steps.

Identical batches: posttrain shuffles with its own seeded plan (``plan_batches``); the parent
computes that plan and hands TRL the rows in exactly that order with
``train_sampling_strategy="sequential"``, so step k of both frameworks sees the same 32 pairs.

What is compared (table "agreement", TRL's reference-model run as the baseline):
    loss@1          the loss of the first step. policy == reference there, so for sigmoid it is
                    log 2 = 0.693147 for both: this shows the pairing and the reference are
                    consistent, but not much else (hinge gives 1, ipo 1/(4 beta^2), as trivially).
    logps           the 64 per-sequence summed completion log-probs (32 chosen, 32 rejected) of the
                    first batch under the initial model: posttrain's from its reference cache
                    (``ref_logps.train.pt``, what its loss used), TRL's from its reference model
                    (``compute_ref_log_probs``) or its precomputed dataset columns.
    logps/chosen@1  the mean chosen log-prob each framework logged at step 1 (checks that the
                    batch each one TRAINED on is the same, not only the one we recomputed).
    grad_norm@1     the pre-clip gradient norm of step 1: the gradient of the loss, non-trivial.
    loss@2, loss@3  the loss after one and two identical updates (same batches, same AdamW steps):
                    the end-to-end check of forward, loss, backward, clipping and optimiser.
Agreement means a difference of at most 1e-5: absolute for losses, relative (|a-b| / max(1, |b|))
for log-prob sums and gradient norms, whose fp32 rounding grows with their size (a sum of ~60
log-probs of ~-5 each). Packing, a different grouping of sequences in posttrain's reference pass and
TRL's chunked LM head change the order of floating-point sums: expect ~1e-7, not bit equality.

Metrics, defined identically for every framework:
    s/step      wall time from the end of warm-up step W to the end of step W+N, divided by N
                (collation, forward(s), backward, clipping, optimiser step, per-step bookkeeping);
                one column per repeat. steps/s, setup, total and the ratios use the faster repeat.
    peak MiB    ru_maxrss of the child at the end (imports, data, model(s), reference pass,
                training), the largest over repeats. It includes freed memory that glibc's heap keeps
                (its mmap threshold adapts to the tensor sizes seen): expect ~+-100 MiB between
                repeats at ``small``; MALLOC_MMAP_THRESHOLD_=131072 shows live memory, but slows steps.
    ref s       the reference pass before training: posttrain's ``prepare`` (wrapped with a timer),
                TRL's ``_precompute_ref_logps``; "-" for TRL's default (it runs the reference model
                inside every step instead, which s/step then includes)
    setup s     from the child's start (torch imported, nothing else) to the beginning of step 1:
                importing the framework, reading and tokenising the data, loading the model(s), the
                reference pass. Imports count because posttrain imports lazily inside ``train()``
                while TRL imports up front (``import_s`` in the JSON: the top-level import alone).
    total s     from the same start to the end of the last step. posttrain's final save after it
                is not included (``call_s`` in the JSON includes it; TRL saves nothing).

On a shared machine another program's load wrecks CPU timings (torch's threads wait for each
other), so the parent waits for a quiet machine before each run and records the cores other
programs kept busy during it; a variant whose shown (fastest) repeat was disturbed is marked
``!`` (per-repeat flags in the JSON). If the machine stays busy, ``--threads 1`` degrades far less
than 2 threads sharing cores with others. TRL not installed: its variants are skipped and
posttrain's figures are still reported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
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

# The checkout this script lives in: its posttrain is the one measured, whatever an editable
# install elsewhere on the machine points at (checked in the output: `posttrain_path`).
REPO = Path(__file__).resolve().parents[1]

BATCH = 32
LR = 1e-4
BETA = 0.1
MAX_LENGTH = 128
THREADS = 2
SEED = 0
TOLERANCE = 1e-5
# Loss kinds whose maths both frameworks share. ipo: TRL averages log-ratios per token, posttrain's
# default sums them (see posttrain.losses._ipo), so only step 1 (where both are 0) is comparable.
KINDS = ("sigmoid", "hinge", "ipo", "sigmoid_norm")
SAME_MATHS_AFTER_STEP_1 = {"sigmoid", "hinge", "sigmoid_norm"}

VARIANTS: dict[str, dict] = {
    "posttrain": {"framework": "posttrain", "packing": True},
    "posttrain-padded": {"framework": "posttrain", "packing": False},
    "trl": {"framework": "trl", "precompute": False},
    "trl-precompute": {"framework": "trl", "precompute": True},
}
DEFAULT_VARIANTS = ["posttrain", "trl", "trl-precompute"]
BASELINE = "trl"  # ratios and agreement are against this variant


# ----------------------------------------------------------------------------------- children


def posttrain_config(spec: dict) -> dict:
    """The run config: the benchmark's shared settings, everything else posttrain's defaults."""
    data = {"train": spec["data"], "max_length": MAX_LENGTH, "packing": spec["packing"]}
    if not spec["packing"]:
        data["group_by_length"] = False  # keep the shuffled plan that TRL was given
    return {
        "algorithm": "dpo",
        "out": spec["run_dir"],
        "model": {"path": spec["model"]},
        "data": data,
        "train": {
            "lr": LR,
            "batch_size": BATCH,
            "max_steps": spec["warmup"] + spec["steps"],
            "schedule": "constant",
            "warmup_steps": 0,
            "max_grad_norm": 1.0,
            "precision": "fp32",
            "seed": SEED,
            "log_every": 1,
            "progress": False,
            "tensorboard": False,
        },
        "dpo": {"kind": spec["kind"], "beta": BETA},
    }


def child_posttrain(spec: dict, started: float) -> dict:
    """Train through the public API; per-step figures come back from metrics.jsonl, the first
    batch's reference log-probs from the run's reference cache. `started`: time.time() at start."""
    t_import = time.perf_counter()
    import torch

    import posttrain.train as stage
    from posttrain.engine.run import read_metrics

    import_s = time.perf_counter() - t_import
    posttrain_path = str(Path(stage.__file__).parent)
    ref_pass = []
    # train() calls the module-level `prepare` for its reference pass: time it from outside.
    if hasattr(stage, "prepare"):
        prepare = stage.prepare

        def timed_prepare(*args, **kwargs):
            t = time.perf_counter()
            prepare(*args, **kwargs)
            ref_pass.append(time.perf_counter() - t)

        stage.prepare = timed_prepare

    result = stage.train(posttrain_config(spec))
    call_s = time.time() - started
    peak = peak_rss_mib()  # before the bookkeeping below allocates anything
    records = [r for r in read_metrics(result.run_dir) if "step_s" in r]
    cumulative = [0] + [r["tokens"] for r in records]
    tokens = [b - a for a, b in zip(cumulative, cumulative[1:])]
    times = [r["time"] for r in records]
    window = measured_window(times, tokens, spec["warmup"], spec["steps"])
    cache = Path(result.run_dir) / "ref_logps.train.pt"
    refs = torch.load(cache)["refs"] if cache.exists() else None
    first = [refs[i] for i in spec["first_batch"]] if refs else None
    return {
        **window,
        "peak_rss_mib": peak,
        "steps_run": len(records),
        "posttrain_path": posttrain_path,
        "import_s": import_s,
        "ref_pass_s": sum(ref_pass) if ref_pass else None,
        "setup_s": times[0] - records[0]["step_s"] - started,  # until step 1 begins
        "total_s": times[-1] - started,
        "call_s": call_s,
        "losses": [r["loss"] for r in records],
        "grad_norms": [r["grad_norm"] for r in records],
        "logps_chosen_mean": [r.get("logps/chosen") for r in records],
        "first_batch_logps": None if first is None else [c for c, _ in first] + [r for _, r in first],
    }


def recording_trainer(base):
    """A subclass of DPOTrainer that records, per step, the loss, the pre-clip gradient norm, the
    non-padding tokens and the logged mean chosen log-prob, and times the reference precompute.
    Each record is a float of a value TRL computes anyway (one host sync on CPU: free)."""

    class RecordingDPOTrainer(base):
        def __init__(self, *args, **kwargs):
            # Set before super().__init__: the precompute pass runs inside it.
            self.step_losses: list[float] = []
            self.step_grad_norms: list[float] = []
            self.step_tokens: list[int] = []
            self.step_positions: list[int] = []
            self.step_logps_chosen: list[float] = []
            self.precompute_s: dict[str, float] = {}
            super().__init__(*args, **kwargs)

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.step_tokens.append(int(inputs["attention_mask"].sum()))
            self.step_positions.append(inputs["input_ids"].numel())
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.step_losses.append(float(loss))
            self.step_logps_chosen.append(self._metrics["train"]["logps/chosen"][-1])
            return loss

        def _clip_grad_norm(self, model):
            norm = super()._clip_grad_norm(model)
            self.step_grad_norms.append(float(norm))
            return norm

        def _precompute_ref_logps(self, dataset, name, batch_size):
            t = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            self.precompute_s[name] = time.perf_counter() - t
            return out

    return RecordingDPOTrainer


def trl_first_batch_logps(trainer, precompute: bool) -> list[float]:
    """Summed completion log-probs of the first batch's 32 chosen then 32 rejected sequences under
    the initial model, by TRL's own code: its precomputed columns, or its untouched reference model."""
    rows = trainer.train_dataset.select(range(BATCH))
    if precompute:
        return list(rows["ref_chosen_logps"]) + list(rows["ref_rejected_logps"])
    batch = trainer.data_collator([rows[i] for i in range(BATCH)])
    chosen, rejected = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    return chosen.tolist() + rejected.tolist()


def trl_sequences(dataset) -> dict:
    """Token ids (sha256) and completion lengths of TRL's processed pairs, chosen then rejected per pair."""
    ids, loss_tokens = [], []
    for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"]):
        ids += [p + c, p + r]
        loss_tokens += [len(c), len(r)]
    return {"ids_sha256": ids_digest(ids), "loss_tokens": loss_tokens}


def child_trl(spec: dict, started: float) -> dict:
    """DPOTrainer in its best CPU settings, the rows in posttrain's batch order, timed by a callback
    (time.perf_counter(), like `started`)."""
    t_import = time.perf_counter()
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    import_s = time.perf_counter() - t_import
    precompute = spec["precompute"]
    args = DPOConfig(
        output_dir=spec["run_dir"],
        max_steps=spec["warmup"] + spec["steps"],
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=BETA,
        loss_type=[spec["kind"]],
        max_length=MAX_LENGTH,
        precompute_ref_log_probs=precompute,
        train_sampling_strategy="sequential",  # the parent wrote the rows in posttrain's batch order
        **TRL_CPU_ARGS,
        seed=SEED,
    )
    clock = trl_step_clock()
    rows = [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in read_jsonl(spec["data"])]
    trainer = recording_trainer(DPOTrainer)(
        model=spec["model"], args=args, train_dataset=Dataset.from_list(rows), callbacks=[clock]
    )
    trainer.train()
    peak = peak_rss_mib()
    window = measured_window(clock.end_times, trainer.step_tokens, spec["warmup"], spec["steps"])
    w, n = spec["warmup"], spec["steps"]
    return {
        **window,
        "peak_rss_mib": peak,
        "steps_run": len(clock.end_times),
        "import_s": import_s,
        "ref_pass_s": trainer.precompute_s.get("train"),
        "setup_s": clock.begin_times[0] - started,
        "total_s": clock.end_times[-1] - started,
        "losses": trainer.step_losses,
        "grad_norms": trainer.step_grad_norms,
        "logps_chosen_mean": trainer.step_logps_chosen,
        "first_batch_logps": trl_first_batch_logps(trainer, precompute),
        "fill": window["measured_tokens"] / sum(trainer.step_positions[w : w + n]),
        "reference_model_in_memory": trainer.ref_model is not None,
        "optim": getattr(args.optim, "value", str(args.optim)),
        "model_dtype": str(trainer.model.dtype),
        "sequences": trl_sequences(trainer.train_dataset),
    }


def child_main(spec: dict) -> None:
    setup_child(spec["threads"])
    os.environ["TQDM_DISABLE"] = "1"  # TRL's precompute progress bar
    # Both clocks at the same instant: posttrain logs time.time(), the TRL callback perf_counter().
    if spec["framework"] == "posttrain":
        emit_result(child_posttrain(spec, time.time()))
    else:
        emit_result(child_trl(spec, time.perf_counter()))


# ------------------------------------------------------------------------------------- parent


def prepare(work: Path, size: str, n_rows: int) -> dict:
    """One size's model, rows (posttrain's file), posttrain's epoch-0 batch plan and TRL's file in that order."""
    from transformers import AutoTokenizer

    from posttrain.data.batching import plan_batches
    from posttrain.tasks.preference import preference_rows
    from posttrain.tasks.tiny import build_tiny

    model = str(build_tiny(work / f"model-{size}", size=size, seed=SEED))
    rows = [
        {k: row[k] for k in ("prompt", "chosen", "rejected")} for row in preference_rows(n_rows, seed=SEED)
    ]
    tokenizer = AutoTokenizer.from_pretrained(model)
    pairs = encode_pairs(rows, tokenizer)
    # posttrain's loop plans epoch 0 like this (no length grouping: packed, or padded with
    # group_by_length=false); the parent's copy is checked by comparing the first batch's log-probs.
    plan = plan_batches([len(c) + len(r) for c, r in pairs], BATCH, seed=SEED, epoch=0)
    order = [i for batch in plan for i in batch]
    files = {"posttrain": work / f"pairs-{size}.jsonl", "trl": work / f"pairs-{size}-trl-order.jsonl"}
    for name, ordered in (("posttrain", rows), ("trl", [rows[i] for i in order])):
        files[name].write_text("".join(json.dumps(row) + "\n" for row in ordered))
    return {
        "model": model,
        "files": {k: str(v) for k, v in files.items()},
        "plan": plan,
        "order": order,
        "pairs": pairs,
        "pad_id": tokenizer.pad_token_id,
    }


def encode_pairs(rows: list[dict], tokenizer) -> list:
    """posttrain's encoding of each pair, (chosen Example, rejected Example), as the DPO stage does it."""
    from posttrain.data.templates import encode_sft_row

    def one(row: dict, side: str):
        return encode_sft_row(
            {"prompt": row["prompt"], "completion": row[side]}, tokenizer, max_length=MAX_LENGTH
        )

    return [(one(row, "chosen"), one(row, "rejected")) for row in rows]


def check_sequences(trl_sequences: dict | None, prep: dict) -> dict:
    """posttrain's token ids and loss tokens against TRL's processed dataset, sequence by sequence."""
    mine_ids, mine_loss = [], []
    for i in prep["order"]:
        for ex in prep["pairs"][i]:
            mine_ids.append(ex.input_ids)
            mine_loss.append(ex.num_loss_tokens)
    check = {"sequences": len(mine_ids), "max_tokens": max(len(x) for x in mine_ids)}
    if trl_sequences is None:
        return {**check, "verdict": "TRL not run: posttrain side only"}
    same_ids = ids_digest(mine_ids) == trl_sequences["ids_sha256"]
    differ = sum(a != b for a, b in zip(mine_loss, trl_sequences["loss_tokens"]))
    differ += abs(len(mine_loss) - len(trl_sequences["loss_tokens"]))
    check.update(same_token_ids=same_ids, sequences_with_different_loss_tokens=differ)
    ok = same_ids and differ == 0
    check["verdict"] = "identical" if ok else "DIFFERENT: the frameworks do not train on the same tokens"
    return check


def fill_of_posttrain(prep: dict, spec: dict) -> float:
    """Real tokens / token positions of posttrain's measured batches, rebuilt with its collate."""
    from posttrain.data.batching import collate

    tokens = positions = 0
    for ix in prep["plan"][spec["warmup"] : spec["warmup"] + spec["steps"]]:
        seqs = [prep["pairs"][i][0] for i in ix] + [prep["pairs"][i][1] for i in ix]
        batch = collate(seqs, pad_id=prep["pad_id"], packing=spec["packing"], max_length=MAX_LENGTH)
        tokens += int((batch["example_index"] >= 0).sum())
        positions += batch["input_ids"].numel()
    return tokens / positions


def summarise(reps: list[dict]) -> dict:
    """One variant's repeats -> its row: every repeat's s/step, the fastest one's figures for the table
    and the ratios, the largest peak RSS."""
    ok = [r for r in reps if "error" not in r]
    if not ok:
        return {"error": reps[-1].get("error"), "repeats": reps}
    best = min(ok, key=lambda r: r["s_per_step"])
    # Timings of the fastest (least disturbed) repeat; every repeat's in the *_repeats lists.
    row = {k: v for k, v in best.items() if k not in ("noisy", "other_cores", "busy_cores_before")}
    row.update(
        s_per_step_repeats=[r["s_per_step"] for r in ok],
        steps_per_s=1 / best["s_per_step"],
        peak_rss_mib=max(r["peak_rss_mib"] for r in ok),
        peak_rss_mib_repeats=[r["peak_rss_mib"] for r in ok],
        setup_s_repeats=[r["setup_s"] for r in ok],
        total_s_repeats=[r["total_s"] for r in ok],
        noisy=[r["noisy"] for r in ok],
        noisy_used=best["noisy"],  # the repeat whose figures are shown was disturbed
        other_cores_repeats=[r.get("other_cores") for r in ok],
        busy_cores_before_repeats=[r.get("busy_cores_before") for r in ok],
        # Same seed, same data: repeats must give the same losses (a check on determinism).
        repeats_same_losses=all(r["losses"] == ok[0]["losses"] for r in ok),
    )
    return row


def agreement(row: dict, base: dict, kind: str) -> dict:
    """Largest difference of each compared quantity from the baseline, and whether all are within
    tolerance. Log-prob sums (~-5 per token over up to ~60 tokens) and gradient norms are compared
    relatively, |a - b| / max(1, |b|): fp32 rounding error grows with the magnitude. Losses absolutely."""

    def diff(key: str, steps: range, relative: bool = False) -> float | None:
        a, b = row.get(key) or [], base.get(key) or []
        pairs = [(a[i], b[i]) for i in steps if i < min(len(a), len(b)) and None not in (a[i], b[i])]
        scale = (lambda y: max(1.0, abs(y))) if relative else (lambda y: 1.0)
        return max((abs(x - y) / scale(y) for x, y in pairs), default=None)

    same_maths = kind in SAME_MATHS_AFTER_STEP_1  # else: different gradients, different updates
    logps = len(row.get("first_batch_logps") or []) == len(base.get("first_batch_logps") or [])
    out = {
        "loss@1": diff("losses", range(1)),
        "logps (rel)": diff("first_batch_logps", range(2 * BATCH), relative=True) if logps else None,
        "logps/chosen@1 (rel)": diff("logps_chosen_mean", range(1), relative=True),
        "grad_norm@1 (rel)": diff("grad_norms", range(1), relative=True) if same_maths else None,
        "loss@2": diff("losses", range(1, 2)) if same_maths else None,
        "loss@3": diff("losses", range(2, 3)) if same_maths else None,
    }
    out["all_within_tolerance"] = all(v is None or v <= TOLERANCE for v in out.values())
    return out


def print_tables(all_results: dict, kind: str) -> None:
    head = (
        f"{'size':6} {'variant':17} {'s/step (repeats)':>18} {'steps/s':>8} {'fill':>5} {'peak MiB':>9} "
        f"{'ref s':>6} {'setup s':>8} {'total s':>8}  | vs TRL: speed  memory"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for size, results in all_results.items():
        for name, r in results.items():
            if "error" in r:
                print(f"{size:6} {name:17} error: {r['error']}")
                continue
            label = name + ("!" if r["noisy_used"] else "")
            reps = " ".join(f"{x:.4f}" for x in r["s_per_step_repeats"])
            print(
                f"{size:6} {label:17} {reps:>18} {r['steps_per_s']:8.2f} {fmt(r.get('fill'), '5.2f'):>5} "
                f"{r['peak_rss_mib']:9.0f} {fmt(r['ref_pass_s'], '6.2f'):>6} {r['setup_s']:8.2f} "
                f"{r['total_s']:8.2f}  |  {fmt(r.get('speed_ratio'), '5.2f')}x {fmt(r.get('memory_ratio'), '6.2f')}x"
            )
    keys = ["loss@1", "logps (rel)", "logps/chosen@1 (rel)", "grad_norm@1 (rel)", "loss@2", "loss@3"]
    head = f"{'size':6} {'variant':17} {'loss@1':>9} {'loss@2':>9} " + " ".join(f"{k:>20}" for k in keys)
    print(
        f"\nagreement with TRL (max |diff|, tolerance {TOLERANCE:g}; kind {kind})\n{head}\n" + "-" * len(head)
    )
    for size, results in all_results.items():
        for name, r in results.items():
            if "error" in r:
                continue
            losses = r["losses"] + [None, None]
            cells = " ".join(f"{fmt(r.get('agreement', {}).get(k), '20.2e'):>20}" for k in keys)
            verdict = r.get("agreement", {}).get("all_within_tolerance")
            mark = "" if verdict is None else ("  ok" if verdict else "  DIFFERENT")
            print(f"{size:6} {name:17} {fmt(losses[0], '9.6f')} {fmt(losses[1], '9.6f')} {cells}{mark}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="tiny,small", help="comma-separated model sizes (tiny, small)")
    p.add_argument(
        "--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, from {list(VARIANTS)}"
    )
    p.add_argument("--kind", default="sigmoid", choices=KINDS, help="loss kind (both frameworks)")
    p.add_argument("--steps", type=int, default=None, help="measured steps N (default: 20 tiny, 3 small)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps W, excluded from s/step")
    p.add_argument(
        "--threads",
        type=int,
        default=THREADS,
        help="torch intra-op threads per child (1: robust to a busy machine)",
    )
    p.add_argument("--repeats", type=int, default=2, help="runs of every (size, variant), interleaved")
    p.add_argument("--out", default="benchmarks/results/dpo.json", help="JSON results file")
    p.add_argument("--work", default=None, help="keep models, data and runs here (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per child run")
    p.add_argument(
        "--wait-quiet", type=float, default=60, help="seconds to wait for a quiet machine before each run"
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


DEFAULT_STEPS = {"tiny": 20, "small": 3}


def use_this_checkout() -> None:
    if (REPO / "posttrain" / "__init__.py").exists() and str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def main(argv=None) -> None:
    args = parse_args(argv)
    use_this_checkout()
    if args.child:
        return child_main(json.loads(args.child))
    bench_main(args, VARIANTS, run_all, "dpo")


def run_all(args, sizes: list[str], variants: list[str], work: Path) -> dict:
    """Prepare, run every (size, variant) `repeats` times, compare, print; returns the JSON report."""
    steps = {size: args.steps or DEFAULT_STEPS.get(size, 4) for size in sizes}
    # Exactly one epoch of full batches per size: "the pairs the run uses" are all the pairs, for
    # posttrain's reference pass and TRL's precompute alike.
    prep = {size: prepare(work, size, BATCH * (args.warmup + steps[size])) for size in sizes}
    raw: dict[str, dict[str, list[dict]]] = {s: {v: [] for v in variants} for s in sizes}
    for rep in range(args.repeats):
        for size in sizes:
            for name in variants:
                spec = {
                    **VARIANTS[name],
                    "kind": args.kind,
                    "model": prep[size]["model"],
                    "data": prep[size]["files"][VARIANTS[name]["framework"]],
                    "run_dir": str(work / f"run-{size}-{name}-{rep}"),
                    "warmup": args.warmup,
                    "steps": steps[size],
                    "first_batch": prep[size]["plan"][0],
                    "threads": args.threads,
                }
                label = f"[{size}] {name} (repeat {rep + 1}/{args.repeats})"
                raw[size][name].append(run_quietly(__file__, spec, label, args))

    all_results: dict[str, dict] = {}
    checks = {}
    for size in sizes:
        results = {name: summarise(reps) for name, reps in raw[size].items()}
        base = results.get(BASELINE, {})
        trl_sequences = None
        for name, r in results.items():
            if "error" in r:
                continue
            if VARIANTS[name]["framework"] == "posttrain":
                measured = {**VARIANTS[name], "warmup": args.warmup, "steps": steps[size]}
                r["fill"] = fill_of_posttrain(prep[size], measured)
            trl_sequences = r.pop("sequences", None) or trl_sequences
            r["speed_ratio"] = ratio(r["steps_per_s"], base.get("steps_per_s"))
            r["memory_ratio"] = ratio(r["peak_rss_mib"], base.get("peak_rss_mib"))
            if base and "error" not in base:
                r["agreement"] = agreement(r, base, args.kind)
        all_results[size] = results
        checks[size] = check_sequences(trl_sequences, prep[size])
        print(
            f"\n[{size}] token ids and loss tokens per sequence: {checks[size]['verdict']}; {json.dumps(checks[size])}"
        )

    print_tables(all_results, args.kind)
    if any(r.get("noisy_used") for res in all_results.values() for r in res.values()):
        print("! another program competed for the CPU during this run: its figures are not reliable")
    return {
        "settings": {
            "batch_pairs": BATCH,
            "lr": LR,
            "beta": BETA,
            "kind": args.kind,
            "schedule": "constant",
            "max_length": MAX_LENGTH,
            "threads": args.threads,
            "precision": "fp32",
            "warmup_steps_excluded": args.warmup,
            "measured_steps": steps,
            "pairs": {size: len(prep[size]["order"]) for size in sizes},
            "repeats": args.repeats,
            "tolerance": TOLERANCE,
        },
        "method": __doc__,
        "versions": versions(),
        "sequence_check": checks,
        "first_batch": {size: prep[size]["plan"][0] for size in sizes},
        "results": all_results,
    }


if __name__ == "__main__":
    main()
