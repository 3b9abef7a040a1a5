"""On-policy distillation into the tiny model vs plain SFT of it: held-out accuracy per CPU-second of training.

    python benchmarks/distill.py                                 # the README's run: 3 seeds, 120 CPU-s an arm
    python benchmarks/distill.py --teacher-size mid --teacher-steps 1500 --teacher-lr 1e-3   # a bigger teacher
    python benchmarks/distill.py --seeds 0 --budget 60 --work /tmp/distill  # a quick look

What runs:

1. **Student start**: the quickstart's base model (the quickstart pipeline's ``base`` stage: the tiny 1.07M
   model pretrained briefly on the arithmetic corpus; built or reused in ``--quickstart``). It writes the chat format poorly:
   both arms have to teach it the task.
2. **Teacher**: the same tokenizer, a random model (``--teacher-size``: ``tiny`` = the student's size with
   another init, the default; ``mid`` = hidden 256, 6 layers, 6.33M parameters; ``small`` = the 25M model of
   ``tasks.tiny.SIZES``) trained by SFT from its random init on ``arithmetic.sft_rows`` of ``--levels``
   (default add2; ``--teacher-steps`` x 64 rows, ``--teacher-lr`` constant after 20 warm-up steps). Built
   once and cached in ``--work``; its CPU time is charged to neither arm. A bigger teacher did not fit this
   machine's minutes: mid reached 3.7% held out on add2 + sub2 after 400 steps at lr 2e-3 and 10.0% on add2
   after 600 steps at lr 1e-3 (10 min), where the tiny one reaches 73% in 400 steps (3 min).
3. **Arms**, from the student start, each for ``--budget`` CPU-seconds of training (`train.max_seconds` on the
   process's CPU clock, `time.process_time`, so that another program's load on a shared machine does not
   change the budget; held-out evaluation excluded), once per seed:
     sft      SFT on the same rows as the teacher (the ground-truth answers), batch 64, lr 2e-3 constant
     distill  on-policy distillation (`algorithm: distill`, reverse KL, the teacher in the same process) on
              prompts of the same levels: 16 prompts x 4 samples of <= 6 tokens a step (64 sequences, as
              SFT's 64 rows), lr ``--distill-lr``
     distill_jsd  the same with GKD's generalised JSD (beta 0.5) over the full next-token distributions at
              each position of the student's samples instead of the sampled per-token reverse KL
   A checkpoint every ``--save-every`` steps (its arm's own step counts; distillation steps cost more CPU).
4. **Held out**: greedy exact match of every checkpoint on ``arithmetic.eval_rows(levels)`` (add2: 400
   problems), against the CPU-seconds of training up to it; the table gives the accuracy at a few CPU marks
   (the last checkpoint at or before each) per seed and the mean.

Writes ``distill.json`` and ``distill.png`` into ``--work``. Run with ``OMP_NUM_THREADS=1`` (one thread: the
CPU clock is then the work done).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from posttrain.engine import loop  # noqa: E402
from posttrain.engine.run import read_metrics  # noqa: E402
from posttrain.tasks import arithmetic  # noqa: E402
from posttrain.train import train  # noqa: E402

TEACHERS = {
    "mid": {"hidden_size": 256, "num_hidden_layers": 6, "num_attention_heads": 4, "intermediate_size": 1024},
    "small": {},  # tasks.tiny.SIZES["small"]
    "tiny": {},  # the student's own size, another init (seed 1): a teacher by its training only
}


DISTILL_LOSSES = {"distill": "reverse_kl", "distill_jsd": "jsd"}  # the distillation arms' distill.loss


def cpu_clock() -> None:
    """The loop's step clock (step_s, train.max_seconds, train_seconds) becomes this process's CPU time."""
    loop.time = types.SimpleNamespace(perf_counter=time.process_time)


def task_files(work: Path, levels: tuple[str, ...]) -> dict[str, Path]:
    """SFT rows and prompts of `levels` (none of them held out), written once into `work`."""
    from posttrain.data.io import write_jsonl

    tag = "-".join(levels)
    files = {"sft": work / f"sft-{tag}.jsonl", "prompts": work / f"prompts-{tag}.jsonl"}
    if not files["sft"].exists():
        write_jsonl(files["sft"], arithmetic.sft_rows(20_000, levels=levels))
        write_jsonl(files["prompts"], arithmetic.prompt_rows(20_000, levels=levels))
    return files


def build_teacher(work: Path, tiny: Path, data: dict, size: str, steps: int, lr: float) -> Path:
    from transformers import AutoTokenizer

    from posttrain.tasks.tiny import build_model

    out = work / f"teacher-{size}-{data['sft'].stem}-{steps}-lr{lr:g}"
    if (out / "final").is_dir():
        return out / "final"
    init = work / f"teacher-{size}-init"
    if not (init / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(tiny)
        kind, overrides = ("small", {}) if size == "small" else ("tiny", TEACHERS[size])
        model = build_model(tokenizer, kind, seed=1 if size == "tiny" else 0, **overrides)
        model.save_pretrained(init)
        tokenizer.save_pretrained(init)
    t0 = time.time()
    train(sft_config(init, data, out, steps=steps, seed=0, budget=None, lr=lr), overwrite=True)
    print(f"[teacher] {size}, {steps} SFT steps in {time.time() - t0:.0f}s", flush=True)
    return out / "final"


def budgeted(*, lr, steps, budget, seed, save_every) -> dict:
    """The train options both arms share: a step cap or a CPU-second budget, every checkpoint kept (the
    curve is read from them), a metrics line per step, no progress bar."""
    return {
        "lr": lr,
        "max_steps": steps or 100_000,
        "max_seconds": budget,
        "seed": seed,
        "save_every": save_every,
        "keep_checkpoints": 1000,
        "log_every": 1,
        "progress": False,
        "tensorboard": False,
    }


def sft_config(
    model: Path, data: dict, out: Path, *, steps: int | None, seed: int, budget, save_every=None, lr=2e-3
) -> dict:
    return {
        "algorithm": "sft",
        "out": str(out),
        "model": {"path": str(model)},
        "data": {"train": str(data["sft"]), "max_length": 64},
        "train": {
            **budgeted(lr=lr, steps=steps, budget=budget, seed=seed, save_every=save_every),
            "betas": [0.9, 0.98],
            "batch_size": 64,
            "schedule": "constant",
            "warmup_steps": 20,
        },
        "monitor": {"enabled": False},
    }


def distill_config(
    student: Path,
    teacher: Path,
    data: dict,
    out: Path,
    *,
    seed: int,
    budget,
    save_every,
    lr,
    loss="reverse_kl",
) -> dict:
    return {
        "algorithm": "distill",
        "out": str(out),
        "model": {"path": str(student)},
        "distill": {"teacher": str(teacher), "loss": loss, **({"beta": 0.5} if loss == "jsd" else {})},
        "data": {"train": str(data["prompts"]), "max_length": 64},
        "rollout": {"prompts_per_step": 16, "group_size": 4, "max_new_tokens": 6, "temperature": 1.0},
        "rl": {"rewards": ["exact_match"]},
        "train": budgeted(lr=lr, steps=None, budget=budget, seed=seed, save_every=save_every),
        "monitor": {"enabled": False},
    }


def held_out(model_dir: Path, weights: Path | None, rows: list[dict]) -> float:
    """Greedy exact match of `model_dir`'s model, with a checkpoint's `weights` loaded when given."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.eval.generation import accuracy

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if weights is not None:
        missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise RuntimeError(f"{weights}: does not fit {model_dir} ({missing[:3]}, {unexpected[:3]})")
        model.tie_weights()
    return accuracy(model.eval(), AutoTokenizer.from_pretrained(model_dir), rows, max_new_tokens=6)


