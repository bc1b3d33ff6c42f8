"""
Train one forcing method of the block-causal DiT on ToyWorld (or on a folder of your own videos).

    python train.py --method resampling --cpu                    # the shipped default model, on a 2-core CPU
    python train.py --method self --cpu                          # Self Forcing: DMD of the default (score.pt)
    python train.py --method teacher --tiny                      # a smoke run, a couple of minutes
    python train.py --method teacher --small --out runs/teacher  # one GPU
    torchrun --nproc_per_node 4 train.py --method teacher --small

The --cpu preset is a latent model: stage 1 trains a frame VAE (vae.py) into OUT/vae, stage 2 the DiT on its
latents; the VAE travels inside every checkpoint, so sampling decodes frames without it being named.
Each run directory gets ckpt_<step>.pt checkpoints (plain dicts, written atomically), and at the end model.pt
(the EMA weights in fp16 with what sampling needs: the file to ship) and samples.png, a strip of frames streamed
from it; args.json (the run's settings, also stored in every checkpoint) and log.jsonl (one line of loss,
gradient norm, learning rate and timing per --log-every steps). --resume continues from the latest checkpoint,
and only the same run: it refuses changed settings. One run directory has one writer at a time (a lock), and a
killed run leaves no temporary files behind. On CUDA the model runs under bf16 autocast with FlexAttention block
masks; on CPU with SDPA, in fp32 or (the --cpu preset) under bf16 autocast, about 1.7x faster there.
"""

import argparse
import copy
import functools
import json
import math
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from data import DataError, ToyWorld, VideoFolder, WorldConfig, sample_clips, to_uint8, tokenize
from checkpoint import (CheckpointError, check_resume, check_same_model, export_model, latest_checkpoint,
                        load_checkpoint, lock_run_directory, model_from_checkpoint, prune_checkpoints, restore_rng,
                        rng_states, save_checkpoint)
from flow import SamplerConfig, euler_sigmas
from context import (CONTEXT, CONTEXT_TEACHER, ContextConfig, ContextDistiller, ErrorBank, context_memory,
                     context_teacher_loss)
from distill import BETAS, DISTILLED, ODE, DMDConfig, Distiller, few_step_levels, ode_loss
from forcing import (LOSSES, METHODS, ResamplingConfig, first_chunk_step, object_weight, resampling_loss,
                     single_chunks, teacher_loss)
from memory import MemoryConfig
from model import DiT, DiTConfig, pick_device
from rollout import rollout
from vae import VAEConfig, VAETraining, load_vae, read_vae, train_vae, vae_state

DMD = DISTILLED + (CONTEXT,)             # the methods that train by DMD (a score and a critic)
FINE_TUNED = (ODE, CONTEXT_TEACHER) + DMD   # the methods that start from a trained causal model (--init)
TRAINED = METHODS + FINE_TUNED             # every --method train.py runs
STREAMED = ("teacher", "diffusion", "resampling")   # the flow-matching methods that train a causal model

# ---- defaults: one block, every value is a flag below ------------------------------------------------------
PRESETS = {   # model preset -> training hyper-parameters
    "tiny":  dict(batch=8,  lr=1e-3, steps=300,   warmup=20,   ema=0.99,  log_every=20,  save_every=100),
    "cpu":   dict(batch=8,  lr=1e-3, steps=6000,  warmup=100,  ema=0.998, log_every=25,  save_every=100),
    "small": dict(batch=32, lr=3e-4, steps=20000, warmup=1000, ema=0.999, log_every=100, save_every=2000),
    "wan":   dict(batch=1,  lr=2e-6, steps=1000,  warmup=0,    ema=0.99,  log_every=1,   save_every=100),
}
RECIPE = {    # model preset -> what no flag changes: noise schedule, precision on the CPU, the frame VAE
    # shift: timestep shift of the training noise levels and of sampling (stored in the checkpoint). 3.0 is
    #   Wan's, for 480p latents; at 16-64 tokens a frame shift 1 trains a better model (docs/cpu-recipe.md)
    # bf16: bf16 autocast on the CPU too (always on CUDA); vae_steps: train a frame VAE first (0 = pixels);
    #   colour_steps: then a colour decoder for its frozen encoder (vae.py; 0 = keep the RGB decoder)
    # sampler: the Euler steps and guidance sample.py uses for the model unless told otherwise
    "tiny":  dict(shift=1.0, bf16=False, vae_steps=0,    colour_steps=0,    sampler=dict(steps=16, cfg=3.0)),
    "cpu":   dict(shift=1.0, bf16=True,  vae_steps=4000, colour_steps=4000, sampler=dict(steps=8, cfg=3.0)),
    "small": dict(shift=1.0, bf16=False, vae_steps=0,    colour_steps=0,    sampler=dict(steps=16, cfg=3.0)),
    "wan":   dict(shift=3.0, bf16=False, vae_steps=0,    colour_steps=0,    sampler=dict(steps=16, cfg=3.0)),
}
DISTILL = {   # model preset -> the fine-tunes' (FINE_TUNED) values of the same flags, in place of PRESETS'
    "tiny":  dict(lr=1e-4, steps=100,  warmup=0, ema=0.99, log_every=10, save_every=50),
    "cpu":   dict(lr=1e-4, steps=500,  warmup=0, ema=0.99, log_every=10, save_every=50),
    "small": dict(lr=2e-5, steps=2000, warmup=0, ema=0.99, log_every=20, save_every=200),
    "wan":   dict(lr=2e-6, steps=600,  warmup=0, ema=0.99, log_every=1,  save_every=100),
}
# self, rolling with no score given: the score stage fine-tunes the causal student into the bidirectional score
SCORE_STEPS = {"tiny": 100, "cpu": 1500, "small": 5000, "wan": 1000}
CONTEXT_RECIPE = {   # model preset -> Context Forcing: steps of the teacher and of CDMD, its clips and rollouts (frames)
    "tiny":  dict(teacher_steps=100,  steps=100,  clip=16, long=16),
    "cpu":   dict(teacher_steps=300,  steps=150,  clip=32, long=32),
    "small": dict(teacher_steps=2000, steps=1000, clip=48, long=48),
    "wan":   dict(teacher_steps=600,  steps=600,  clip=84, long=84),
}
LR_FLOOR = 0.1       # the learning rate decays from its peak to LR_FLOOR x peak over the run (cosine)
WEIGHT_DECAY = 0.0
GRAD_CLIP = 1.0
MEMORY_BYTES = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
CHECKPOINTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")
DEFAULT_CKPT, SCORE_CKPT = os.path.join(CHECKPOINTS, "default.pt"), os.path.join(CHECKPOINTS, "score.pt")


