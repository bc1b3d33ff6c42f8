"""
Train one forcing method of the block-causal DiT on ToyWorld (or on a folder of your own videos).

    python train.py --method resampling --cpu                    # the shipped default model, on a 2-core CPU
    python train.py --method self --cpu                          # Self Forcing: DMD of the default (score.pt)
    python train.py --method teacher --tiny                      # a smoke run, a couple of minutes
    python train.py --method teacher --small --out runs/teacher  # one GPU
    torchrun --nproc_per_node 4 train.py --method teacher --small

This file is the command line: the flags and their checks (bad input gets one error line before anything is
built or written), and the stages a run trains first. The --cpu preset is a latent model: stage 1 trains a frame
VAE (vae.py) into OUT/vae, stage 2 the DiT on its latents; the VAE travels inside every checkpoint, so sampling
decodes frames without it being named. Self and Rolling Forcing need DMD's score and start from Causal Forcing's ODE
stage of a many-step causal model, Context Forcing needs its long-context teacher and a self-forcing student: where
no flag names them, they are trained first into the run directory, by this same script. The presets' values are in
recipe.py, the training loop in trainer.py. A killed run leaves no temporary files behind, and --resume continues it.
"""

import argparse
import os
import signal
import sys
from dataclasses import replace

import torch

from checkpoint import CheckpointError, check_same_model, latest_checkpoint, load_checkpoint
from context import CONTEXT, CONTEXT_TEACHER
from data import DataError
from distill import DISTILLED, ODE, DMDConfig, rolling_room
from forcing import METHODS
from model import DiTConfig, pick_device
from recipe import (CONTEXT_RECIPE, DISTILL, DMD, FINE_TUNED, ODE_STEPS, PRESETS, RECIPE, SCORE_STEPS, STREAMED,
                    TRAINED, clip_config, preset_defaults)
from trainer import train
from vae import VAEConfig

MEMORY_BYTES = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
CHECKPOINTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")
DEFAULT_CKPT, SCORE_CKPT = os.path.join(CHECKPOINTS, "default.pt"), os.path.join(CHECKPOINTS, "score.pt")
# --event-clips: the methods whose clips may carry a caption per frame (Context Forcing's memory and the ODE stage's
# teacher run one caption per clip)
EVENT_METHODS = (*STREAMED, "bidirectional", *DISTILLED)


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
                   f"of the same preset (default: with --cpu and no --init {os.path.relpath(SCORE_CKPT)}, the shipped "
                   "default's; else one trained first into OUT/score from --init); context: the long-context teacher, "
                   "a --method context-teacher model (default: one trained first into OUT/teacher from --base)")
    p.add_argument("--ode-steps", type=int, default=None, help="self, rolling: steps of Causal Forcing's ODE stage, "
                   "trained first into OUT/ode when --init is a many-step causal model (teacher, diffusion, "
                   "resampling), so that DMD starts from a few-step student (default: "
                   + ", ".join(f"{k} {v}" for k, v in ODE_STEPS.items()) + "; 0: distil --init as it is)")
    p.add_argument("--score-guidance", type=float, default=DMDConfig.guidance,
                   help="self, rolling, context (its contextual DMD stage): the score's classifier-free guidance g in "
                   "DMD's form cond + g (cond - uncond), standard guidance g + 1 (default: %(default)g, the "
                   "reference's)")
    p.add_argument("--levels", type=int, default=None,
                   help="self, rolling, context (and their ODE stage): the student's few-step levels, denoising calls "
                   "a chunk (default: 4, Self Forcing's list; rolling: its window's chunks, as many as leave room for "
                   "a sink and a history chunk in the trained frames, at most 4; docs/context.md section 6)")
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
    p.add_argument("--event-clips", type=float, default=0.0,
                   help="teacher, diffusion, resampling, bidirectional, self, rolling on ToyWorld: this share of the "
                        "training clips crosses one of the world's scene events, and every clip is conditioned on a "
                        "caption per frame, so the model learns to follow a caption that changes mid-stream, as a "
                        "prompt switch does; self and rolling roll out across the event and DMD grades it, with a "
                        "score that reads a caption per frame (the score stage takes the flag too) (default 0: one "
                        "caption per clip, its first frame's)")
    p.add_argument("--logit-normal", action=argparse.BooleanOptionalAction, default=None,
                   help="flow-matching methods: training noise levels logit-normal (SD3) instead of uniform, before "
                        f"the shift (default: {preset_defaults('logit_normal')}; docs/cpu-recipe.md, sections 12-13)")
    p.add_argument("--frames", type=int, default=None,
                   help="teacher, diffusion, resampling, bidirectional: training clip length in frames, the model's "
                        "trained range and so the context it streams with (default: the preset's; a whole number "
                        "of chunks)")
    p.add_argument("--dim", type=int, default=None,
                   help="teacher, diffusion, resampling, bidirectional from nothing: the DiT's width (default: the "
                        "preset's); the heads keep the preset's head size and the MLP its ratio to the width "
                        "(docs/cpu-recipe.md section 20)")
    p.add_argument("--depth", type=int, default=None,
                   help="teacher, diffusion, resampling, bidirectional from nothing: the DiT's blocks (default: the "
                        "preset's; docs/cpu-recipe.md section 24)")
    p.add_argument("--patch", type=int, default=None,
                   help="teacher, diffusion, resampling, bidirectional from nothing: the DiT's spatial patch, so its "
                        "tokens a frame (default: the preset's; docs/cpu-recipe.md section 27)")
    rs = p.add_argument_group("resampling")
    rs.add_argument("--resample-mode", default="autoregressive", choices=("autoregressive", "parallel", "noise"),
                    help="how the history is degraded (the rows of the paper's Table 2)")
    rs.add_argument("--resample-shift", type=float, default=0.6, help="shift s of the simulation timestep t_s")
    rs.add_argument("--resample-steps", type=int, default=4, help="Euler steps that finish a resampled chunk")
    rs.add_argument("--resample-warmup", type=int, default=None,
                    help="teacher-forcing steps before resampling starts (default: 10%% of --steps)")
    rs.add_argument("--resample-share", type=float, default=1.0,
                    help="share of each batch's clips whose history is resampled; the others keep the ground truth, as "
                         "in teacher forcing (an ablation, docs/cpu-recipe.md section 23)")
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
    if args.ode_steps is None:
        args.ode_steps = ODE_STEPS[args.preset] if args.method in DISTILLED else 0
    plan_stages(args)
    return args


