"""
Score a video of a ToyWorld scene, or a stream sampled from a checkpoint, by the metrics of metrics.py.

    python eval.py video.mp4 --world 3 --out runs/eval             # score a video of ToyWorld scene 3
    python eval.py --ckpt runs/tiny --seconds 60 --out runs/eval   # sample (sample.py's options), then score
    python eval.py --ckpt runs/tiny --world 5 --deterministic --tf-start 8 --seconds 8    # + PSNR/SSIM

How a video is compared with its world. `--world SEED` with --size, --deterministic and --no-events (the
WorldConfig knobs) names a scene. ToyWorld's own video of it matches it pixel for pixel; a generated one only
shares its description, because sample.py prompts the model with the scene's caption, not with the seed's
trajectories or camera pan. So every metric but PSNR/SSIM is *distributional*: it compares the frames with what
the caption and the world allow (palette colours, the shapes and number of objects, the background colours, the
fastest object of the world), never with the seed's pixels. PSNR/SSIM need exact correspondence, so they are
measured only after a teacher-forced start in deterministic mode (--tf-start K): the first K frames are the
world's own (fed to the model's cache by the clean re-cache pass), and in that mode the continuation has one
right answer. With --ckpt the prompt never changes, so the world is built without events (--no-events: the
first scene holds, nothing else about the world changes); a video file is scored against the world's events
(each changes the caption at a known frame) unless --no-events is given. Time is frame / --fps.
"""

import argparse
import json
import math
import os
import signal
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data import DataError, ToyWorld, WorldConfig
from metrics import draw, evaluate, frame_strip
from sample import DEFAULT_CKPT, Stream, add_args, fail, output_path, switch_flag

# ---- input, output and the command line -------------------------------------------------------------------------

def read_frames(path, size):
    """Every frame of a video file as uint8 [N, size, size, 3]; larger (upscaled) frames are box-averaged down."""
    import imageio.v3 as iio
    from PIL import Image

    if not os.path.isfile(path):
        fail(f"video not found: {path}")
    frames = []
    try:
        for frame in iio.imiter(path, plugin="pillow" if path.lower().endswith(".gif") else "FFMPEG"):
            image = Image.fromarray(frame).convert("RGB")
            if image.size[0] != image.size[1]:
                fail(f"{path} has {image.size[0]}x{image.size[1]} frames; ToyWorld frames are square")
            frames.append(np.asarray(image if image.size[0] == size else image.resize((size, size), Image.BOX)))
    except Exception as e:   # imageio raises many kinds for a file that is not a video
        fail(f"cannot read video {path}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:120]}")
    if not frames:
        fail(f"{path} has no frames")
    return np.stack(frames)