def preset_defaults(key: str) -> str:
    text = ", ".join(f"{name} {values[key]:g}" for name, values in PRESETS.items())
    if key in DISTILL["cpu"]:
        text += f"; {', '.join(FINE_TUNED)}: " + ", ".join(f"{name} {values[key]:g}" for name, values in DISTILL.items())
    if key == "steps":
        text += "; except context-teacher " + ", ".join(f"{n} {v['teacher_steps']}" for n, v in CONTEXT_RECIPE.items()) \
            + ", context " + ", ".join(f"{n} {v['steps']}" for n, v in CONTEXT_RECIPE.items())
    return text


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", default="teacher", help=f"training recipe: {', '.join(TRAINED)}")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tiny", dest="preset", action="store_const", const="tiny", help="tiny model (CPU, tests)")
    size.add_argument("--cpu", dest="preset", action="store_const", const="cpu",
                      help="the 2-core CPU recipe: a frame VAE, then a latent DiT (the shipped default model)")
    size.add_argument("--small", dest="preset", action="store_const", const="small",
                      help="small model (one GPU; the default when there is one)")
    size.add_argument("--wan", dest="preset", action="store_const", const="wan",
                      help="Wan2.1-1.3B transformer shapes (for measuring; no pretrained weights)")
    p.add_argument("--data", default=None, help="folder of your own videos (mp4/gif) instead of ToyWorld")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default: {preset_defaults('steps')})")
    p.add_argument("--batch", type=int, default=None,
                   help=f"clips per step over all GPUs (default: {preset_defaults('batch')})")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default: {preset_defaults('lr')})")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"linear learning-rate warm-up steps (default: {preset_defaults('warmup')})")
    p.add_argument("--ema", type=float, default=None,
                   help=f"EMA decay of the sampled weights (default: {preset_defaults('ema')})")
    p.add_argument("--out", default=None, help="run directory for checkpoints (default: runs/<method>-<preset>)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--init", default=None, help="start from this checkpoint's EMA weights (self, rolling, ode, "
                   "context-teacher: the causal model, default with --cpu the shipped checkpoints/default.pt; "
                   "context: a self-forcing student, default one trained first into OUT/self from --base)")
    p.add_argument("--score", default=None, help="self, rolling: DMD's frozen score, a --method bidirectional model "
                   f"of the same preset (default: with --cpu {os.path.relpath(SCORE_CKPT)} if shipped, else one "
                   "trained first into OUT/score); context: the long-context teacher, a --method context-teacher "
                   "model (default: one trained first into OUT/teacher from --base)")
    p.add_argument("--base", default=None, help="context: the causal model the teacher and the self-forcing stage "
                   "start from when they are trained first (default with --cpu: checkpoints/default.pt)")
    p.add_argument("--vae", default=None,
                   help="trained frame VAE of a latent preset: a vae.pt, or a latent model whose VAE to share "
                        "(default: train one into OUT/vae first)")
    p.add_argument("--topk", type=int, default=0,
                   help="history routing: each query attends to its own chunk + its top-k history frames (0 = dense)")
    p.add_argument("--route-sink", type=int, default=0,
                   help="history routing: the first N frames are always attended, in training and streaming")
    p.add_argument("--object-weight", type=float, default=1.0,
                   help="ToyWorld, flow-matching methods: the loss weight of the cells that hold an object, against "
                        "1 for the rest (an ablation, off (1) by default: it tilts the model towards drawing object "
                        "colours everywhere; docs/cpu-recipe.md, section 9)")
    p.add_argument("--first-chunks", type=float, default=0.0,
                   help="teacher, diffusion, resampling: this share of the steps trains the clips cut into single "
                        "chunks, each drawn from the caption alone with no history (an ablation, off by default: "
                        "docs/cpu-recipe.md, section 9)")
    p.add_argument("--logit-normal", action="store_true",
                   help="flow-matching methods: training noise levels logit-normal (SD3) instead of uniform, before "
                        "the shift (an ablation, off by default: docs/cpu-recipe.md, section 12)")
    p.add_argument("--frames", type=int, default=None,
                   help="teacher, diffusion, resampling, bidirectional: training clip length in frames, the model's "
                        "trained range and so the context it streams with (default: the preset's; a whole number "
                        "of chunks)")
    rs = p.add_argument_group("resampling")
    rs.add_argument("--resample-mode", default="autoregressive", choices=("autoregressive", "parallel", "noise"),
                    help="how the history is degraded (the rows of the paper's Table 2)")
    rs.add_argument("--resample-shift", type=float, default=0.6, help="shift s of the simulation timestep t_s")
    rs.add_argument("--resample-steps", type=int, default=4, help="Euler steps that finish a resampled chunk")
    rs.add_argument("--resample-warmup", type=int, default=None,
                    help="teacher-forcing steps before resampling starts (default: 10%% of --steps)")
    p.add_argument("--log-every", type=int, default=None,
                   help=f"steps between progress lines (default: {preset_defaults('log_every')})")
    p.add_argument("--save-every", type=int, default=None,
                   help=f"steps between checkpoints (default: {preset_defaults('save_every')})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="data loader processes (default: 0 on CPU, 6 on GPU)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    args = p.parse_args(argv)
    args.preset_note = None
    if args.preset is None:   # the GPU preset would take days a run on a CPU
        args.preset = "small" if torch.cuda.is_available() else "cpu"
        if args.preset == "cpu":
            args.preset_note = "no size flag and no GPU here: training the --cpu recipe (--small is the one-GPU preset)"
    preset = {**PRESETS[args.preset], **(DISTILL[args.preset] if args.method in FINE_TUNED else {})}
    if args.method in (CONTEXT_TEACHER, CONTEXT):
        preset["steps"] = CONTEXT_RECIPE[args.preset]["teacher_steps" if args.method == CONTEXT_TEACHER else "steps"]
    for k, v in preset.items():   # flags left unset take the preset's value
        if vars(args)[k] is None:
            setattr(args, k, v)
    if args.resample_warmup is None:            # resolved now, so it is stored with the run and never drifts
        args.resample_warmup = args.steps // 10
    args.out = args.out or os.path.join("runs", f"{args.method}-{args.preset}")
    plan_stages(args)
    return args


def plan_stages(args):
    """Fill in the models a run names by default and the earlier stages that must train them first: args.stages,
    (what, out, argv) in order. --cpu takes the shipped checkpoints where they exist; anything else is trained
    into the run directory (OUT/score, OUT/teacher, OUT/self) by this same script."""
    args.stages = []
    shipped = DEFAULT_CKPT if args.preset == "cpu" else None
    if args.method in (*DISTILLED, ODE, CONTEXT_TEACHER) and args.init is None and not args.resume:
        args.init = shipped
    if args.method in DISTILLED and args.score is None:   # the shipped score (--cpu), else trained first
        args.score = SCORE_CKPT if shipped and os.path.exists(SCORE_CKPT) else os.path.join(args.out, "score", "model.pt")
        if not os.path.exists(args.score) and args.init:
            args.stages.append(("stage 0: DMD's score, the student fine-tuned into a bidirectional model",
                                os.path.dirname(args.score), ["--method", "bidirectional", "--steps",
                                str(SCORE_STEPS[args.preset]), "--init", args.init]))
    if args.method == CONTEXT:   # the teacher and the stage-1 student, trained first from --base if not given
        args.base = args.base or shipped
        teacher, student = (os.path.join(args.out, part, "model.pt") for part in ("teacher", "self"))
        if args.score is None and (os.path.exists(teacher) or args.base):
            args.score = teacher
            if not os.path.exists(teacher):
                args.stages.append(("stage 0: the long-context teacher, the base model taught through slow/fast memory",
                                    os.path.dirname(teacher), ["--method", CONTEXT_TEACHER, "--init", args.base]))
        if args.init is None and not args.resume and (os.path.exists(student) or args.base):
            args.init = student
            if not os.path.exists(student):
                args.stages.append(("stage 1: Self Forcing on short windows, from the base model",
                                    os.path.dirname(student), ["--method", "self", "--init", args.base]))


def clip_config(args) -> DiTConfig:
    """The preset's model, with --frames as its training clip (its trained range) when given."""
    cfg = DiTConfig.preset(args.preset)
    cfg.frames = args.frames or cfg.frames
    return cfg


def check(args) -> dict | None:
    """Refuse bad input with one line, before anything is built or written. Returns the --init checkpoint."""
    if args.method not in TRAINED:
        raise SystemExit(f"train.py: error: unknown --method {args.method!r} (available: {', '.join(TRAINED)})")
    if min(args.steps, args.batch, args.log_every, args.save_every) < 1 or args.lr <= 0 or args.warmup < 0:
        raise SystemExit("train.py: error: --steps, --batch, --lr, --log-every and --save-every must be positive")
    cfg = clip_config(args)
    if args.frames is not None and (args.method not in METHODS or args.frames < 2 * cfg.chunk
                                    or args.frames % cfg.chunk):
        raise SystemExit(f"train.py: error: --frames must be a whole number of chunks ({cfg.chunk} frames), at least "
                         f"two, and is for the methods that train from nothing ({', '.join(METHODS)})")
    history = cfg.frames - cfg.chunk   # history frames the last chunk of a training clip has
    if not 0 <= args.route_sink <= history:
        raise SystemExit(f"train.py: error: --route-sink must be in 0..{history} (the history of a training clip)")
    if not 0 <= args.topk <= history - args.route_sink:
        raise SystemExit(f"train.py: error: --topk {args.topk} must be in 0..{history - args.route_sink}: a training "
                         f"clip has {history} history frames{f', {args.route_sink} of them sinks' if args.route_sink else ''}"
                         f" (0 = dense attention)")
    if args.resample_steps < 1 or args.resample_shift <= 0 or args.resample_warmup < 0:
        raise SystemExit("train.py: error: --resample-steps and --resample-shift must be positive, "
                         "--resample-warmup >= 0")
    if not 0 <= args.ema < 1:
        raise SystemExit(f"train.py: error: --ema must be in [0, 1) (got {args.ema})")
    if not 0 <= args.first_chunks <= 1 or args.first_chunks and args.method not in STREAMED:
        raise SystemExit(f"train.py: error: --first-chunks is a share of the steps in [0, 1], for the causal "
                         f"flow-matching methods ({', '.join(STREAMED)})")
    if args.logit_normal and args.method not in METHODS:
        raise SystemExit(f"train.py: error: --logit-normal is for the flow-matching methods ({', '.join(METHODS)})")
    if args.object_weight != 1 and (args.method not in METHODS or args.data or args.object_weight <= 0):
        raise SystemExit("train.py: error: --object-weight must be positive and is for the flow-matching methods "
                         f"({', '.join(METHODS)}) on ToyWorld, whose objects it can find")
    pixels = cfg.height * (2 ** VAEConfig.downs if RECIPE[args.preset]["vae_steps"] or args.vae else 1)
    clip_bytes = args.batch * cfg.frames * 3 * pixels ** 2 * 4   # the rendered clips (encoded later, if latent)
    if clip_bytes > MEMORY_BYTES / 4:
        raise SystemExit(f"train.py: error: --batch {args.batch} needs {clip_bytes / 2**30:.1f} GiB for its clips "
                         f"alone; this machine has {MEMORY_BYTES / 2**30:.0f} GiB")
    try:
        pick_device(args.device)
    except ValueError as e:
        raise SystemExit(f"train.py: error: {e}")
    vae_stage = os.path.isdir(os.path.join(args.out, "vae"))   # a latent run killed while it trained its VAE
    if args.resume and latest_checkpoint(args.out) is None and not vae_stage:
        raise SystemExit(f"train.py: error: --resume found no checkpoint (ckpt_*.pt) in {args.out}")
    if args.resume and args.init:
        raise SystemExit("train.py: error: --resume continues a run, --init starts one: give one of them")
    if args.vae and not os.path.isfile(args.vae):
        raise SystemExit(f"train.py: error: --vae {args.vae} is not a file (a vae.pt written by vae.py or train.py)")
    if args.vae and cfg.channels == 3:
        raise SystemExit(f"train.py: error: --vae is for a latent preset (--cpu); --{args.preset} models pixels")
    if args.method in DMD:
        check_distillation(args, cfg)
    if args.method in (ODE, CONTEXT_TEACHER) and not args.resume and not args.init:
        raise SystemExit(f"train.py: error: --method {args.method} fine-tunes a causal model: name it with --init")
    if not args.init or args.stages:   # (an --init still to be trained is loaded after its stage)
        return None
    try:
        init = load_checkpoint(args.init)
        check_same_model(init, cfg)
    except CheckpointError as e:
        raise SystemExit(f"train.py: error: --init: {e}")
    return init


def check_distillation(args, cfg: DiTConfig):
    """self, rolling, context: a student --init (unless resuming) and a --score of this size and the right kind
    (unless they are to be trained first)."""
    if not args.resume and not args.init:
        hint = "name it with --init" + (" or the model to train it from with --base" if args.method == CONTEXT else "")
        raise SystemExit(f"train.py: error: --method {args.method} distils a causal model: {hint}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit(f"train.py: error: --method {args.method} runs in one process (no torchrun yet)")
    if args.score is None:
        raise SystemExit("train.py: error: --method context needs its long-context teacher: name it with --score, or "
                         "the model to train it from with --base")
    if any(args.score == os.path.join(out, "model.pt") for _, out, _ in args.stages):
        return   # trained first
    try:
        score = load_checkpoint(args.score)
        check_same_model(score, cfg)
    except CheckpointError as e:
        raise SystemExit(f"train.py: error: --score: {e}")
    kind = CONTEXT_TEACHER if args.method == CONTEXT else "bidirectional"
    if score["method"] != kind:
        what = ("Context Forcing's score is the long-context teacher (--method context-teacher)" if kind != "bidirectional"
                else "DMD's score is a bidirectional clip model (--method bidirectional)")
        raise SystemExit(f"train.py: error: --score {args.score} is a {score['method']} model; {what}")

def settings(args) -> dict:
    """What defines a run: every flag that changes the trained weights (not where or how often it reports)."""
    skip = ("out", "resume", "init", "vae", "base", "log_every", "save_every", "workers", "device", "preset_note",
            "stages")
    return {k: v for k, v in sorted(vars(args).items()) if k not in skip}


# ---- data ------------------------------------------------------------------------------------------------
class Clips(torch.utils.data.IterableDataset):
    """An endless stream of (video, prompt tokens) training batches, from ToyWorld or a video folder."""

    def __init__(self, cfg: DiTConfig, batch: int, seed: int, folder: VideoFolder | None, start: int,
                 pixels: int | None, frames: int):
        """pixels: the frame size to render (a latent model's frames are encoded later); None: random latents.
        frames: the clip length."""
        self.cfg, self.batch, self.seed, self.folder, self.start, self.pixels = cfg, batch, seed, folder, start, pixels
        self.frames = frames

    def __iter__(self):
        # batch i is drawn from its own seed [seed, i], and worker w of n makes batches w, w+n, ... which the
        # loader returns in order: the stream is the same for any number of workers and after --resume
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info else (0, 1)
        c = self.cfg
        latents = self.pixels is None   # the Wan shape: no VAE for it here, so random latents (speed, memory only)
        world = None if latents else WorldConfig(size=self.pixels)
        for i in range(self.start + w, 2**62, n):
            rng = np.random.default_rng([self.seed, i])
            if self.folder is not None:
                x, captions = self.folder.sample(rng, self.batch)
            elif latents:
                x = rng.standard_normal((self.batch, self.frames, c.channels, c.height, c.width), dtype=np.float32)
                captions = [""] * self.batch
            else:
                x, captions = sample_clips(rng, self.batch, self.frames, world)
            yield torch.from_numpy(x), torch.from_numpy(tokenize(captions, self.cfg.text_len))


def batches(cfg, batch, seed, folder, workers, start, pixels, frames):
    # its own generator: the loader must not draw from the global RNG that the losses' noise comes from
    loader = torch.utils.data.DataLoader(Clips(cfg, batch, seed, folder, start, pixels, frames), batch_size=None,
                                         num_workers=workers,
                                         pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                                         generator=torch.Generator())
    return iter(loader)


# ---- the sample strip --------------------------------------------------------------------------------------
@torch.no_grad()
def sample_strip(model, path, sampler: SamplerConfig, vae=None, seconds=2.0, prompts=2, seed=0):
    """Stream a few seconds per prompt and save one row of frames per prompt as a PNG."""
    import imageio.v3 as iio

    cfg, device = model.cfg, next(model.parameters()).device
    world = WorldConfig(size=cfg.height * (vae.factor if vae else 1))
    captions = [ToyWorld(seed + i, world).caption(0) for i in range(prompts)]
    tokens = torch.from_numpy(tokenize(captions, cfg.text_len)).to(device)
    n = int(seconds * world.fps)
    memory = MemoryConfig(policy="sink", window=cfg.frames - cfg.chunk - cfg.chunk, sink=cfg.chunk)
    g = torch.Generator(device).manual_seed(seed)
    video = torch.cat(list(rollout(model, tokens, n, memory, sampler, g)), 1)[:, :n]
    video = video[:, ::max(1, n // 16)].float()
    frames = to_uint8((vae.decode(video) if vae else video).cpu().numpy())        # (P, 16, H, W, 3)
    rows = [np.concatenate(list(f), axis=1) for f in frames]
    iio.imwrite(path + ".tmp", np.concatenate(rows, axis=0).repeat(2, 0).repeat(2, 1), extension=".png")
    os.replace(path + ".tmp", path)


def learning_rate(args, step: int) -> float:
    """Linear warm-up to --lr, then a cosine decay to LR_FLOOR x --lr at the last step."""
    decay = LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, args.steps))))
    return args.lr * min(1.0, (step + 1) / max(1, args.warmup)) * decay


