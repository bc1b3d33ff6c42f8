"""
Time one training step of a preset on this machine, under the options that decide CPU throughput.

    python bench.py --cpu --method teacher                   # the recipe's step: bf16 autocast, plain AdamW
    python bench.py --cpu --method teacher --fp32 --threads 1
    python bench.py --cpu --method teacher --compile --fused

The step is what train.py runs (loss, backward, gradient clip, AdamW, EMA) on a fixed batch of random clips of
the preset's shape, so data generation and the VAE are left out (train.py logs the whole step). It prints the
median and the spread of --steps timed steps after --warmup untimed ones (torch.compile compiles in those).
docs/cpu-recipe.md has the figures of this machine.
"""

import argparse
import copy
import statistics
import time

import torch

from forcing import LOSSES, ResamplingConfig, resampling_loss
from model import DiT, DiTConfig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    for name in ("tiny", "cpu", "small"):
        size.add_argument(f"--{name}", dest="preset", action="store_const", const=name)
    p.add_argument("--method", default="teacher", choices=sorted(LOSSES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--fused", action="store_true", help="fused AdamW (one kernel for all parameters)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("bench.py: error: --threads must be positive")
        torch.set_num_threads(args.threads)
    cfg = DiTConfig.preset(args.preset or "cpu")
    torch.manual_seed(0)
    model = DiT(cfg)
    ema = copy.deepcopy(model).requires_grad_(False)
    net = torch.compile(model) if args.compile else model
    net.cfg = cfg
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.fused or None)
    x = torch.randn(args.batch, cfg.frames, cfg.channels, cfg.height, cfg.width)
    tokens = torch.randint(2, 20, (args.batch, 8))
    loss_fn = LOSSES[args.method]
    if args.method == "resampling":
        loss_fn = lambda *a: resampling_loss(*a, cfg=ResamplingConfig(), resampler=model)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=not args.fp32):
            loss = loss_fn(net, x, tokens, 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 0.002)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    print(f"{args.preset or 'cpu'} {args.method} batch {args.batch} | threads {torch.get_num_threads()} | "
          f"{'fp32' if args.fp32 else 'bf16 autocast'}{' | compiled' if args.compile else ''}"
          f"{' | fused AdamW' if args.fused else ''} | step {statistics.median(times):.3f} s median "
          f"(min {min(times):.3f}, max {max(times):.3f}, {len(times)} steps)")


if __name__ == "__main__":
    main()
