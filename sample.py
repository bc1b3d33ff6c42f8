"""
Stream a video of any length from a trained model, chunk by chunk, straight into an mp4.

    python sample.py --minutes 2                          # the shipped default model
    python sample.py --ckpt runs/teacher-tiny --seconds 10 --memory sink --prompt "a red circle over navy dots"

Frames go to the file as soon as each chunk is finished, and with a bounded memory policy (window, sink) the
KV cache stops growing after warm-up, so memory is constant however long the stream. The last line reports
frames, wall time, frames/s, the latency of the first chunk and the cache size.
"""

import argparse
import math
import os
import signal
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from data import VOCAB, ToyWorld, WorldConfig, to_float, to_uint8, tokenize, unknown_words
from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from flow import SamplerConfig, even_levels
from memory import POLICIES, KVCache, filling
from model import pick_device
from recipe import bf16
from rollout import rolling_rollout, rollout
from vae import load_vae

# ---- defaults: one block, every value is a flag below ------------------------------------------------------
DEFAULT_CKPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "default.pt")
SECONDS = 10.0
FPS = 16            # ToyWorld's world time runs at 16 frames per second
MEMORY = {"context": "slowfast", "context-teacher": "slowfast"}   # a method's own memory; every other streams with sink
SAMPLER = {"teacher": "euler", "diffusion": "euler", "resampling": "euler", "context-teacher": "euler", "ode": "few",
           "self": "few", "rolling": "few", "context": "few"}
STEPS = {"euler": 16, "few": 4}   # denoising calls per chunk, unless the checkpoint names its own (see train.RECIPE)
CFG = 3.0           # classifier-free guidance scale, likewise
SCALE = 4           # nearest-neighbour upscaling of the written frames, so 32x32 frames are watchable


def add_args(p, prompt=True):
    """The sampling options, shared with eval.py (which prompts with its world's caption: prompt=False)."""
    p.add_argument("--ckpt", default=DEFAULT_CKPT, help="checkpoint file, or a run directory (its latest)")
    p.add_argument("--seconds", type=float, default=None, help=f"length of the video (default {SECONDS:g})")
    p.add_argument("--minutes", type=float, default=None, help="length of the video in minutes")
    p.add_argument("--fps", type=int, default=FPS, help="frames per second of the video")
    p.add_argument("--memory", default=None, help=f"KV cache policy: {', '.join(POLICIES)} (default: slowfast for the "
                   "context methods' models, else sink)")
    p.add_argument("--window", type=int, default=None, help="recent frames kept (default: fill the trained range)")
    p.add_argument("--sink", type=int, default=None, help="sink frames kept for good (default: one chunk)")
    p.add_argument("--slow", type=int, default=None,
                   help="slowfast: slow-memory frames (default: the trained range left after sink and window)")
    p.add_argument("--tau", type=float, default=0.95,
                   help="slowfast: a frame leaving fast memory is kept if its key similarity to the one before is "
                        "below this")
    p.add_argument("--promote", type=float, default=0.0,
                   help="slowfast: keep instead the share of frames least like the one before, e.g. 0.015: about "
                        "the same share on every scene, so slow memory reaches back about slow / (share * fps) s")
    if prompt:
        p.add_argument("--prompt", default=None, help="caption (default: the caption of ToyWorld scene --seed)")
        p.add_argument("--switch", action="append", default=None, metavar="SECONDS:CAPTION",
                       help="switch to CAPTION at SECONDS (rounded to a chunk): the kept frames are re-encoded under "
                            "it (or keep their keys: --no-reencode); repeat for more switches")
    p.add_argument("--resink", action="store_true",
                   help="at each prompt switch the sink moves to the first frames made under the new caption (default: "
                        "it keeps the first frames of the stream, re-encoded under it)")
    p.add_argument("--reencode", action=argparse.BooleanOptionalAction, default=None,
                   help="at each prompt switch the kept frames are re-encoded under the new caption (LongLive's "
                        "re-cache, the default), or with --no-reencode keep the keys made under the old one, as a "
                        "model trained with --event-clips read them in training (docs/cpu-recipe.md section 18: "
                        "re-encoding still follows more switches)")
    p.add_argument("--sampler", default=None, choices=("euler", "few"),
                   help="euler: many-step flow ODE with guidance; few: predict x0 and re-noise (distilled models). "
                        "Default: the one the checkpoint's method was trained for")
    p.add_argument("--schedule", default=None, choices=("chunked", "rolling"),
                   help="chunked: finish each chunk, then the next; rolling: a window of --steps chunks at rising noise "
                        "(Rolling Forcing; distilled models, --sampler few). Default: rolling for --method rolling "
                        "models, else chunked")
    p.add_argument("--steps", type=int, default=None,
                   help=f"denoising calls per chunk (default: the checkpoint's own, else {STEPS})")
    p.add_argument("--cfg", type=float, default=None,
                   help=f"classifier-free guidance scale, 1 = off (default: the checkpoint's own, else {CFG:g})")
    p.add_argument("--cfg-sigma", type=float, default=SamplerConfig.cfg_sigma, metavar="S",
                   help="guidance runs at the noise levels up to S only, the prompt alone above (1 = every level, "
                        "the default; docs/cpu-recipe.md section 30)")
    p.add_argument("--history-guidance", type=float, default=SamplerConfig.history, metavar="G",
                   help="history guidance scale, 1 = off (the default; docs/cpu-recipe.md section 21): each chunk also "
                        "runs without the cache and the step moves G - 1 further towards the cache's prediction (one "
                        "more pass a step, the chunked schedule)")
    p.add_argument("--history-sigma", type=float, default=SamplerConfig.history_sigma, metavar="S",
                   help="history guidance runs at the noise levels up to S only (1 = at every level, where it grows "
                        "objects until they fill the frame; default: %(default)g)")
    p.add_argument("--shared-noise", type=float, default=SamplerConfig.shared_noise, metavar="A",
                   help="each chunk starts from sqrt(A) x one noise drawn for the stream + sqrt(1 - A) x fresh noise "
                        "(0 = fresh, the default; docs/cpu-recipe.md section 26: 0.25 holds shapes in view but settles "
                        "into one layout over minutes; the chunked schedule)")
    p.add_argument("--shared-time", type=float, default=0.0, metavar="T",
                   help="with --shared-noise: the one draw drifts, its correlation after t seconds exp(-t / T), so "
                        "a stream cannot settle into one layout (0 = fixed for the stream, the default; "
                        "docs/cpu-recipe.md section 28)")
    p.add_argument("--topk", type=int, default=None,
                   help="history routing: top-k history frames per query (0 = dense; default: as trained)")
    p.add_argument("--fp32", action="store_true",
                   help="sample in fp32 on the CPU (default: bf16 autocast for models whose preset trains under it, "
                        "the --cpu ones: faster here, as in training)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")