def distilled_vae(student: dict, score: dict):
    """The frame VAE a distillation runs in: the student's, which the score must share (None for pixel models)."""
    if ("vae" in student) != ("vae" in score):
        raise SystemExit("train.py: error: --score and the student do not model the same frames (one is latent)")
    if "vae" not in student:
        return None
    # the encoder and its statistics define the latent space; the decoders may differ (RGB or colour)
    a, b = ({k: v for k, v in m["vae"]["state"].items() if k.startswith("encoder.") or k in ("shift", "scale")}
            for m in (student, score))
    if a.keys() != b.keys() or any(not torch.allclose(a[k].float(), b[k].float(), atol=1e-2) for k in a):
        raise SystemExit("train.py: error: --score and the student were trained on the latents of different VAEs")
    return load_vae(student["vae"])


def frame_vae(args, steps: int, colour_steps: int, ddp: bool, init: dict | None):
    """The frame VAE of a latent preset: --vae, the --init model's (or, resuming, the run's own), or the one this run
    trained into OUT/vae, with its colour decoder from OUT/vae-colours if the preset has one (trained now if
    missing)."""
    found = init if init is not None else load_checkpoint(latest_checkpoint(args.out)) if args.resume and \
        latest_checkpoint(args.out) else None
    if not args.vae and found is not None and "vae" in found:
        return load_vae(found["vae"])
    if args.vae:
        return read_vae(args.vae, "train.py")   # a vae.pt, or a latent model's checkpoint
    if ddp:
        raise SystemExit("train.py: error: train the frame VAE first (python vae.py --out runs/vae) and pass --vae")
    log = lambda line: print(line, flush=True)
    print(f"stage 1: the frame VAE ({steps} steps), into {os.path.join(args.out, 'vae')}", flush=True)
    vae = train_vae(os.path.join(args.out, "vae"), VAEConfig(), VAETraining(steps=steps, seed=args.seed), log=log)
    if not colour_steps or args.data:   # a colour decoder draws only ToyWorld's colours: not for --data videos
        return vae
    out = os.path.join(args.out, "vae-colours")
    print(f"stage 1b: its colour decoder ({colour_steps} steps, the encoder frozen), into {out}", flush=True)
    return train_vae(out, vae.cfg, VAETraining(steps=colour_steps, seed=args.seed), log=log, init=vae)