def plain(x):
    """numpy values -> JSON values; NaN and infinities (undefined figures) -> null."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [plain(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x.item() if isinstance(x, np.generic) else x


def write_atomic(path, save):
    """save(temporary path), then rename it to path: a crash never leaves a half-written file under its name."""
    tmp = path + ".part"
    try:
        save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("video", nargs="?", help="video of a ToyWorld scene to score; leave out to sample one from --ckpt")
    add_args(p, prompt=False)
    p.add_argument("--world", type=int, default=None, help="ToyWorld seed of the scene (with --ckpt default: --seed)")
    p.add_argument("--size", type=int, default=None, help="world frame size (default: 32, or the model's)")
    p.add_argument("--deterministic", action="store_true", help="deterministic world: no camera, occluder, events")
    p.add_argument("--no-events", action="store_true", help="hold the first scene (one prompt); implied by --ckpt "
                   "unless --switches")
    p.add_argument("--switches", action="store_true", help="with --ckpt: switch the stream's prompt at the world's "
                   "events (at the next chunk start) and score how fast it follows each new caption")
    p.add_argument("--tf-start", type=int, default=0, help="the first K frames are the world's own (with --ckpt: fed "
                   "to the model); score the rest by PSNR/SSIM against the true continuation. Needs --deterministic")
    p.add_argument("--out", default="runs/eval", help="folder for eval.json and eval.png")
    p.add_argument("--strip", default=None, metavar="PNG", help="also write a frame strip: the world's own video "
                   "(top) and the scored one, 4 frames from each of the first, middle and last second")
    args = p.parse_args(argv)
    args.prompt, args.switch = None, None   # no --prompt or --switch here: the world's captions, set below
    if args.tf_start < 0 or (args.tf_start and not args.deterministic):
        fail("--tf-start needs a frame count >= 0 and --deterministic (only then is the continuation unique)")
    if args.fps < 1:
        fail(f"--fps must be positive (got {args.fps})")
    if args.video and (args.ckpt != DEFAULT_CKPT or args.seconds is not None or args.minutes is not None):
        fail("give a video to score, or --ckpt (with --seconds or --minutes) to sample one, not both")
    flag = switch_flag(args)
    if flag and not args.switches:
        fail(f"{flag} acts at a prompt switch: it needs --switches")
    if args.switches and (args.video or args.no_events):
        fail("--switches prompts a stream sampled with --ckpt at the world's events; it cannot go with a video file "
             "or --no-events")
    if args.video and args.world is None:
        fail("scoring a video needs --world SEED: the ToyWorld scene it shows")
    try:
        stream = None if args.video else Stream(args)
        size = args.size or (stream.size if stream else 32)
        if stream and size != stream.size:
            fail(f"--size {size} differs from the model's frame size {stream.size}")
        world = ToyWorld(args.seed if args.world is None else args.world, WorldConfig(
            size=size, deterministic=args.deterministic,
            horizon_s=0.0 if args.no_events or (stream and not args.switches) else WorldConfig.horizon_s))
    except DataError as e:
        fail(e)
    if stream and args.tf_start % stream.model.cfg.chunk:
        fail(f"--tf-start must be whole chunks of {stream.model.cfg.chunk} frames (got {args.tf_start})")
    if not stream:
        frames, source = read_frames(args.video, size), args.video
    output_path(os.path.join(args.out, "eval.json"))   # before sampling, so a stream is never lost to a bad --out
    if args.strip:
        output_path(args.strip)
    if stream:
        stream.prompt = world.caption(0)
        if args.switches:
            chunk = stream.model.cfg.chunk
            for frame, caption in world.events:
                start = -(-frame // chunk) * chunk   # the model switches at a chunk start: the next one
                if start < stream.n_frames:
                    stream.switches[start] = caption
        source = stream.describe() + (f" | teacher-forced {args.tf_start} frames" if args.tf_start else "")
        print(source)
        context = world.render(0, args.tf_start)   # a teacher-forced start: the world's own frames, cached first
        parts = [context]
        with tqdm(total=stream.n_frames, unit="frame", dynamic_ncols=True, desc="sampling") as bar:
            for chunk in stream.chunks(context):
                parts.append(chunk)
                bar.update(len(chunk))
        frames = np.concatenate(parts)
    if args.tf_start >= len(frames):
        fail(f"--tf-start {args.tf_start} leaves no frame of the {len(frames)} to score")

    result = evaluate(frames, world, args.fps, args.tf_start)
    own = world.render(0, len(frames))
    reference = evaluate(own, world, args.fps, args.tf_start)["figures"]
    result = {"source": source, "world": {"seed": world.seed, "size": size, "deterministic": args.deterministic,
                                          "horizon_s": world.cfg.horizon_s, "events": len(world.events),
                                          "caption": world.caption(0)},
              "tf_start": args.tf_start, **result, "reference": reference,
              "slow_memory": stream.slow_memory(args.fps) if stream else None}
    json_path, png_path = os.path.join(args.out, "eval.json"), os.path.join(args.out, "eval.png")
    text = json.dumps(plain(result), allow_nan=False)   # one line: the curves hold a number per frame
    write_atomic(json_path, lambda path: Path(path).write_text(text))
    write_atomic(png_path, lambda path: draw(frames, result["curves"], args.fps).save(path, format="PNG"))
    if args.strip:
        from PIL import Image

        write_atomic(args.strip, lambda path: Image.fromarray(frame_strip([own, frames], args.fps)).save(path, "PNG"))
    for name, value in result["figures"].items():
        print(f"{name:18s} {value:10.4g}   (the world's own video: {reference[name]:.4g})")
    print(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
    for sig in (signal.SIGINT, signal.SIGTERM):   # also where a shell started it with SIGINT ignored
        signal.signal(sig, signal.default_int_handler)
    try:
        main()
    except KeyboardInterrupt:
        print(f"eval.py: error: interrupted; nothing written", file=sys.stderr)
        sys.exit(130)