PROG = os.path.basename(sys.argv[0]) or "sample.py"


def fail(msg):
    raise SystemExit(f"{PROG}: error: {msg}")


class Stream:
    """A validated, loaded model ready to stream: iterate `chunks()` for uint8 frames (n, H, W, 3)."""

    def __init__(self, args):
        if args.seconds is not None and args.minutes is not None:
            fail("give --seconds or --minutes, not both")
        seconds = args.minutes * 60 if args.minutes is not None else (args.seconds if args.seconds is not None
                                                                      else SECONDS)
        if not seconds > 0:
            fail(f"the video must be longer than 0 seconds (got {seconds:g})")
        if args.fps < 1 or (args.steps is not None and args.steps < 1):
            fail("--fps and --steps must be positive")
        self.n_frames, self.fps, self.shared_time = round(seconds * args.fps), args.fps, args.shared_time
        if self.n_frames < 1:
            fail(f"{seconds:g} s at {args.fps} frames/s is no frame at all; ask for at least {1 / args.fps:g} s")
        if args.cfg is not None and args.cfg < 0:
            fail(f"--cfg must be >= 0 (1 = no guidance; got {args.cfg:g})")
        if not 0 <= args.cfg_sigma <= 1:
            fail(f"--cfg-sigma is a noise level in [0, 1] (got {args.cfg_sigma:g})")
        if args.history_guidance < 0:
            fail(f"--history-guidance must be >= 0 (1 = off; got {args.history_guidance:g})")
        if not 0 <= args.history_sigma <= 1:
            fail(f"--history-sigma is a noise level in [0, 1] (got {args.history_sigma:g})")
        if not 0 <= args.shared_noise < 1:
            fail(f"--shared-noise is a share in [0, 1): 1 would start every chunk alike (got {args.shared_noise:g})")
        if args.shared_time < 0 or (args.shared_time and not args.shared_noise):
            fail(f"--shared-time is the seconds over which --shared-noise's draw drifts: >= 0, with --shared-noise "
                 f"(got {args.shared_time:g})")
        try:
            self.device = pick_device(args.device)
        except ValueError as e:
            fail(e)
        if args.ckpt == DEFAULT_CKPT and not os.path.exists(DEFAULT_CKPT):
            fail(f"no default model at {os.path.relpath(DEFAULT_CKPT)}: train it on this CPU with "
                 f"`python train.py --method resampling --cpu` and pass --ckpt runs/resampling-cpu/model.pt")
        try:
            self.ckpt = ckpt = load_checkpoint(args.ckpt)
        except CheckpointError as e:
            fail(e)
        if ckpt["method"] == "bidirectional":
            fail(f"{ckpt['path']} is a bidirectional clip model (the DMD score), it cannot stream")
        self.model = model_from_checkpoint(ckpt).eval().to(self.device)
        # bf16 autocast as the model was trained (recipe.bf16), unless --fp32 asks for fp32 on the CPU
        self.bf16 = bf16(ckpt["args"]["preset"], self.device.type) and not (args.fp32 and self.device.type == "cpu")
        self.vae = load_vae(ckpt["vae"]).to(self.device) if "vae" in ckpt else None   # latent models decode frames
        self.size = self.model.cfg.height * (self.vae.factor if self.vae else 1)   # frame size in pixels
        cfg = self.model.cfg
        kind = args.sampler or SAMPLER[ckpt["method"]]
        own = {"steps": STEPS[kind], "cfg": CFG}
        if "sampler" in ckpt and kind == SAMPLER[ckpt["method"]]:   # the checkpoint's own, for the sampler it made
            own = ckpt["sampler"]
        steps = args.steps or own["steps"]
        # --shared-time T in seconds -> the shared draw's correlation from one chunk to the next
        decay = math.exp(-cfg.chunk / (args.fps * args.shared_time)) if args.shared_time else 1.0
        self.sampler = SamplerConfig(kind=kind, steps=steps, cfg=own["cfg"] if args.cfg is None else args.cfg,
                                     cfg_sigma=args.cfg_sigma, history=args.history_guidance,
                                     history_sigma=args.history_sigma,
                                     shared_noise=args.shared_noise, shared_decay=decay, shift=ckpt["shift"],
                                     levels=even_levels(steps),
                                     clip=None if self.vae else 1.0)
        self.schedule = args.schedule or ("rolling" if ckpt["method"] == "rolling" else "chunked")
        policy = args.memory or MEMORY.get(ckpt["method"], "sink")
        query = cfg.chunk   # frames a denoising call makes: one chunk, or the rolling window of `steps` chunks
        if self.schedule == "rolling":
            if kind != "few":
                fail("--schedule rolling runs the few-step levels of a distilled model: add --sampler few")
            if args.history_guidance != 1:
                fail("--history-guidance runs on the chunked schedule; the rolling window has no chunk to run alone")
            if args.shared_noise:
                fail("--shared-noise runs on the chunked schedule; the rolling window adds its chunks at full noise")
            query = steps * cfg.chunk
            if query + (cfg.chunk if policy in ("sink", "slowfast") else 0) >= cfg.frames:
                fail(f"a rolling window of {steps} chunks ({query} frames) leaves no history in the {cfg.frames} "
                     f"frames the model was trained on: use fewer --steps")
        self.memory = filling(policy, cfg.frames, cfg.chunk, query, args.sink, args.window, args.slow, args.tau,
                              args.promote)
        self.memory.resink, self.memory.reencode = args.resink, args.reencode is not False   # unset: re-encode
        if args.resink and policy not in ("sink", "slowfast"):
            fail(f"--resink moves the sink: the {policy} memory has none (use --memory sink or slowfast)")
        try:
            self.memory.check(query, cfg.frames)
        except ValueError as e:
            fail(e)
        if args.topk is not None:
            history = (None if self.memory.policy == "full" else
                       self.memory.window + (self.memory.sink if self.memory.policy in ("sink", "slowfast") else 0)
                       + (self.memory.slow if self.memory.policy == "slowfast" else 0))
            if args.topk < 0 or (history is not None and args.topk > history):
                fail(f"--topk must be in 0..{history if history is not None else 'any'}: the {self.memory.policy} "
                     f"memory holds {history} history frames (0 = dense attention)")
            cfg.topk = args.topk
        scene = ToyWorld(args.seed, WorldConfig(size=self.size))
        self.prompt = args.prompt if args.prompt is not None else scene.caption(0)
        self.switches = {}   # frame -> caption
        for spec in args.switch or []:
            self.add_switch(spec, args.fps)
        unknown = list(dict.fromkeys(w for c in [self.prompt, *self.switches.values()] for w in unknown_words(c)))
        if unknown:
            print(f"{PROG}: warning: not in the vocabulary, read as <unk>: {', '.join(unknown)} (the words the model "
                  f"knows are data.VOCAB: {' '.join(VOCAB[2:])})", file=sys.stderr)
        self.cache = KVCache(self.memory, cfg.depth)
        self.seed = args.seed
        self.times = []   # seconds spent on each chunk
        self.reach = []   # slowfast: after each chunk, how many frames back its oldest slow-memory frame lies

    def add_switch(self, spec: str, fps: int):
        """--switch SECONDS:CAPTION -> self.switches[frame] = CAPTION, the frame rounded to a chunk start."""
        seconds, sep, caption = spec.partition(":")
        try:
            seconds = float(seconds)
        except ValueError:
            seconds = None
        chunk = self.model.cfg.chunk
        if not sep or seconds is None or not caption.strip():
            fail(f"--switch {spec!r}: expected SECONDS:CAPTION, e.g. 30:\"a red circle over navy dots\"")
        frame = round(seconds * fps / chunk) * chunk
        if not 0 < frame < self.n_frames:
            fail(f"--switch at {seconds:g} s is outside the stream (0, {self.n_frames / fps:g} s)")
        if frame in self.switches:
            fail(f"two --switch at frame {frame} ({seconds:g} s)")
        self.switches[frame] = caption.strip()

    def describe(self) -> str:
        c = self.ckpt
        return (f"{c['path']} ({c['method']}, step {c['step']}) | {self.n_frames} frames | memory {self.memory.policy}"
                + (f" (promote {self.memory.promote:g})" if self.memory.policy == "slowfast" and self.memory.promote
                   else "")
                + (", resink" if self.memory.resink else "") + ("" if self.memory.reencode else ", no re-encode")
                + f" | {self.sampler.kind} x {self.sampler.steps}" + (", rolling" if self.schedule == "rolling" else "")
                + (f", guidance {self.sampler.cfg:g}" if self.sampler.kind == "euler" else "")
                + (f" up to sigma {self.sampler.cfg_sigma:g}" if self.sampler.guided and self.sampler.cfg_sigma < 1
                   else "")
                + (f", history guidance {self.sampler.history:g} up to sigma {self.sampler.history_sigma:g}"
                   if self.sampler.history != 1 else "")
                + (f", shared noise {self.sampler.shared_noise:g}" if self.sampler.shared_noise else "")
                + (f" drifting over {self.shared_time:g} s" if self.shared_time else "")
                + f" | top-k {self.model.cfg.topk or 'dense'} | {'bf16' if self.bf16 else 'fp32'} "
                f"| prompt: {self.prompt}"
                + "".join(f" | at {f / self.fps:g} s: {c}" for f, c in sorted(self.switches.items())))

    def chunks(self, context=None):
        """The stream's frames, a chunk at a time. context: uint8 frames (K, H, W, 3), K whole chunks, put into
        the cache first (a teacher-forced start); they are not yielded again."""
        cfg = self.model.cfg
        tokens = torch.from_numpy(tokenize([self.prompt], cfg.text_len)).to(self.device)
        generator = torch.Generator(self.device).manual_seed(self.seed)
        if context is not None and len(context):
            context = torch.from_numpy(to_float(context))[None].to(self.device)
            context = self.vae.encode(context) if self.vae else context   # a latent model caches latents
        else:
            context = None
        switches = {f: torch.from_numpy(tokenize([c], cfg.text_len)).to(self.device) for f, c in self.switches.items()}
        written, t0 = 0, time.time()
        if self.schedule == "rolling":
            stream = rolling_rollout(self.model, tokens, self.n_frames, self.memory, self.sampler, generator,
                                     self.cache, context, switches)
        else:
            stream = rollout(self.model, tokens, self.n_frames, self.memory, self.sampler, generator, self.cache,
                             context, switches)
        for x0 in self.autocast(stream):
            x0 = x0[0, :self.n_frames - written].float()   # the VAE decodes in fp32: its colour argmax is exact
            frames = to_uint8((self.vae.decode(x0) if self.vae else x0).cpu().numpy())
            written += len(frames)
            self.times.append(time.time() - t0 - sum(self.times))
            if self.memory.policy == "slowfast":
                self.reach.append(self.cache.reach())
            yield frames

    def autocast(self, stream):
        """Advance the rollout one chunk at a time under bf16 autocast (when on), so that the autocast state never
        leaks into the code that consumes the chunks (a `with` around a yield would stay entered there)."""
        while True:
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
                x0 = next(stream, None)
            if x0 is None:
                return
            yield x0

    def slow_memory(self, fps: int) -> dict | None:
        """slowfast: the share of frames promoted and how far back slow memory reached (s, over the chunks)."""
        if self.memory.policy != "slowfast" or not self.reach:
            return None
        reach = np.array(self.reach) / fps
        return {"promoted": self.cache.promoted / max(self.cache.left, 1), "reach_median_s": float(np.median(reach)),
                "reach_p90_s": float(np.percentile(reach, 90)), "reach_5s_share": float(np.mean(reach >= 5))}

    def report(self, fps: int) -> str:
        """Per-chunk cost at the start against the end of the stream, and the totals."""
        wall, n = sum(self.times), self.n_frames
        # chunks in 10 s of video, or half of the stream after the first chunk (warm-up) when it is shorter
        k = max(1, min(round(10 * fps / self.model.cfg.chunk), (len(self.times) - 1) // 2))
        first = self.times[1:k + 1] or self.times
        slow = self.slow_memory(fps)
        return (f"per chunk: first {len(first)} {1e3 * np.mean(first):.1f} ms, last {k} "
                f"{1e3 * np.mean(self.times[-k:]):.1f} ms (the first chunk itself is excluded: warm-up)\n"
                f"frames {n} | wall {wall:.1f} s | {n / wall:.1f} frames/s | first chunk {self.times[0]:.2f} s | "
                f"cache {self.cache.nbytes() / 2**20:.2f} MiB"
                + ("" if slow is None else f"\nslow memory: promoted {100 * slow['promoted']:.1f}% of the frames that "
                   f"left fast memory; its oldest frame {slow['reach_median_s']:.1f} s back (median over chunks), "
                   f"{slow['reach_p90_s']:.1f} s (90th percentile)"))


def output_path(path: str) -> str:
    """Check, before any sampling, that `path` can be written (its folder is created); fail in one line if not."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        fail(f"cannot create the output folder {folder}: {e.strerror}")
    if os.path.isdir(path) or not os.access(folder, os.W_OK):
        fail(f"cannot write {path}: {'it is a folder' if os.path.isdir(path) else 'the folder is not writable'}")
    return path


def switch_flag(args) -> str | None:
    """The flag given that only acts at a prompt switch (sample.py --switch, eval.py --switches), if any."""
    if args.resink:
        return "--resink"
    return None if args.reencode is None else "--reencode" if args.reencode else "--no-reencode"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_args(p)
    p.add_argument("--scale", type=int, default=SCALE, help="upscale factor of the written frames")
    p.add_argument("--out", default="sample.mp4", help="output video")
    args = p.parse_args(argv)
    if args.scale < 1:
        fail("--scale must be positive")
    flag = switch_flag(args)
    if flag and not args.switch:
        fail(f"{flag} acts at a prompt switch: give --switch SECONDS:CAPTION")
    out = output_path(args.out)
    stream = Stream(args)
    print(stream.describe())

    import imageio_ffmpeg

    # frames go to a hidden .part file (no video extension, so no player takes it for a result), renamed at the end
    tmp = os.path.join(os.path.dirname(out), "." + os.path.basename(out) + ".part")
    for sig in (signal.SIGINT, signal.SIGTERM):   # even where a shell started it with SIGINT ignored
        signal.signal(sig, signal.default_int_handler)   # like Ctrl-C: the partial file is removed
    size = (stream.size * args.scale, stream.size * args.scale)
    writer = imageio_ffmpeg.write_frames(tmp, size, fps=args.fps, codec="libx264", quality=8, macro_block_size=1,
                                         output_params=["-f", "mp4", "-preset", "ultrafast",
                                                        "-threads", "1"])   # leave the CPU to the model
    try:
        writer.send(None)   # starts ffmpeg
        with tqdm(total=stream.n_frames, unit="frame", dynamic_ncols=True) as bar:
            for frames in stream.chunks():
                for f in frames:
                    writer.send(np.ascontiguousarray(f.repeat(args.scale, 0).repeat(args.scale, 1)))
                bar.update(len(frames))
        writer.close()
        os.replace(tmp, out)
    except KeyboardInterrupt:
        cleanup(writer, tmp)
        print(f"{PROG}: error: interrupted; no video written (the partial one was removed)", file=sys.stderr)
        sys.exit(130)
    except BaseException:
        cleanup(writer, tmp)
        raise
    print(f"wrote {out}")
    print(stream.report(args.fps))


def cleanup(writer, tmp):
    try:
        writer.close()
    except Exception:   # ffmpeg may already be gone (it gets the same signal); the file goes either way
        pass
    if os.path.exists(tmp):
        os.remove(tmp)


if __name__ == "__main__":
    main()