def gather(obj, ddp: bool) -> list:
    if not ddp:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rank_seed(seed: int, rank: int) -> int:
    """Each rank its own noise stream (sigma, eps, t_s, prompt dropout); weights are drawn before, from `seed`."""
    return int(np.random.SeedSequence([seed, rank, 1]).generate_state(1)[0])


# ---- training ----------------------------------------------------------------------------------------------
def train(args, init: dict | None = None):
    """Train and return the (unwrapped) model. Works alone or as one rank of torchrun. init: check(args)'s."""
    assert (init is None) == (not args.init), "pass the --init checkpoint that check(args) loaded"
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = pick_device(args.device)
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    else:
        rank, world_size = 0, 1
    master = rank == 0
    if args.batch % world_size:
        raise SystemExit(f"train.py: error: --batch {args.batch} must divide by the {world_size} processes")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    lock = lock_run_directory(args.out) if master else None

    cfg = clip_config(args)
    cfg.topk, cfg.route_sink = args.topk, args.route_sink
    recipe = RECIPE[args.preset]
    vae, distilling, ode = None, args.method in DMD, args.method == ODE
    ctx = ContextConfig(clip=CONTEXT_RECIPE[args.preset]["clip"], long=CONTEXT_RECIPE[args.preset]["long"])
    frames = ctx.clip if args.method == CONTEXT_TEACHER else cfg.frames   # the teacher trains on long clips
    if ode:   # the teacher: --init, kept in the run directory so that --resume regresses the same one
        if init is not None:
            export_model(os.path.join(args.out, "teacher.pt"), init)
        teacher_ckpt = load_checkpoint(os.path.join(args.out, "teacher.pt"))
        teacher = model_from_checkpoint(teacher_ckpt).float().to(device).eval().requires_grad_(False)
        vae = load_vae(teacher_ckpt["vae"]).to(device) if "vae" in teacher_ckpt else None
        levels = few_step_levels("self", cfg)   # the ODE runs the teacher's own Euler steps, rounded to fit them
        every = max(1, round(teacher_ckpt["sampler"]["steps"] / len(levels)))
        ode_grid = euler_sigmas(every * len(levels), recipe["shift"])
    elif distilling:   # the student's latent space is its own: the VAE comes with the model being distilled
        score_ckpt = load_checkpoint(args.score)
        vae = distilled_vae(init if init is not None else load_checkpoint(latest_checkpoint(args.out)), score_ckpt)
        vae = vae.to(device) if vae else None
    elif args.vae or recipe["vae_steps"]:   # a latent model: its frame VAE first (trained here unless given)
        vae = frame_vae(args, recipe["vae_steps"], recipe["colour_steps"], ddp, init).to(device)
        if vae.cfg.latent != cfg.channels:
            raise SystemExit(f"train.py: error: the VAE has {vae.cfg.latent} latent channels, --{args.preset} "
                             f"models {cfg.channels}")
    pixels = cfg.height * vae.factor if vae else (cfg.height if cfg.channels == 3 else None)
    if args.data and pixels is None:
        raise SystemExit(f"train.py: error: --data needs an RGB or VAE model; --{args.preset} models random latents")
    folder = VideoFolder(args.data, size=pixels, frames=frames) if args.data else None
    torch.manual_seed(args.seed)   # identical initial weights on every rank
    model = DiT(cfg).to(device)
    if init is not None:
        model.load_state_dict(init["ema"])
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=BETAS if distilling else (0.9, 0.99),
                            weight_decay=WEIGHT_DECAY)
    distiller = None
    if distilling:   # the critic starts as the score: the closest model to the student's samples there is
        score, critic = (model_from_checkpoint(score_ckpt).float().to(device) for _ in range(2))
        dmd = DMDConfig(levels=few_step_levels(args.method, cfg), shift=recipe["shift"])
        distiller = ContextDistiller(score, critic, dmd, args.lr, ctx) if args.method == CONTEXT else \
            Distiller(args.method, score, critic, dmd, args.lr)
    bank = ErrorBank(ctx) if args.method == CONTEXT_TEACHER else None   # the teacher's error recycling
    torch.manual_seed(rank_seed(args.seed, rank))   # from here on, the noise of the losses: its own per rank
    step = 0
    if args.resume and latest_checkpoint(args.out):   # (a run stopped in stage 1 has none yet: the DiT starts)
        ckpt = load_checkpoint(latest_checkpoint(args.out))
        check_resume(ckpt, args.method, cfg, settings(args), args.steps, world_size)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        if distiller:
            distiller.load_state_dict(ckpt)
        if bank:
            bank.load_state_dict(ckpt["bank"])
        restore_rng(ckpt["rng"][rank], device)
        step = ckpt["step"]
        if master:
            print(f"resumed from {ckpt['path']} at step {step}")
    net = torch.nn.parallel.DistributedDataParallel(model, [device] if device.type == "cuda" else None) if ddp else model
    net.cfg = cfg   # the losses read the chunk size from model.cfg, also through the DDP wrapper
    workers = args.workers if args.workers is not None else (6 if device.type == "cuda" else 0)
    data = batches(cfg, args.batch // world_size, args.seed * 1000 + rank, folder, workers, step, pixels, frames)
    amp = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda" or recipe["bf16"])
    few = distiller.cfg.levels if distilling else levels if ode else None   # a few-step model's levels
    sampler = dict(steps=len(few), cfg=1.0) if few else recipe["sampler"]
    extra = {"shift": recipe["shift"], "sampler": sampler, "args": settings(args)}
    if vae:
        extra["vae"] = vae_state(vae)
    weighted = args.object_weight != 1 and args.method in METHODS
    loss_fn = LOSSES.get(args.method)
    if args.method == "resampling":
        rs = ResamplingConfig(args.resample_mode, args.resample_shift, args.resample_steps, args.resample_warmup)
        loss_fn = functools.partial(resampling_loss, cfg=rs, resampler=model)
    if master:
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(settings(args), f, indent=1)
        n = sum(p.numel() for p in model.parameters())
        stage = "stage 2: " if vae and init is None and args.method in METHODS else ""   # (stage 1 made the VAE)
        print(stage + f"{args.method} | {args.preset} {n / 1e6:.2f}M params | {cfg.frames} frames x "
              f"{cfg.tokens_per_frame} tokens | batch {args.batch} on {world_size} x {device.type} | out {args.out}")
        log = open(os.path.join(args.out, "log.jsonl"), "a")

    t0, seen, losses, critic_losses, start = time.time(), 0, [], [], time.time()
    while step < args.steps:
        lr = learning_rate(args, step)
        for group in opt.param_groups:
            group["lr"] = lr
        x, tokens = (t.to(device, non_blocking=True) for t in next(data))
        if distilling:   # data-free: the clips' captions are all DMD reads
            distiller.progress = step / args.steps   # (Context Forcing's curriculum)
            critic_losses.append(distiller.train_critic(model, tokens, lr, GRAD_CLIP, amp))
            with amp:
                loss = distiller.student_loss(model, tokens)
        else:
            weight = object_weight(x, args.object_weight, vae.factor if vae else 1) if weighted else None
            with amp:
                if vae:
                    with torch.no_grad():
                        x = vae.encode(x).float()   # (B, F, latent, h, w)
                warming_up = args.method == "resampling" and step < rs.warmup   # teacher forcing first
                if first_chunk_step(args.first_chunks, step):   # (B, F, ...) -> (B * F / chunk, chunk, ...)
                    x, tokens, weight = single_chunks(x, tokens, weight, cfg.chunk)
                    warming_up = True   # nothing to resample: a single chunk has no history
                if ode:
                    loss = ode_loss(net, x, tokens, teacher, ode_grid, every, teacher_ckpt["sampler"]["cfg"])
                elif bank is not None:
                    loss = context_teacher_loss(net, x, tokens, recipe["shift"], context_memory(cfg), bank)
                else:
                    loss = (teacher_loss if warming_up else loss_fn)(net, x, tokens, recipe["shift"], weight=weight,
                                                                     logit_normal=args.logit_normal)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - args.ema)
        step += 1
        seen += x.shape[0] * x.shape[1] * world_size
        losses.append(loss.item())
        if master and (step % args.log_every == 0 or step == args.steps):
            dt = time.time() - t0
            eta = dt / len(losses) * (args.steps - step)
            critic = f" | critic {np.mean(critic_losses):.4f}" if distilling else ""
            print(f"step {step:6d}/{args.steps} | loss {np.mean(losses):.4f}{critic} | grad {gnorm:.3f} | lr {lr:.2e} | "
                  f"{dt / len(losses):.3f} s/step | {seen / dt:.0f} frames/s | eta {eta / 60:.1f} min", flush=True)
            log.write(json.dumps({"step": step, "loss": float(np.mean(losses)), "grad": float(gnorm), "lr": lr,
                                  "s_per_step": dt / len(losses), "wall_s": time.time() - start,
                                  **({"critic": float(np.mean(critic_losses))} if distilling else {})}) + "\n")
            log.flush()
            t0, seen, losses, critic_losses = time.time(), 0, [], []
        if step % args.save_every == 0 or step == args.steps:
            rng = gather(rng_states(device), ddp)   # the noise of the losses, per rank
            if master:
                save_checkpoint(os.path.join(args.out, f"ckpt_{step:07d}.pt"), model, ema, opt, args.method, step,
                                {**extra, "rng": rng, **(distiller.state_dict() if distilling else {}),
                                 **({"bank": bank.state_dict()} if bank else {})})
                prune_checkpoints(args.out)
    if master:
        final = latest_checkpoint(args.out)
        export_model(os.path.join(args.out, "model.pt"), load_checkpoint(final))
        print(f"wrote {os.path.join(args.out, 'model.pt')} (the EMA weights of {final} in fp16, for sampling)")
    if master and args.method != "bidirectional" and pixels is not None:   # a clip model does not stream
        path = os.path.join(args.out, "samples.png")
        print(f"streaming {path} from the EMA model ...", flush=True)
        sample_strip(ema.eval(), path, SamplerConfig(kind="few" if few else "euler", shift=recipe["shift"],
                                                     clip=None if vae else 1.0, **({"levels": few} if few else {})), vae)
        print(f"wrote {path}")
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    return model


