"""Multi-turn rollouts: KV carry-over across turns vs re-prefilling the conversation, and TRL's tool loop.

    python benchmarks/agent_kv.py                         # 3, 5, 8 turns; posttrain with and without carry; TRL
    python benchmarks/agent_kv.py --turns 5 --repeats 1 --no-trl      # a quick look

The same episodes on every side, so that only the machinery differs:

- **Model and template**: a random ``small`` Qwen2 (``posttrain.tasks.tiny.build_model``, ~25M parameters)
  over the tests' byte-level BPE (tests/chatml.py) with TRL's Qwen3-Instruct-2507 chat template (the one
  its tool parser knows; tools in the system prompt, results as ``<tool_response>`` user turns).
- **Turns**: a forward hook adds 1e4 to one logit chosen by the last input token, so every assistant turn
  is the same script: 30 filler tokens (added tokens ``<w0>``..``<w29>``, standing for a turn's reasoning),
  one added token holding ``<tool_call>{"name": "noop", "arguments": {}}</tool_call>``, then the end of
  turn. The transformer does all its usual work; only the choice is forced, so the tokens (and the
  prefill) are identical everywhere and log-probs are ~0.
- **Tool**: ``noop()`` returns the same ~60-token text every call. An episode has T assistant turns: TRL's
  ``max_tool_calling_iterations = T - 1`` (T generations), posttrain ``max_turns = T`` (which also runs the
  last turn's call: one tool call more than TRL, counted against posttrain).
- B episodes (default 16) per rollout, fp32 on CPU, ``torch.set_num_threads(--threads)``.

What is timed: one rollout, wall time from the first prompt to the last episode's tokens: for posttrain
``EpisodeRunner.run`` (turn waves on ``HFEngine``, tools, grading, the render check); for TRL
``GRPOTrainer._generate`` (its tool loop: ``model.generate`` on prompt + completion + tool ids each
iteration, no KV reuse, no sampling log-probs). The training step after the rollout is the same work in
both and is left out. ``prefill tok`` counts prompt tokens fed to the model at the start of each turn.
Reported: the median of --repeats rollouts, run round robin after one warm-up rollout per side, in wall
and in this process's CPU seconds (with one torch thread, the CPU time is the steadier figure when other
programs load the machine), episodes/s, and the ratios to carry-over.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _common import OFFLINE_ENV, busy_cores, fmt  # noqa: E402

FILLER = 30
CALL = '<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>'
RESULT = " ".join(f"row {i}: item {i * 7} price {i * 13}" for i in range(8))
PROMPT = [{"role": "user", "content": "Call noop until told to stop, then answer."}]


def noop() -> str:
    """Do nothing and return the rows."""
    return RESULT


def build(size: str):
    """(tokenizer, model, chain): the BPE with the filler and call tokens added, a random Qwen2, and the
    forced next token of each token that starts or continues a turn."""
    import torch
    from chatml import chatml_tokenizer
    from tokenizers import AddedToken
    from trl.chat_template_utils import qwen3_instruct_2507_chat_template

    from posttrain.tasks.tiny import build_model

    tok = chatml_tokenizer(qwen3_instruct_2507_chat_template)
    words = [f"<w{i}>" for i in range(FILLER)]
    tok.add_tokens([AddedToken(w, normalized=False) for w in words] + [AddedToken(CALL, normalized=False)])
    opening = tok.apply_chat_template(PROMPT, tools=[noop], add_generation_prompt=True, tokenize=False)
    gen_last = tok(opening, add_special_tokens=False)["input_ids"][-1]
    script = [gen_last, *tok.convert_tokens_to_ids(words), tok.convert_tokens_to_ids(CALL), tok.eos_token_id]
    chain = dict(zip(script[:-1], script[1:]))
    model = build_model(tok, size, arch="qwen2", max_position_embeddings=4096, seed=0).eval()
    next_V = torch.full((model.config.vocab_size,), -1, dtype=torch.long)
    for a, b in chain.items():
        next_V[a] = b

    def force(module, args, kwargs, out):
        ids_BL = kwargs.get("input_ids", args[0] if args else None)
        target_B = next_V[ids_BL[:, -1]]
        rows = (target_B >= 0).nonzero().squeeze(1)
        out.logits[rows, -1, target_B[rows]] += 1e4
        return out

    model.register_forward_hook(force, with_kwargs=True)
    return tok, model


def relay_env(turns: int):
    from transformers.utils import get_json_schema

    from posttrain.agents.env import Grade, ToolEnv, tool

    class Relay(ToolEnv):
        name = "relay"

        def reset(self):
            return [dict(m) for m in PROMPT]

        @tool
        def noop(self) -> str:
            """Do nothing and return the rows."""
            return RESULT

        @property
        def tools(self) -> list[dict]:  # the schema TRL renders (transformers' get_json_schema): same prompt
            return [get_json_schema(noop)]

        def grade(self):
            return Grade(float(self.n_calls.get("noop", 0) == turns), True)

    return Relay


def posttrain_rollout(tok, model, turns: int, episodes: int, carry: bool) -> dict:
    from posttrain.agents.runner import Budgets, EpisodeRunner
    from posttrain.rollout.engine import HFEngine, Sampling

    runner = EpisodeRunner(
        tok,
        "hermes",
        budgets=Budgets(
            max_turns=turns, max_new_tokens=FILLER + 8, max_tool_tokens=256, max_tool_calls=64, max_repeats=99
        ),
        sampling=Sampling(temperature=1.0, seed=0),
        kv_carry=carry,
    )
    engine = HFEngine(model, tok)
    t0, cpu0 = time.perf_counter(), time.process_time()
    eps = runner.run(engine, relay_env(turns), [{"id": str(i)} for i in range(episodes)])
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    done = [e for e in eps if sum(t.sampled for t in e.turns) == turns and e.stop == "max_turns"]
    assert len(done) == episodes, [(e.stop, e.failure, e.error) for e in eps][:3]
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "prefill_tokens": engine.prefill_tokens,
        "gen_seconds": runner.seconds["generate"],
        "tokens": [e.prompt_ids + e.ids for e in eps],
    }


def trl_trainer(tok, model, turns: int, episodes: int, work: Path):
    import os

    os.environ.update(OFFLINE_ENV | {"TRL_EXPERIMENTAL_SILENCE": "1"})
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(work / f"trl-{turns}"),
        per_device_train_batch_size=episodes,
        num_generations=2,
        max_completion_length=4000,
        max_tool_calling_iterations=turns - 1,
        temperature=1.0,
        report_to=[],
        use_cpu=True,
        bf16=False,
        logging_steps=1000,
        save_strategy="no",
        seed=0,
    )
    data = Dataset.from_list([{"prompt": PROMPT}] * episodes)
    return GRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **_: [0.0] * len(completions),
        args=args,
        train_dataset=data,
        processing_class=tok,
        tools=[noop],
    )


def trl_rollout(trainer, turns: int, episodes: int) -> dict:
    import torch

    prefill = [0]

    def count(module, args, kwargs):  # a prefill is the first forward of a generate call: no cache yet
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if cache is None or cache.get_seq_length() == 0:
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            prefill[0] += int(mask.sum()) if mask is not None else ids.numel()

    # what _generate_and_score_completions sets up before it calls _generate: each rollout's tools
    trainer._sync_tool_dicts = [{"noop": noop} for _ in range(episodes)]
    trainer._async_tool_dicts = [{} for _ in range(episodes)]
    handle = trainer.model.register_forward_pre_hook(count, with_kwargs=True)
    trainer.model.eval()
    t0, cpu0 = time.perf_counter(), time.process_time()
    try:
        with torch.no_grad():
            prompt_ids, completion_ids, tool_mask, *_ = trainer._generate(
                [list(PROMPT) for _ in range(episodes)]
            )
    finally:
        handle.remove()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "prefill_tokens": prefill[0],
        "tokens": [p + c for p, c in zip(prompt_ids, completion_ids)],
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--turns", default="3,5,8", help="comma-separated assistant turns per episode")
    p.add_argument("--episodes", type=int, default=16, help="episodes per rollout B")
    p.add_argument(
        "--repeats", type=int, default=3, help="timed rollouts per setting (median; one warm-up first)"
    )
    p.add_argument("--size", default="small", help="model size of posttrain.tasks.tiny (tiny, small)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: a loaded machine slows 2 threads ~15x)"
    )
    p.add_argument("--no-trl", action="store_true", help="posttrain rows only")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    tok, model = build(args.size)
    work = Path(tempfile.mkdtemp(prefix="agent-kv-"))
    results = []
    before = busy_cores()
    turns = [int(t) for t in args.turns.split(",")]
    for T in turns:
        sides = {
            "carry": lambda T=T: posttrain_rollout(tok, model, T, args.episodes, True),
            "re-prefill": lambda T=T: posttrain_rollout(tok, model, T, args.episodes, False),
        }
        if not args.no_trl:
            trainer = trl_trainer(tok, model, T, args.episodes, work)
            sides["trl"] = lambda T=T, trainer=trainer: trl_rollout(trainer, T, args.episodes)
        row = {"turns": T, "episodes": args.episodes}
        if T == turns[0]:
            for fn in sides.values():
                fn()  # warm-up, once per side
        # Round robin, so that a burst of another program's load falls on every side alike.
        runs = {name: [] for name in sides}
        for _ in range(args.repeats):
            for name, fn in sides.items():
                runs[name].append(fn())
        tokens = {}
        for name, rs in runs.items():
            wall = statistics.median(r["seconds"] for r in rs)
            row[name] = {
                "seconds": wall,
                "cpu_seconds": statistics.median(r["cpu_seconds"] for r in rs),
                "prefill_tokens": rs[0]["prefill_tokens"],
                "episodes_per_s": args.episodes / wall,
            }
            tokens[name] = rs[0]["tokens"]
        # Same episodes everywhere: carry and re-prefill token for token; TRL's are posttrain's minus the
        # last turn's tool result (posttrain runs that call too).
        row["same_tokens"] = tokens["carry"] == tokens["re-prefill"]
        if "trl" in tokens:
            row["trl_is_prefix"] = all(ours[: len(t)] == t for ours, t in zip(tokens["carry"], tokens["trl"]))
        results.append(row)
        print(json.dumps(row), flush=True)
    after = busy_cores()
    print(
        f"\nB={args.episodes} episodes per rollout, size={args.size}, threads={args.threads}, median of {args.repeats}"
    )
    head = f"{'turns':>5} {'side':<11} {'s/rollout':>9} {'cpu s':>7} {'episodes/s':>10} {'prefill tok':>11} "
    head += f"{'vs carry':>8} {'cpu vs carry':>12}"
    print(head)
    for row in results:
        for name in ("carry", "re-prefill", "trl"):
            if name in row:
                r = row[name]
                ratio = r["seconds"] / row["carry"]["seconds"]
                cpu_ratio = r["cpu_seconds"] / row["carry"]["cpu_seconds"]
                print(
                    f"{row['turns']:>5} {name:<11} {fmt(r['seconds'], '.2f'):>9} {fmt(r['cpu_seconds'], '.2f'):>7} "
                    f"{fmt(r['episodes_per_s'], '.2f'):>10} {r['prefill_tokens']:>11} {ratio:>7.2f}x {cpu_ratio:>11.2f}x"
                )
    print(f"other programs' busy cores before/after: {before}, {after}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps({"rows": results, "busy_cores": [before, after]}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
