"""
Benchmark: the routed-attention kernel (kernels/routed_attention.py) against dense attention and against
the reference (attention.routed_attend on SDPA with a routed mask), at Wan2.1-1.3B's attention shape.

  inference  one chunk of queries (3 frames x 1560 tokens) against a KV cache of `history` frames plus the
             chunk itself, as the streaming model calls it: forward only. Dense = the chunk attends to all of it.
  training   the 21-frame block-causal clip (32760 tokens), forward + backward. Dense = the block-causal mask.

Routing is synthetic, so that its structure is a knob: runs of R consecutive query tokens of a head share
one random choice of k history frames (R = 1: every token on its own, the kernel's worst case; R = 0: the
whole head shares one choice, its best case). Real routing sits in between: neighbouring tokens (one
object) tend to pick the same frames. `route()` itself is timed on the same tensors.

FLOPs are the ones the semantics need, counted per query over the keys it attends (4 hd per key forward;
backward 2.5x, forward + backward 3.5x, the FlashAttention convention), never the ones a kernel executes.
The kernel's executed/needed ratio (tile padding, frame tails, the union of a tile's selections) is printed
as `exec`. Timings are medians (triton.testing.do_bench on a GPU, which flushes L2 between runs).

  python kernels/bench.py                      # GPU: the full sweep
  python kernels/bench.py --tiny               # CPU smoke run: tiny shapes, kernel in Triton's interpreter
"""

import argparse
import math
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mode", choices=("inference", "training", "both"), default="both")
    p.add_argument("--history", default="6,9,12,15,18,21", help="inference: cached frames before the chunk")
    p.add_argument("--topk", default="1,3,5", help="routed history frames per query token")
    p.add_argument("--sink", type=int, default=0, help="sink frames (always attended, never routed)")
    p.add_argument("--runs", default="0,128,1",
                   help="routing structure: R consecutive query tokens share a selection (0 = a whole head)")
    p.add_argument("--frames", type=int, default=21, help="training: frames of the clip")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tokens", type=int, default=1560, help="tokens per frame (L)")
    p.add_argument("--chunk", type=int, default=3, help="frames per chunk")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (it compiles once per shape)")
    p.add_argument("--ref-max-gb", type=float, default=8.0,
                   help="skip the reference when its dense routed mask would exceed this many GB")
    p.add_argument("--tiny", action="store_true",
                   help="smoke-test shapes (2 heads, head dim 16, 40 tokens per frame); on a CPU implies --interpret")
    p.add_argument("--interpret", action="store_true", help="run the kernel in Triton's interpreter (CPU)")
    args = p.parse_args()
    if args.tiny:
        args.heads, args.head_dim, args.tokens, args.chunk, args.frames = 2, 16, 40, 2, 4
        args.history, args.topk, args.runs = "4", "1,2", "0,1"
        args.dtype = "fp16" if torch.cuda.is_available() else "fp32"
        args.interpret = args.interpret or not torch.cuda.is_available()
    return args


ARGS = parse_args()
if ARGS.interpret:
    os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported (by kernels/ below)
warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")   # CPU smoke run

from attention import (ALWAYS, CANDIDATE, attend, block_mask, cache_table,  # noqa: E402
                       route, routed_attend, routed_mask, routing_table, token_mask)
from kernels.routed_attention import _blocks, _launch_forward, make_plan, routed_attention  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() and not ARGS.interpret else "cpu"
DTYPE = dict(bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32)[ARGS.dtype]


# ----------------------------------------------------------------------------------------------------------
# helpers