def run_stage(args, what: str, out: str, argv: list):
    """Train an earlier stage of this run into `out` (resumed if it was stopped there) with the run's preset and
    seed, by the same code as its own command. The score stage, for instance, fine-tunes the causal student into
    the bidirectional score (same weights, full attention over the clip) for SCORE_STEPS: the student already
    draws the world, so this takes minutes where a score from nothing would take as long as the student did."""
    argv = argv + [f"--{args.preset}", "--seed", str(args.seed), "--out", out]
    if latest_checkpoint(out) is not None:   # continue it: its settings are the stored ones
        i = argv.index("--init")
        argv = argv[:i] + argv[i + 2:] + ["--resume"]
    print(f"{what}, into {out}", flush=True)
    stage = parse(argv)
    run(stage, check(stage))


def run(args, init: dict | None):
    """Train the earlier stages the run needs, then the run itself."""
    for what, out, argv in args.stages:
        run_stage(args, what, out, argv)
    if args.stages:
        args.stages = []
        init = check(args)   # now that every model it names exists
    train(args, init)


def main(argv=None):
    args = parse(argv)
    init = check(args)
    if args.preset_note:
        print(f"train.py: {args.preset_note}")
    for sig in (signal.SIGINT, signal.SIGTERM):   # one line, even where a shell started it with SIGINT ignored
        signal.signal(sig, signal.default_int_handler)
    try:
        run(args, init)
    except (DataError, CheckpointError) as e:
        raise SystemExit(f"train.py: error: {e}")
    except MemoryError:
        raise SystemExit(f"train.py: error: out of memory; try a smaller --batch than {args.batch}")
    except KeyboardInterrupt:
        found = latest_checkpoint(args.out)
        print(f"train.py: error: interrupted; " + (f"--resume continues from {found}" if found else
              "no checkpoint was written yet"), file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
