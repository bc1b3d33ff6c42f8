"""
Stream a video of any length from a trained model, chunk by chunk, straight into an mp4.

    python sample.py --minutes 2                          # the shipped default model
    python sample.py --ckpt runs/teacher-tiny --seconds 10 --memory sink --prompt "a red circle over blue dots"

Frames go to the file as soon as each chunk is finished, and with a bounded memory policy (window, sink) the
KV cache stops growing after warm-up, so memory is constant however long the stream. The last line reports
frames, wall time, frames/s, the latency of the first chunk and the cache size.
"""

import argparse
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from data import ToyWorld, WorldConfig, to_uint8, tokenize
from forcing import SamplerConfig, rollout
from memory import POLICIES, KVCache, MemoryConfig
from model import CheckpointError, load_checkpoint, model_from_checkpoint

# ---- defaults: one block, every value is a flag below ------------------------------------------------------
DEFAULT_CKPT = os.path.join("checkpoints", "default.pt")
SECONDS = 10.0
FPS = 16            # ToyWorld's world time runs at 16 frames per second
MEMORY = "sink"
STEPS = 16          # Euler steps per chunk for many-step models
CFG = 3.0           # classifier-free guidance scale
SCALE = 4           # nearest-neighbour upscaling of the written frames, so 32x32 frames are watchable


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=DEFAULT_CKPT, help="checkpoint file, or a run directory (its latest)")
    p.add_argument("--seconds", type=float, default=None, help=f"length of the video (default {SECONDS:g})")
    p.add_argument("--minutes", type=float, default=None, help="length of the video in minutes")
    p.add_argument("--fps", type=int, default=FPS, help="frames per second of the video")
    p.add_argument("--memory", default=MEMORY, help=f"KV cache policy: {', '.join(POLICIES)}")
    p.add_argument("--window", type=int, default=None, help="recent frames kept (default: fill the trained range)")
    p.add_argument("--sink", type=int, default=None, help="sink frames kept for good (default: one chunk)")
    p.add_argument("--prompt", default=None, help="caption (default: the caption of ToyWorld scene --seed)")
    p.add_argument("--steps", type=int, default=STEPS, help="denoising steps per chunk (many-step models)")
    p.add_argument("--cfg", type=float, default=CFG, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=SCALE, help="upscale factor of the written frames")
    p.add_argument("--out", default="sample.mp4", help="output video")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    return p.parse_args(argv)


def fail(msg):
    raise SystemExit(f"sample.py: error: {msg}")


def setup(args):
    """Validate every input and load the model; one clear line for anything wrong."""
    if args.seconds is not None and args.minutes is not None:
        fail("give --seconds or --minutes, not both")
    seconds = args.minutes * 60 if args.minutes is not None else (args.seconds if args.seconds is not None else SECONDS)
    if not seconds > 0:
        fail(f"the video must be longer than 0 seconds (got {seconds:g})")
    if args.fps < 1 or args.steps < 1 or args.scale < 1:
        fail("--fps, --steps and --scale must be positive")
    if args.ckpt == DEFAULT_CKPT and not os.path.exists(DEFAULT_CKPT):
        fail(f"no default model at {DEFAULT_CKPT} yet: train one first with "
             f"`python train.py --method teacher --small --out runs/teacher` and pass --ckpt runs/teacher")
    try:
        ckpt = load_checkpoint(args.ckpt)
    except CheckpointError as e:
        fail(e)
    if ckpt["method"] == "bidirectional":
        fail(f"{ckpt['path']} is a bidirectional clip model (the DMD score), it cannot stream")
    model = model_from_checkpoint(ckpt).eval()
    cfg = model.cfg
    window = args.window if args.window is not None else cfg.frames - 2 * cfg.chunk
    sink = args.sink if args.sink is not None else cfg.chunk
    if args.memory == "window" and args.window is None:
        window = cfg.frames - cfg.chunk
    memory = MemoryConfig(policy=args.memory, window=window, sink=sink)
    try:
        memory.check(cfg.chunk, cfg.frames)
    except ValueError as e:
        fail(e)
    return model, ckpt, memory, round(seconds * args.fps)


def main(argv=None):
    args = parse(argv)
    model, ckpt, memory, n_frames = setup(args)
    cfg = model.cfg
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    prompt = args.prompt if args.prompt is not None else ToyWorld(args.seed, WorldConfig(size=cfg.height)).caption(0)
    tokens = torch.from_numpy(tokenize([prompt], cfg.text_len)).to(device)
    sampler = SamplerConfig(kind="euler", steps=args.steps, cfg=args.cfg, shift=ckpt["shift"])
    cache = KVCache(memory, cfg.depth)
    generator = torch.Generator(device).manual_seed(args.seed)
    print(f"{ckpt['path']} ({ckpt['method']}, step {ckpt['step']}) | {n_frames} frames | memory {memory.policy} | "
          f"prompt: {prompt}")

    import imageio.v2 as imageio
    tmp = args.out + ".part.mp4"   # renamed only when every frame is written
    writer = imageio.get_writer(tmp, fps=args.fps, codec="libx264", quality=8, macro_block_size=1)
    written, first, t0 = 0, None, time.time()
    try:
        with tqdm(total=n_frames, unit="frame", dynamic_ncols=True) as bar, \
                torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            for chunk in rollout(model, tokens, n_frames, memory, sampler, generator, cache):
                first = first or time.time() - t0
                frames = to_uint8(chunk[0, :n_frames - written].float().cpu().numpy())
                for f in frames:
                    writer.append_data(f.repeat(args.scale, 0).repeat(args.scale, 1))
                written += len(frames)
                bar.update(len(frames))
        writer.close()
        os.replace(tmp, args.out)
    except BaseException:
        writer.close()
        os.remove(tmp)
        raise
    wall = time.time() - t0
    print(f"wrote {args.out} | frames {written} | wall {wall:.1f} s | {written / wall:.1f} frames/s | "
          f"first chunk {first:.2f} s | cache {cache.nbytes() / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
