"""
The flow-matching training methods: one loss per method, each taking the model and a clean batch.

Every loss is the flow-matching MSE on v = eps - x0 (flow.py), with the prompt dropped 10% of the time so
classifier-free guidance has an unconditional model to push away from. What differs is what the model sees:
  teacher        the 2F layout [clean ground truth | noisy frames]: every chunk is denoised from the clean
                 truth before it, each chunk at its own sigma. Cheap and stable, but the model never sees its
                 own mistakes in the history (exposure bias), so long streams drift.
  diffusion      one sequence, every chunk at an independent sigma, block-causal mask (Diffusion Forcing): the
                 history is noisy truth, a crude stand-in for the model's imperfect history.
  bidirectional  the whole clip at one sigma, full attention: a clip model, not a streaming one (DMD's score).
  resampling     teacher forcing on a history the model degraded itself (Resampling Forcing, Guo et al. 2025).
The distillation methods train by DMD instead: self and rolling in distill.py, context in context.py
(whose long-context teacher is teacher forcing through slow/fast memory).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data import object_mask
from flow import add_noise, chunk_sigma, expand, training_sigma
from memory import KVCache, MemoryConfig
from rollout import recache

METHODS = ("teacher", "diffusion", "bidirectional", "resampling")


def drop_prompt(tokens: torch.Tensor, p: float = 0.1, generator=None) -> torch.Tensor:
    """Replace a fraction p of the prompts by the null prompt (all pad) for classifier-free guidance. tokens
    (B, T) or (B, F, T): a clip with a caption per frame loses all of them, as it is one sample."""
    keep = torch.rand(tokens.shape[0], device=tokens.device, generator=generator) >= p
    return tokens * keep.view(-1, *[1] * (tokens.dim() - 1))


# ----------------------------------------------------------------------------------------------------------
# losses: each takes the model and a clean batch and returns a scalar

def flow_loss(model, x0, sigma, tokens, generator=None, weight=None, **layout):
    """Flow-matching MSE: noise x0 to sigma (B, F), predict v = eps - x0 with the given layout, prompt dropout.

    weight: None, or a per-element weight broadcastable to x0 (train.py's object weighting: the cells that hold
    an object count more); the weighted mean keeps the loss's scale. A weight that depends on x0, as that one
    does, changes what the model learns, not only where it spends its capacity: the minimiser becomes
    E[w v | x_t] / E[w | x_t], the posterior over clean frames tilted towards those the weight favours. At high
    noise, where the posterior is broad, that means object colours in every cell (docs/cpu-recipe.md, section 9).
    """
    eps = torch.randn(x0.shape, device=x0.device, generator=generator)
    v = model(add_noise(x0, sigma, eps), sigma, drop_prompt(tokens, generator=generator), **layout)
    err = (v.float() - (eps - x0).float()) ** 2
    if weight is None:
        return err.mean()
    weight = weight.float().expand_as(err)
    return (weight * err).sum() / weight.sum()


def teacher_loss(model, x0, tokens, shift: float, generator=None, history=None, weight=None, logit_normal=False):
    """history: what the clean half shows (default the ground truth x0); the target is always x0."""
    sigma = chunk_sigma(*x0.shape[:2], model.cfg.chunk, shift, x0.device, generator, logit_normal)
    return flow_loss(model, x0, sigma, tokens, generator, weight, layout="teacher_forcing",
                     clean=x0 if history is None else history)


def diffusion_loss(model, x0, tokens, shift: float, generator=None, weight=None, logit_normal=False):
    sigma = chunk_sigma(*x0.shape[:2], model.cfg.chunk, shift, x0.device, generator, logit_normal)
    return flow_loss(model, x0, sigma, tokens, generator, weight, layout="block_causal")


def bidirectional_loss(model, x0, tokens, shift: float, generator=None, weight=None, logit_normal=False):
    sigma = training_sigma((x0.shape[0], 1), shift, x0.device, generator, logit_normal)   # one for the whole clip
    return flow_loss(model, x0, sigma.expand(x0.shape[:2]), tokens, generator, weight,
                     layout="bidirectional")


# ----------------------------------------------------------------------------------------------------------
# Resampling Forcing (Guo et al. 2025): train on a history the model degraded itself

@dataclass
class ResamplingConfig:
    mode: str = "autoregressive"   # Table 2 rows: "autoregressive" (the method), "parallel", "noise"
    shift: float = 0.6             # t_s ~ LogitNormal(0, 1) then shifted; s < 1 favours light degradation
    steps: int = 4                 # Euler steps from t_s down to 0 when the model finishes a history chunk
    warmup: int = 1000             # teacher-forcing steps before resampling starts (train.py switches)
    share: float = 1.0             # clips whose history is resampled; the rest keep the ground truth (an ablation)


def simulation_timestep(batch: int, shift: float, device, generator=None) -> torch.Tensor:
    """t_s (B,): sigmoid of a standard normal (logit-normal), then the timestep shift (paper eq. 7)."""
    return training_sigma(batch, shift, device, generator, logit_normal=True)


@torch.no_grad()
def resample_history(model, x0, tokens, ts, cfg: ResamplingConfig, generator=None, eps=None):
    """The degraded history x~ (B, F, C, H, W): each chunk of x0 noised to t_s (per sample) and finished by the
    model itself, with no gradient (the paper detaches it so the model cannot learn an easy-to-read history).

    autoregressive: chunk i is finished against the already degraded chunks < i, through the KV cache with
                    the clean re-cache, exactly as at inference: errors inside a frame and across frames.
    parallel:       every chunk is finished against the ground-truth history (teacher-forcing layout, all
                    chunks at once): errors inside a frame only.
    noise:          only noised, never finished (noise augmentation).
    """
    B, Fr = x0.shape[:2]
    chunk = model.cfg.chunk
    eps = torch.randn(x0.shape, device=x0.device, generator=generator) if eps is None else eps
    ts = ts[:, None].expand(B, Fr)
    x = add_noise(x0, ts, eps)
    if cfg.mode == "noise":
        return x
    grid = [ts * (1 - i / cfg.steps) for i in range(cfg.steps + 1)]   # t_s -> 0, (B, F) each
    if cfg.mode == "parallel":
        for s, s_next in zip(grid[:-1], grid[1:]):
            x = x + expand(s_next - s) * model(x, s, tokens, layout="teacher_forcing", clean=x0)
        return x
    assert cfg.mode == "autoregressive", cfg.mode
    cache = KVCache(MemoryConfig(policy="full"), model.cfg.depth)
    prompt = model.text(tokens) if tokens.dim() == 2 else None
    out = []
    for c in range(0, Fr - chunk, chunk):        # the last chunk is never anyone's history
        xc = x[:, c:c + chunk]
        if tokens.dim() == 3:   # a caption per frame: the chunk's first frame's (a placed event starts a chunk)
            text = tokens[:, c]
            prompt = model.text(text)
        else:
            text = tokens
        for s, s_next in zip(grid[:-1], grid[1:]):
            v, _ = model.forward_cached(xc, s[:, c:c + chunk], text, cache, prompt=prompt)
            xc = xc + expand(s_next[:, c:c + chunk] - s[:, c:c + chunk]) * v
        recache(model, xc, text, cache, prompt)
        out.append(xc)
    return torch.cat(out + [x0[:, Fr - chunk:]], dim=1)


def resampling_loss(model, x0, tokens, shift: float, generator=None, weight=None, logit_normal=False,
                    cfg: ResamplingConfig = ResamplingConfig(), resampler=None):
    """Teacher forcing with the self-resampled history in the clean half and the ground truth as target.

    resampler: the plain model that makes the history (default `model`; pass the unwrapped one under DDP).
    """
    ts = simulation_timestep(x0.shape[0], cfg.shift, x0.device, generator)
    if cfg.share == 1:
        history = resample_history(resampler or model, x0, tokens, ts, cfg, generator)
    else:   # a teacher-forcing share: those clips see the truth, whose shapes a model copies (docs/cpu-recipe.md 23)
        history, pick = x0.clone(), torch.rand(x0.shape[0], device=x0.device, generator=generator) < cfg.share
        if pick.any():
            history[pick] = resample_history(resampler or model, x0[pick], tokens[pick], ts[pick], cfg, generator)
    # every mode labels its history clean (sigma 0), as the re-cached history is labelled at inference: the noise
    # row is the paper's noise-augmentation baseline, a model that learns to read a noisier history than it gets
    return teacher_loss(model, x0, tokens, shift, generator, history=history, weight=weight, logit_normal=logit_normal)


# ----------------------------------------------------------------------------------------------------------
# two ablations of what the losses train on (train.py --object-weight, --first-chunks; both off by default)

def object_weight(clips: torch.Tensor, weight: float, factor: int) -> torch.Tensor:
    """Per-cell loss weights (B, F, 1, H/factor, W/factor) of ToyWorld pixel clips (B, F, 3, H, W): `weight` where
    a cell (factor x factor pixels: a latent cell of the frame VAE) holds any object pixel, 1 elsewhere. Objects
    are a few percent of the pixels but all of what a caption asks for. An ablation: such a weight depends on the
    clean frame, so it tilts what the model learns (flow_loss), and it loses (docs/cpu-recipe.md, section 9)."""
    mask = torch.from_numpy(object_mask(clips.cpu().numpy())).float()   # (B, F, H, W)
    cells = F.max_pool2d(mask.flatten(0, 1)[:, None], factor).unflatten(0, mask.shape[:2])   # (B, F, 1, h, w)
    return 1 + (weight - 1) * cells.to(clips.device)


def first_chunk_step(share: float, step: int) -> bool:
    """Whether `step` trains on single chunks: evenly spread, `share` of all steps, the same after --resume."""
    return math.floor((step + 1) * share) > math.floor(step * share)


def single_chunks(x, tokens, weight, chunk: int):
    """Cut clips x (B, F, ...) into their B * F / chunk chunks, each a clip of its own, with its clip's prompt
    tokens (B, L) or its own frames' captions (B, F, L) and loss weights. Only the first chunk of a clip is drawn
    with no history, a quarter of an 8-frame clip's loss: these steps teach drawing the caption's scene from
    nothing, which is all the first second of a stream asks."""
    n = x.shape[1] // chunk
    cut = lambda t: None if t is None else t.reshape(-1, chunk, *t.shape[2:])   # (B * n, chunk, ...)
    return cut(x), tokens.repeat_interleave(n, 0) if tokens.dim() == 2 else cut(tokens), cut(weight)


LOSSES = {"teacher": teacher_loss, "diffusion": diffusion_loss, "bidirectional": bidirectional_loss,
          "resampling": resampling_loss}
