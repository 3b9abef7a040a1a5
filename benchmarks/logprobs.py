"""Token log-probs + entropy with gradients: the full-logits path against the chunked hidden-state one.

    python benchmarks/logprobs.py                       # vocab 150k, 4k tokens, hidden 1024, fp32
    python benchmarks/logprobs.py --tokens 4096 --vocab 151936 --hidden 896 --device cuda

Each method runs in its own child process (peak RSS is its own: VmHWM; on CUDA
torch.cuda.max_memory_allocated) and does forward + backward of sum(logp) + sum(entropy) once for warm-up
and `--repeats` times measured:

    full     logits = h @ W.T ([N, V] in fp32), log_softmax, gather, entropy: what a model's forward plus the
             textbook loss do
    chunked  posttrain.logprobs.head_logprobs: vocabulary blocks, online logsumexp, custom backward; the
             [N, V] logits never exist

Peak memory is reported above the inputs (h, W, and their gradients), so the figure is the method's own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import emit_result, peak_rss_mib, run_child, setup_child  # noqa: E402


def child(spec: dict) -> None:
    setup_child(spec["threads"])
    import torch

    from posttrain.logprobs import head_logprobs

    device = torch.device(spec["device"])
    g = torch.Generator(device=device).manual_seed(0)
    N, V, H = spec["tokens"], spec["vocab"], spec["hidden"]
    h = (torch.randn(1, N, H, generator=g, device=device) * 0.5).requires_grad_()
    w = (torch.randn(V, H, generator=g, device=device) / H**0.5).requires_grad_()
    targets = torch.randint(0, V, (1, N), generator=g, device=device)
    h.grad, w.grad = torch.zeros_like(h), torch.zeros_like(w)  # gradients allocated before the baseline
    cuda = device.type == "cuda"

    def step():
        if spec["method"] == "full":
            logp_all = torch.log_softmax((h @ w.T).float(), -1)
            logps = logp_all.gather(-1, targets[..., None]).squeeze(-1)
            ent = -(logp_all.exp() * logp_all).sum(-1)
        else:
            out = head_logprobs(h, w, targets, with_entropy=True, chunk_tokens=spec["chunk_tokens"])
            logps, ent = out.logps, out.entropy
        (logps.sum() + ent.sum()).backward()
        return logps.detach()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = peak_rss_mib()
    first = step()
    sync()
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else peak_rss_mib() - base
    emit_result(
        {
            "method": spec["method"],
            "peak_extra_mib": round(peak, 1),
            "s_per_step": round(min(times), 4),
            "logp_checksum": round(float(first.double().sum()), 3),
        }
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=150_000)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--chunk-tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "logprobs.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(json.loads(args.child))
    rows = []
    for method in ("full", "chunked"):
        spec = {
            "method": method, "tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden,
            "chunk_tokens": args.chunk_tokens, "repeats": args.repeats, "threads": args.threads,
            "device": args.device,
        }  # fmt: skip
        print(f"running {method} ...", flush=True)
        rows.append({**spec, **run_child(__file__, spec)})
    unit = "MiB (CUDA allocated)" if args.device.startswith("cuda") else "MiB (RSS)"
    print(f"\n{args.tokens} tokens, vocab {args.vocab}, hidden {args.hidden}, {args.device}")
    print(f"{'method':8} {'peak extra ' + unit:>28} {'s/step (fwd+bwd)':>18} {'sum logp':>14}")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:8} error: {r['error']} {r.get('output_tail', '')}")
            continue
        print(
            f"{r['method']:8} {r['peak_extra_mib']:>28.1f} {r['s_per_step']:>18.3f} {r['logp_checksum']:>14.3f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