def bench_ms(fn) -> float:
    """Median milliseconds of fn()."""
    if DEV == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    reps = 1 if ARGS.interpret else 5                        # the interpreter is slow and its timings moot
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * sorted(times)[reps // 2]


def attempt(fn):
    """fn() or None when it fails (FlexAttention out of shared memory, a mask out of GPU memory, ...)."""
    try:
        return fn()
    except Exception as e:   # a failed baseline is reported, it must not end the sweep
        print(f"    ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
        if DEV == "cuda":
            torch.cuda.empty_cache()
        return None


def synthetic_sel(table, L, topk, run, B, H):
    """int32 (B, H, Nq, topk) like route() gives: random candidate frames, shared by runs of `run` tokens."""
    Fq, Fk = table.shape
    Nq = Fq * L
    run = Nq if run <= 0 else run
    score = torch.rand(B, H, math.ceil(Nq / run), Fk, device=DEV).repeat_interleave(run, dim=2)[:, :, :Nq]
    cand = (table.to(DEV) == CANDIDATE).repeat_interleave(L, dim=0)           # (Nq, Fk)
    best, idx = score.masked_fill(~cand, float("-inf")).topk(min(topk, Fk), dim=-1)
    sel = torch.where(best > float("-inf"), idx, -1).to(torch.int32)
    return F.pad(sel, (0, topk - sel.shape[-1]), value=-1)


def attended_keys(table, sel, L) -> int:
    """Sum over (b, h, query) of the keys the routed semantics attend to."""
    always = (table == ALWAYS).sum(1).repeat_interleave(L).to(DEV)         # (Nq,) ALWAYS frames per query
    B, H = sel.shape[:2]
    return int(B * H * always.sum() * L + (sel >= 0).sum() * L)


def executed_keys(plan, L, block_n) -> int:
    """Sum over tiles of rows x keys of the frames the tile visits, padding rows and tail blocks included."""
    return int(plan.tile_count.sum()) * plan.block_m * math.ceil(L / block_n) * block_n


def dense_keys(table, L, B, H) -> int:
    return int(B * H * (table > 0).sum() * L * L)


def qkv(Nq, Nk, requires_grad=False):
    B, H, D = 1, ARGS.heads, ARGS.head_dim
    q = torch.randn(B, H, Nq, D, device=DEV, dtype=DTYPE)
    k, v = (torch.randn(B, H, Nk, D, device=DEV, dtype=DTYPE) for _ in range(2))
    return [x.requires_grad_(requires_grad) for x in (q, k, v)]


def tflops(flops, ms):
    return flops / ms / 1e9


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def rate(flops, ms):
    """'1.234 ms (567 TF/s)', or '-' for a baseline that failed."""
    return "-" if ms is None else f"{ms:.3f} ms ({tflops(flops, ms):.0f} TF/s)"


# ----------------------------------------------------------------------------------------------------------
# inference: forward of one chunk against the cache

def inference():
    L, C, D, H = ARGS.tokens, ARGS.chunk, ARGS.head_dim, ARGS.heads
    print(f"\n== inference: a {C}-frame chunk ({C * L} queries) against a cache of `hist` frames + itself; "
          f"{H} heads, head dim {D}, L={L}, sink {ARGS.sink}, {ARGS.dtype}, forward")
    print("   dense: SDPA without mask (the chunk sees everything), FlexAttention (compiled), ours-dense "
          "(this kernel with every frame ALWAYS)")
    print("   hist% = routed-away share of the routable history; exec = executed / needed FLOPs; eff = TF/s "
          "per needed FLOP over the best dense TF/s; err = max |kernel - reference|")
    print(f"{'hist':>4} {'k':>2} {'run':>4} {'hist%':>5} {'exec':>5} | {'route':>6} {'plan':>6} {'kernel':>7} "
          f"{'total':>7} ms | {'TF/s':>5} {'eff':>4} | {'ref ms':>7} {'err':>7} | speedup: kernel, total")
    rows = []
    for hist in [int(h) for h in ARGS.history.split(",")]:
        table = cache_table(hist, min(ARGS.sink, hist), C)
        q, k, v = qkv(C * L, (hist + C) * L)
        dense_flops = 4 * D * dense_keys(table, L, 1, H)
        t_sdpa = attempt(lambda: bench_ms(lambda: F.scaled_dot_product_attention(q, k, v)))
        t_flex = None
        if not ARGS.no_flex:
            bm = attempt(lambda: block_mask(table > 0, L, DEV))
            t_flex = None if bm is None else attempt(lambda: bench_ms(lambda: attend(q, k, v, bm)))
        t_ours = attempt(lambda: bench_ms(lambda: routed_attend(q, k, v, table, L, 0, kernel=True)))
        best = min((t for t in (t_sdpa, t_flex) if t is not None), default=None)
        print(f"{hist:>4} dense: SDPA {rate(dense_flops, t_sdpa)} | Flex {rate(dense_flops, t_flex)} | "
              f"ours-dense {rate(dense_flops, t_ours)}")
        t_route = bench_ms(lambda: route(q, k, table, L, max(int(x) for x in ARGS.topk.split(","))))
        cfg = _blocks(DTYPE)
        for topk in [int(x) for x in ARGS.topk.split(",")]:
            for run in [int(r) for r in ARGS.runs.split(",")]:
                sel = synthetic_sel(table, L, topk, run, 1, H)
                plan = make_plan(table, sel, L, cfg["BLOCK_M"])
                needed = attended_keys(table, sel, L)
                flops = 4 * D * needed
                t_plan = bench_ms(lambda: make_plan(table, sel, L, cfg["BLOCK_M"]))
                t_kernel = bench_ms(lambda: _launch_forward(q, k, v, sel, plan, L, D ** -0.5, cfg))
                t_total = t_route + bench_ms(lambda: routed_attention(q, k, v, table, sel, L))
                t_ref = err = None
                if H * q.shape[2] * k.shape[2] / 1e9 <= ARGS.ref_max_gb:    # the reference's dense mask
                    t_ref = attempt(lambda: bench_ms(lambda: routed_attend(q, k, v, table, L, topk, kernel=False)))
                    ref = attempt(lambda: attend(q, k, v, routed_mask(table, sel, L)))
                    if ref is not None:
                        err = (routed_attention(q, k, v, table, sel, L).float() - ref.float()).abs().max().item()
                candidates = hist - min(ARGS.sink, hist)
                sparsity = 100 * (1 - min(topk, candidates) / max(candidates, 1))
                eff = None if best is None else tflops(flops, t_kernel) / tflops(dense_flops, best)
                rows.append(dict(hist=hist, k=topk, run=run, sparsity=sparsity, kernel=t_kernel, total=t_total,
                                 best=best, eff=eff))
                executed = executed_keys(plan, L, cfg["BLOCK_N"]) / needed
                print(f"{hist:>4} {topk:>2} {run:>4} {sparsity:>4.0f}% {executed:>5.2f} | "
                      f"{t_route:>6.3f} {t_plan:>6.3f} {t_kernel:>7.3f} {t_total:>7.3f} ms | "
                      f"{tflops(flops, t_kernel):>5.0f} {fmt(eff and 100 * eff, '3.0f'):>3}% | "
                      f"{fmt(t_ref):>7} {fmt(err, '.1e'):>7} | "
                      f"{fmt(best and best / t_kernel)}x, {fmt(best and best / t_total)}x")
    return rows


# ----------------------------------------------------------------------------------------------------------
# training: forward + backward of the block-causal clip

def training():
    L, C, D, H, Fr = ARGS.tokens, ARGS.chunk, ARGS.head_dim, ARGS.heads, ARGS.frames
    print(f"\n== training: the {Fr}-frame block-causal clip ({Fr * L} tokens), chunks of {C}; {H} heads, "
          f"head dim {D}, L={L}, sink {ARGS.sink}, {ARGS.dtype}, forward + backward")
    table = routing_table("block_causal", Fr, C, ARGS.sink)
    q, k, v = qkv(Fr * L, Fr * L, requires_grad=True)
    do = torch.randn_like(q)
    dense_flops = 4 * D * dense_keys(table, L, 1, H)
    cfg = _blocks(DTYPE)

    def timings(forward):
        """(forward + backward ms, backward-only ms) of forward() -> attention output."""
        both = bench_ms(lambda: torch.autograd.grad(forward(), (q, k, v), do))
        o = forward()
        return both, bench_ms(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))

    mask = token_mask(table > 0, L).to(DEV)
    dense = {"SDPA + mask": attempt(lambda: timings(lambda: attend(q, k, v, mask)))}
    if not ARGS.no_flex:
        bm = attempt(lambda: block_mask(table > 0, L, DEV))
        dense["FlexAttention"] = None if bm is None else attempt(lambda: timings(lambda: attend(q, k, v, bm)))
    for name, t in dense.items():
        print(f"  dense {name:>13}: fwd+bwd {rate(3.5 * dense_flops, t and t[0])}, "
              f"bwd {rate(2.5 * dense_flops, t and t[1])}")
    done = [t for t in dense.values() if t is not None]
    best = min((t[0] for t in done), default=None)
    best_bwd = min((t[1] for t in done), default=None)
    print("   exec = executed / needed FLOPs; TF/s per needed FLOP; err = max |dq - reference dq|")
    print(f"{'k':>2} {'run':>4} {'exec':>5} | {'fwd+bwd':>8} {'bwd':>7} ms | {'TF/s':>5} {'bwd':>5} | "
          f"{'ref ms':>7} {'err':>7} | speedup: fwd+bwd, bwd")
    rows = []
    for topk in [int(x) for x in ARGS.topk.split(",")]:
        for run in [int(r) for r in ARGS.runs.split(",")]:
            sel = synthetic_sel(table, L, topk, run, 1, H)
            plan = make_plan(table, sel, L, cfg["BLOCK_M"])
            needed = attended_keys(table, sel, L)
            flops = 4 * D * needed
            both, bwd = timings(lambda: routed_attention(q, k, v, table, sel, L))
            t_ref = err = None
            if H * q.shape[2] ** 2 / 1e9 <= ARGS.ref_max_gb:               # the reference's dense mask
                rmask = routed_mask(table, sel, L)
                t_ref = attempt(lambda: bench_ms(lambda: torch.autograd.grad(attend(q, k, v, rmask), (q, k, v), do)))
                ref_dq = attempt(lambda: torch.autograd.grad(attend(q, k, v, rmask), q, do)[0])
                if ref_dq is not None:
                    dq = torch.autograd.grad(routed_attention(q, k, v, table, sel, L), q, do)[0]
                    err = (dq.float() - ref_dq.float()).abs().max().item()
            rows.append(dict(k=topk, run=run, both=both, bwd=bwd, best=best, best_bwd=best_bwd))
            executed = executed_keys(plan, L, cfg["BLOCK_N"]) / needed
            print(f"{topk:>2} {run:>4} {executed:>5.2f} | {both:>8.2f} {bwd:>7.2f} ms | "
                  f"{tflops(3.5 * flops, both):>5.0f} {tflops(2.5 * flops, bwd):>5.0f} | {fmt(t_ref):>7} "
                  f"{fmt(err, '.1e'):>7} | {fmt(best and best / both)}x, {fmt(best_bwd and best_bwd / bwd)}x")
    return rows


if __name__ == "__main__":
    note = " (Triton interpreter: timings are meaningless, this run checks the script)" if ARGS.interpret else ""
    print(f"device: {torch.cuda.get_device_name() if DEV == 'cuda' else 'cpu'}{note}")
    inf = inference() if ARGS.mode in ("inference", "both") else []
    tr = training() if ARGS.mode in ("training", "both") else []
    # the project's targets, on an H100: at 75% sparsity, inference >= 2.5x the best dense baseline and
    # >= 60% of its TF/s per needed FLOP; training backward >= 1.5x the best dense backward
    print("\n== targets (measure on an H100; `run` = routing structure, see --runs)")
    for r in (r for r in inf if abs(r["sparsity"] - 75) < 1 and r["best"] is not None):
        print(f"  inference hist {r['hist']} k {r['k']} run {r['run']}: {r['best'] / r['kernel']:.2f}x kernel, "
              f"{r['best'] / r['total']:.2f}x with routing (target 2.5x); {100 * r['eff']:.0f}% of the best "
              f"dense TF/s (target 60%)")
    for r in (r for r in tr if r["best_bwd"] is not None):
        print(f"  training k {r['k']} run {r['run']}: backward {r['best_bwd'] / r['bwd']:.2f}x the best dense "
              f"(target 1.5x); forward + backward {r['best'] / r['both']:.2f}x")
