"""
The training recipes: for each model preset (tiny, cpu, small, wan; the sizes are DiTConfig.preset's), the
hyper-parameters a run takes unless a flag says otherwise, what no flag changes (the noise schedule, bf16 on the
CPU, the frame VAE's stages, the sampler the model ships with), the fine-tunes' own values (ODE, Self, Rolling and
Context Forcing start from a trained model) and the learning-rate schedule. Why the --cpu recipe is what it is,
ablation by ablation: docs/cpu-recipe.md.

    python recipe.py     # prints each preset's recipe
"""

import math

from context import CONTEXT, CONTEXT_TEACHER
from distill import DISTILLED, ODE
from forcing import METHODS
from model import DiTConfig

DMD = DISTILLED + (CONTEXT,)             # the methods that train by DMD (a score and a critic)
FINE_TUNED = (ODE, CONTEXT_TEACHER) + DMD   # the methods that start from a trained causal model (--init)
TRAINED = METHODS + FINE_TUNED             # every --method train.py runs
STREAMED = ("teacher", "diffusion", "resampling")   # the flow-matching methods that train a causal model

# ---- the presets: every value of PRESETS and DISTILL is a train.py flag's default ----------------------------
PRESETS = {   # model preset -> training hyper-parameters
    # logit_normal: the flow-matching losses draw their noise levels logit-normal (SD3), not uniform: more of the
    #   training at the middle levels where a frame's objects are decided (docs/cpu-recipe.md, sections 12-13)
    "tiny":  dict(batch=8,  lr=1e-3, steps=300,   warmup=20,   ema=0.99,  log_every=20,  save_every=100,
                  logit_normal=False),
    "cpu":   dict(batch=8,  lr=1e-3, steps=6000,  warmup=100,  ema=0.998, log_every=25,  save_every=100,
                  logit_normal=True),
    "small": dict(batch=32, lr=3e-4, steps=20000, warmup=1000, ema=0.999, log_every=100, save_every=2000,
                  logit_normal=True),
    "wan":   dict(batch=1,  lr=2e-6, steps=1000,  warmup=0,    ema=0.99,  log_every=1,   save_every=100,
                  logit_normal=False),
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
    # (no flow-matching loss of their own: their noise levels are DMD's, the ODE's or the long-context teacher's)
    "tiny":  dict(lr=1e-4, steps=100,  warmup=0, ema=0.99, log_every=10, save_every=50,  logit_normal=False),
    "cpu":   dict(lr=1e-4, steps=500,  warmup=0, ema=0.99, log_every=10, save_every=50,  logit_normal=False),
    "small": dict(lr=2e-5, steps=2000, warmup=0, ema=0.99, log_every=20, save_every=200, logit_normal=False),
    "wan":   dict(lr=2e-6, steps=600,  warmup=0, ema=0.99, log_every=1,  save_every=100, logit_normal=False),
}
# self, rolling with no score given: the score stage fine-tunes the causal student into the bidirectional score
SCORE_STEPS = {"tiny": 100, "cpu": 1500, "small": 5000, "wan": 1000}
# self, rolling from a many-step causal model: Causal Forcing's ODE stage first regresses it onto its own ODE, so DMD
# starts from a few-step student (docs/distillation.md, section 7: at --cpu it keeps self's backdrop and more than
# halves its count drift). Measured at --cpu; the other presets take the same share of their DISTILL steps (3/5)
ODE_STEPS = {"tiny": 60, "cpu": 300, "small": 1200, "wan": 360}
CONTEXT_RECIPE = {   # model preset -> Context Forcing: steps of the teacher and of CDMD, its clips and rollouts (frames)
    "tiny":  dict(teacher_steps=100,  steps=100,  clip=16, long=16),
    "cpu":   dict(teacher_steps=300,  steps=150,  clip=32, long=32),
    "small": dict(teacher_steps=2000, steps=1000, clip=48, long=48),
    "wan":   dict(teacher_steps=600,  steps=600,  clip=84, long=84),
}
LR_FLOOR = 0.1       # the learning rate decays from its peak to LR_FLOOR x peak over the run (cosine)
WEIGHT_DECAY = 0.0
GRAD_CLIP = 1.0


def preset_defaults(key: str) -> str:
    """The presets' defaults of one flag, for --help."""
    show = lambda v: ("on" if v else "off") if isinstance(v, bool) else f"{v:g}"
    text = ", ".join(f"{name} {show(values[key])}" for name, values in PRESETS.items())
    if key in DISTILL["cpu"]:
        text += f"; {', '.join(FINE_TUNED)}: " + ", ".join(f"{name} {show(values[key])}" for name, values in DISTILL.items())
    if key == "steps":
        text += "; except context-teacher " + ", ".join(f"{n} {v['teacher_steps']}" for n, v in CONTEXT_RECIPE.items()) \
            + ", context " + ", ".join(f"{n} {v['steps']}" for n, v in CONTEXT_RECIPE.items())
    return text


def bf16(preset: str, device: str) -> bool:
    """Whether a model of this preset runs under bf16 autocast, in training and in sampling: always on CUDA, on the
    CPU where the recipe says so (the --cpu preset: bf16 matmuls are faster than fp32 on AVX-512 BF16 cores)."""
    return device == "cuda" or RECIPE[preset]["bf16"]


def clip_config(args) -> DiTConfig:
    """The preset's model, with --frames as its training clip (its trained range), --depth as its blocks, --patch
    as its spatial patch and --dim as its width when given: a wider model keeps the preset's head size (more
    heads) and its MLP's ratio to the width."""
    cfg = DiTConfig.preset(args.preset)
    cfg.frames, cfg.depth, cfg.patch = args.frames or cfg.frames, args.depth or cfg.depth, args.patch or cfg.patch
    if args.dim:
        cfg.heads, cfg.ffn, cfg.dim = args.dim // cfg.head_dim, cfg.ffn * args.dim // cfg.dim, args.dim
    return cfg


def learning_rate(args, step: int) -> float:
    """Linear warm-up to --lr, then a cosine decay to LR_FLOOR x --lr at the last step."""
    decay = LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, args.steps))))
    return args.lr * min(1.0, (step + 1) / max(1, args.warmup)) * decay


if __name__ == "__main__":
    for name in PRESETS:
        cfg, r = DiTConfig.preset(name), RECIPE[name]
        print(f"--{name}: dim {cfg.dim}, depth {cfg.depth}, {cfg.frames}-frame clips of {cfg.tokens_per_frame} tokens | "
              + ", ".join(f"{k} {v}" for k, v in PRESETS[name].items())
              + f" | shift {r['shift']:g}, bf16 on the CPU {r['bf16']}, VAE steps {r['vae_steps']}, colour decoder "
              f"steps {r['colour_steps']}, sampling {r['sampler']['steps']} Euler steps at guidance {r['sampler']['cfg']:g}")