def curve(
    run_dir: Path, start_dir: Path, start_acc: float, rows: list[dict]
) -> list[tuple[float, int, float]]:
    """[(CPU-seconds of training, step, held-out accuracy)] at step 0 and every checkpoint."""
    seconds, total = {}, 0.0
    for m in read_metrics(run_dir):
        if "step_s" in m:
            total += m["step_s"]
            seconds[m["step"]] = total
    points = [(0.0, 0, start_acc)]
    for ckpt in sorted((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1])):
        step = int(ckpt.name.split("-")[1])
        points.append((round(seconds[step], 1), step, held_out(start_dir, ckpt / "model.safetensors", rows)))
    if (run_dir / "final").is_dir() and max(seconds) != points[-1][
        1
    ]:  # the last step, past the last checkpoint
        points.append((round(total, 1), max(seconds), held_out(run_dir / "final", None, rows)))
    return points


def at(points, cpu_s: float) -> float:
    """Accuracy of the last checkpoint at or before `cpu_s` CPU-seconds (within 2%: the step that passes
    train.max_seconds ends a little after it)."""
    return [acc for s, _, acc in points if s <= cpu_s * 1.02][-1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--work", type=Path, default=Path("runs/bench-distill"))
    p.add_argument(
        "--quickstart", type=Path, default=Path("runs/quickstart"), help="Its data and base model."
    )
    p.add_argument("--teacher-size", choices=sorted(TEACHERS), default="tiny")
    p.add_argument("--teacher-steps", type=int, default=400)
    p.add_argument("--teacher-lr", type=float, default=2e-3)
    p.add_argument(
        "--levels", nargs="+", default=["add2"], help="Task levels: training rows and held-out set."
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--budget", type=float, default=120.0, help="CPU-seconds of training per arm and seed.")
    p.add_argument("--save-every", nargs=2, type=int, default=[150, 75], metavar=("SFT", "DISTILL"))
    p.add_argument("--distill-lr", type=float, default=1e-3)
    p.add_argument("--arms", nargs="+", default=["sft", "distill"], choices=["sft", *DISTILL_LOSSES])
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    from benchmarks.objectives import build_start

    paths = build_start(args.quickstart, until="base")
    student = paths["base"]
    levels = tuple(args.levels)
    rows, data = arithmetic.eval_rows(levels), task_files(args.work, levels)
    teacher = build_teacher(
        args.work, paths["tiny"], data, args.teacher_size, args.teacher_steps, args.teacher_lr
    )
    from transformers import AutoModelForCausalLM

    from posttrain.models import count_parameters

    t_params = count_parameters(AutoModelForCausalLM.from_pretrained(teacher))[1]
    s_params = count_parameters(AutoModelForCausalLM.from_pretrained(student))[1]
    teacher_acc, start_acc = held_out(teacher, None, rows), held_out(student, None, rows)
    print(
        f"teacher {t_params / 1e6:.2f}M params: held-out {teacher_acc:.3f}; "
        f"student {s_params / 1e6:.2f}M params (quickstart base): {start_acc:.3f}",
        flush=True,
    )
    cpu_clock()
    out_json = args.work / "distill.json"
    saved = json.loads(out_json.read_text()) if out_json.exists() else {}
    results = saved.get("results", {}) if saved.get("teacher") == str(teacher) else {}
    for seed in args.seeds:
        for arm in args.arms:
            if str(seed) in results.get(arm, {}):
                continue
            out = args.work / f"{arm}-seed{seed}"
            every = args.save_every[0] if arm == "sft" else args.save_every[1]
            cfg = (
                sft_config(student, data, out, steps=None, seed=seed, budget=args.budget, save_every=every)
                if arm == "sft"
                else distill_config(student, teacher, data, out, seed=seed, budget=args.budget,
                                    save_every=every, lr=args.distill_lr, loss=DISTILL_LOSSES[arm])
            )  # fmt: skip
            t0 = time.time()
            res = train(cfg, overwrite=True)
            points = curve(res.run_dir, student, start_acc, rows)
            results.setdefault(arm, {})[str(seed)] = points
            print(f"[{arm} seed {seed}] {time.time() - t0:.0f}s wall: " + ", ".join(
                f"{s:.0f}s/{st} -> {a:.3f}" for s, st, a in points), flush=True)  # fmt: skip
            out_json.write_text(json.dumps({
                "teacher": str(teacher), "teacher_params": t_params, "teacher_acc": teacher_acc,
                "student_params": s_params, "start_acc": start_acc, "budget": args.budget, "results": results,
            }, indent=1))  # fmt: skip
    marks = [args.budget * f for f in (0.25, 0.5, 0.75, 1.0)]
    print(
        f"\nheld-out exact match ({'+'.join(levels)}, greedy) at CPU-seconds of training; teacher {teacher_acc:.3f}"
    )
    print(f"{'arm':<9}{'seed':>5}" + "".join(f"{m:>9.0f}s" for m in marks) + f"{'steps':>8}")
    for arm, seeds in results.items():
        for seed, points in sorted(seeds.items()):
            print(
                f"{arm:<9}{seed:>5}"
                + "".join(f"{at(points, m):>10.3f}" for m in marks)
                + f"{points[-1][1]:>8}"
            )
        mean = [statistics.mean(at(pts, m) for pts in seeds.values()) for m in marks]
        print(f"{arm:<9}{'mean':>5}" + "".join(f"{v:>10.3f}" for v in mean))
    plot(results, teacher_acc, args.work / "distill.png")
    print(f"\n{out_json}\n{args.work / 'distill.png'}")


def plot(results: dict, teacher_acc: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for color, (arm, seeds) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], results.items()):
        for i, points in enumerate(seeds.values()):
            ax.plot([s for s, _, _ in points], [a for _, _, a in points], "o-", color=color, ms=3, alpha=0.6,
                    label=arm if i == 0 else None)  # fmt: skip
    ax.axhline(teacher_acc, color="gray", ls="--", lw=1, label="teacher")
    ax.set_xlabel("CPU-seconds of training (one thread)")
    ax.set_ylabel("held-out exact match, greedy")
    ax.set_title("Tiny student: on-policy distillation vs SFT")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