def plan_stages(args):
    """Fill in the models a run names by default and the earlier stages that must train them first: args.stages,
    (what, out, argv) in order. --cpu takes the shipped checkpoints where they exist; anything else is trained
    into the run directory (OUT/score, OUT/ode, OUT/teacher, OUT/self) by this same script."""
    args.stages = []
    shipped = DEFAULT_CKPT if args.preset == "cpu" else None
    # the shipped score is the shipped default fine-tuned, so it is the score of that student only: a student named
    # with --init (any other file) gets its own, fine-tuned from it (a score must know the world its student draws),
    # and a resumed run keeps the score it trained
    own_score = os.path.join(args.out, "score", "model.pt")
    shipped_score = shipped is not None and os.path.exists(SCORE_CKPT) \
        and (args.init is None or os.path.abspath(args.init) == os.path.abspath(shipped)) \
        and not (args.resume and os.path.exists(own_score))
    if args.method in (*DISTILLED, ODE, CONTEXT_TEACHER) and args.init is None and not args.resume:
        args.init = shipped
    if args.method in DISTILLED and args.score is None:   # the shipped score (--cpu, its student), else trained first
        args.score = SCORE_CKPT if shipped_score else own_score
        if not os.path.exists(args.score) and args.init:
            events = ["--event-clips", str(args.event_clips)] if args.event_clips else []   # it grades the switches
            args.stages.append(("stage 0: DMD's score, the student fine-tuned into a bidirectional model",
                                os.path.dirname(args.score), ["--method", "bidirectional", "--steps",
                                str(SCORE_STEPS[args.preset]), "--init", args.init, *events]))
    levels = ["--levels", str(args.levels)] if args.levels else []   # the earlier students' few-step levels
    if args.method in DISTILLED and args.ode_steps and args.init and many_step(args.init):
        ode = os.path.join(args.out, "ode", "model.pt")
        if not os.path.exists(ode):   # the score above starts from the many-step model, the student from its ODE
            args.stages.append(("stage 1: Causal Forcing's ODE initialisation, the student regressed onto its own "
                                "ODE as a few-step model", os.path.dirname(ode),
                                ["--method", ODE, "--steps", str(args.ode_steps), "--init", args.init, *levels]))
        args.init = ode
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
                # (straight from the base, as docs/context.md measured it: its ODE stage is not measured here)
                args.stages.append(("stage 1: Self Forcing on short windows, from the base model",
                                    os.path.dirname(student), ["--method", "self", "--init", args.base,
                                                               "--ode-steps", "0", *levels]))


def many_step(path: str) -> bool:
    """Whether a checkpoint is a many-step causal model (made by flow matching), not a few-step student. A file that
    does not load says no here; check() then refuses it in one line."""
    try:
        return load_checkpoint(path)["method"] in STREAMED
    except CheckpointError:
        return False


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
    base = DiTConfig.preset(args.preset)
    head = base.head_dim
    if args.dim is not None and (args.method not in METHODS or args.init or args.dim < head or args.dim % head):
        raise SystemExit(f"train.py: error: --dim must be a multiple of the --{args.preset} head size {head}, for the "
                         f"methods that train from nothing ({', '.join(METHODS)}; a fine-tune keeps its --init's width)")
    if args.depth is not None and (args.method not in METHODS or args.init or args.depth < 1):
        raise SystemExit(f"train.py: error: --depth must be at least 1, for the methods that train from nothing "
                         f"({', '.join(METHODS)}; a fine-tune keeps its --init's depth)")
    if args.patch is not None and (args.method not in METHODS or args.init or args.patch < 1
                                   or base.height % args.patch or base.width % args.patch):
        raise SystemExit(f"train.py: error: --patch must divide the --{args.preset} frame "
                         f"({base.height}x{base.width}), for the methods that train from nothing "
                         f"({', '.join(METHODS)}; a fine-tune keeps its --init's patch)")
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
    if not 0 < args.resample_share <= 1:
        raise SystemExit(f"train.py: error: --resample-share must be in (0, 1] (got {args.resample_share}; "
                         "no resampled clip at all is --method teacher)")
    if not 0 <= args.ema < 1:
        raise SystemExit(f"train.py: error: --ema must be in [0, 1) (got {args.ema})")
    if not 0 <= args.first_chunks <= 1 or args.first_chunks and args.method not in STREAMED:
        raise SystemExit(f"train.py: error: --first-chunks is a share of the steps in [0, 1], for the causal "
                         f"flow-matching methods ({', '.join(STREAMED)})")
    if not 0 <= args.event_clips <= 1 or args.event_clips and (args.method not in EVENT_METHODS or args.data):
        raise SystemExit(f"train.py: error: --event-clips is a share of the clips in [0, 1], for "
                         f"{', '.join(EVENT_METHODS)} on ToyWorld, whose events it knows")
    if args.score_guidance < 0 or args.score_guidance != DMDConfig.guidance and args.method not in DMD:
        raise SystemExit(f"train.py: error: --score-guidance must be >= 0 and is for the DMD methods "
                         f"({', '.join(DMD)})")
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
    if args.ode_steps < 0 or args.ode_steps and args.method not in DISTILLED:
        raise SystemExit(f"train.py: error: --ode-steps is a number of steps >= 0, for {' and '.join(DISTILLED)}")
    if args.vae and not os.path.isfile(args.vae):
        raise SystemExit(f"train.py: error: --vae {args.vae} is not a file (a vae.pt written by vae.py or train.py)")
    if args.vae and cfg.channels == 3:
        raise SystemExit(f"train.py: error: --vae is for a latent preset (--cpu); --{args.preset} models pixels")
    if args.levels is not None and (args.method not in (*DMD, ODE) or args.levels < 1):
        raise SystemExit(f"train.py: error: --levels is a number of few-step levels >= 1, for the few-step students "
                         f"({', '.join((*DMD, ODE))})")
    if args.levels and args.method == "rolling" and args.levels > rolling_room(cfg):
        raise SystemExit(f"train.py: error: --levels {args.levels}: a rolling window of at most {rolling_room(cfg)} "
                         f"chunks leaves room for a sink and a history chunk in the {cfg.frames} trained frames")
    if args.method in DMD:
        check_distillation(args, cfg)
    if args.method in (ODE, CONTEXT_TEACHER) and not args.resume and not args.init:
        raise SystemExit(f"train.py: error: --method {args.method} fine-tunes a causal model: name it with --init")
    if not args.init or args.stages:   # (an --init still to be trained is loaded after its stage)
        return None
    try:
        init = load_checkpoint(args.init)
        if args.method in METHODS:   # a fine-tune has its --init's width, depth and patch (flags: from nothing)
            theirs = init["config"]
            args.dim = theirs["dim"] if theirs["dim"] != base.dim else None
            args.depth = theirs["depth"] if theirs["depth"] != base.depth else None
            args.patch = theirs["patch"] if theirs["patch"] != base.patch else None
            cfg = clip_config(args)
        # --frames with --init: the same weights trained on other clip lengths (time positions are RoPE angles,
        # not weights), e.g. a model that draws the world fine-tuned on longer clips for a longer context
        check_same_model(init, replace(cfg, frames=init["config"]["frames"]) if args.frames else cfg)
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
