"""
Flow matching, the samplers, the streaming rollout, and one training loss per method.

Flow matching (rectified flow, as in Wan and Self Forcing): a frame at noise level sigma in [0, 1] is
    x_t = (1 - sigma) x0 + sigma eps,
the model predicts the velocity v = eps - x0, so x0 = x_t - sigma v. Noise levels are warped by the
timestep shift sigma' = s sigma / (1 + (s - 1) sigma), which spends more of training and sampling at high
noise, where the layout of a frame is decided.

Methods (Teacher Forcing, Diffusion Forcing, and the bidirectional clip model DMD uses as its score):
  teacher        the 2F layout [clean ground truth | noisy frames]: every chunk is denoised from the clean
                 truth before it, each chunk at its own sigma. Cheap and stable, but the model never sees its
                 own mistakes in the history (exposure bias), so long streams drift.
  diffusion      one sequence, every chunk at an independent sigma, block-causal mask (Diffusion Forcing): the
                 history is noisy truth, a crude stand-in for the model's imperfect history.
  bidirectional  the whole clip at one sigma, full attention: a clip model, not a streaming one.
All three use the same flow-matching MSE on v, with the prompt dropped 10% of the time so classifier-free
guidance has an unconditional model to push away from.

Streaming (`rollout`) generates chunk after chunk with the KV cache: denoise the chunk against the cache,
then run the model once more on the finished x0 at sigma = 0 and cache *those* keys/values (clean re-cache).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memory import KVCache, MemoryConfig

METHODS = ("teacher", "diffusion", "bidirectional", "resampling")   # built so far
PLANNED = ("self", "rolling", "context")                             # named by the design, not built yet


# ----------------------------------------------------------------------------------------------------------
# flow matching

def shift_sigma(sigma, s: float):
    """Timestep shift: sigma' = s sigma / (1 + (s - 1) sigma). s = 1 is the identity."""
    return s * sigma / (1 + (s - 1) * sigma)


def expand(sigma: torch.Tensor) -> torch.Tensor:
    return sigma[:, :, None, None, None]   # (B, F) -> (B, F, 1, 1, 1) to broadcast over frames


def add_noise(x0, sigma, eps):
    return (1 - expand(sigma)) * x0 + expand(sigma) * eps


def to_x0(x_t, sigma, v):
    return x_t - expand(sigma) * v


def chunk_sigma(batch: int, frames: int, chunk: int, shift: float, device, generator=None) -> torch.Tensor:
    """Training noise levels (B, F): one shifted-uniform sigma per chunk, shared by its frames."""
    u = torch.rand(batch, frames // chunk, device=device, generator=generator)
    return shift_sigma(u, shift).repeat_interleave(chunk, dim=1)


def drop_prompt(tokens: torch.Tensor, p: float = 0.1, generator=None) -> torch.Tensor:
    """Replace a fraction p of the prompts by the null prompt (all pad) for classifier-free guidance."""
    keep = torch.rand(tokens.shape[0], 1, device=tokens.device, generator=generator) >= p
    return tokens * keep


# ----------------------------------------------------------------------------------------------------------
# losses: each takes the model and a clean batch and returns a scalar

def flow_loss(model, x0, sigma, tokens, generator=None, **layout):
    """Flow-matching MSE: noise x0 to sigma (B, F), predict v = eps - x0 with the given layout, prompt dropout."""
    eps = torch.randn(x0.shape, device=x0.device, generator=generator)
    v = model(add_noise(x0, sigma, eps), sigma, drop_prompt(tokens, generator=generator), **layout)
    return F.mse_loss(v.float(), (eps - x0).float())


def teacher_loss(model, x0, tokens, shift: float, generator=None, history=None):
    """history: what the clean half shows (default the ground truth x0); the target is always x0."""
    sigma = chunk_sigma(*x0.shape[:2], model.cfg.chunk, shift, x0.device, generator)
    return flow_loss(model, x0, sigma, tokens, generator, layout="teacher_forcing",
                     clean=x0 if history is None else history)


def diffusion_loss(model, x0, tokens, shift: float, generator=None):
    sigma = chunk_sigma(*x0.shape[:2], model.cfg.chunk, shift, x0.device, generator)
    return flow_loss(model, x0, sigma, tokens, generator, layout="block_causal")


def bidirectional_loss(model, x0, tokens, shift: float, generator=None):
    u = torch.rand(x0.shape[0], 1, device=x0.device, generator=generator)   # one sigma for the whole clip
    return flow_loss(model, x0, shift_sigma(u, shift).expand(x0.shape[:2]), tokens, generator,
                     layout="bidirectional")


# ----------------------------------------------------------------------------------------------------------
# Resampling Forcing (Guo et al. 2025): train on a history the model degraded itself

@dataclass
class ResamplingConfig:
    mode: str = "autoregressive"   # Table 2 rows: "autoregressive" (the method), "parallel", "noise"
    shift: float = 0.6             # t_s ~ LogitNormal(0, 1) then shifted; s < 1 favours light degradation
    steps: int = 4                 # Euler steps from t_s down to 0 when the model finishes a history chunk
    warmup: int = 1000             # teacher-forcing steps before resampling starts (train.py switches)


def simulation_timestep(batch: int, shift: float, device, generator=None) -> torch.Tensor:
    """t_s (B,): sigmoid of a standard normal (logit-normal), then the timestep shift (paper eq. 7)."""
    return shift_sigma(torch.sigmoid(torch.randn(batch, device=device, generator=generator)), shift)


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
    prompt = model.text(tokens)
    out = []
    for c in range(0, Fr - chunk, chunk):        # the last chunk is never anyone's history
        xc = x[:, c:c + chunk]
        for s, s_next in zip(grid[:-1], grid[1:]):
            xc = xc + expand(s_next[:, c:c + chunk] - s[:, c:c + chunk]) * \
                model.forward_cached(xc, s[:, c:c + chunk], tokens, cache, prompt=prompt)
        model.forward_cached(xc, torch.zeros_like(s[:, c:c + chunk]), tokens, cache, write=True, prompt=prompt)
        out.append(xc)
    return torch.cat(out + [x0[:, Fr - chunk:]], dim=1)


def resampling_loss(model, x0, tokens, shift: float, generator=None, cfg: ResamplingConfig = ResamplingConfig(),
                    resampler=None):
    """Teacher forcing with the self-resampled history in the clean half and the ground truth as target.

    resampler: the plain model that makes the history (default `model`; pass the unwrapped one under DDP).
    """
    ts = simulation_timestep(x0.shape[0], cfg.shift, x0.device, generator)
    history = resample_history(resampler or model, x0, tokens, ts, cfg, generator)
    # every mode labels its history clean (sigma 0), as the re-cached history is labelled at inference: the noise
    # row is the paper's noise-augmentation baseline, a model that learns to read a noisier history than it gets
    return teacher_loss(model, x0, tokens, shift, generator, history=history)


LOSSES = {"teacher": teacher_loss, "diffusion": diffusion_loss, "bidirectional": bidirectional_loss,
          "resampling": resampling_loss}


# ----------------------------------------------------------------------------------------------------------
# samplers: each turns pure noise for one chunk into x0, calling `denoise(x, sigma) -> v`

@dataclass
class SamplerConfig:
    kind: str = "euler"         # "euler": many-step flow ODE with CFG; "few": predict x0, re-noise (distilled)
    steps: int = 16             # euler steps
    cfg: float = 3.0            # classifier-free guidance scale (euler); 1 = off
    shift: float = 3.0          # timestep shift of the step grid
    levels: tuple = (1.0, 0.75, 0.5, 0.25)   # few-step levels before the shift
    clip: float | None = 1.0    # |x0| bound of the data: pixels live in [-1, 1]; VAE latents are unbounded (None)


def euler_sigmas(steps: int, shift: float) -> list[float]:
    """steps + 1 noise levels from 1 down to 0, evenly spaced then shifted."""
    return [float(shift_sigma(1 - i / steps, shift)) for i in range(steps + 1)]


def few_step_sigmas(levels, shift: float) -> list[float]:
    """The warped few-step list: [1, .75, .5, .25] at s = 5 feeds [1, .9375, .8333, .625]."""
    return [float(shift_sigma(s, shift)) for s in levels]


def sample_euler(denoise, noise, sigmas):
    x = noise
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (s_next - s) * denoise(x, s)
    return x


def sample_few_step(denoise, noise, sigmas, generator=None):
    """Consistency-style sampler of the distilled models: predict x0, re-noise it with fresh noise."""
    x = noise
    for i, s in enumerate(sigmas):
        x0 = x - s * denoise(x, s)
        if i + 1 == len(sigmas):
            return x0
        eps = torch.randn(x0.shape, device=x0.device, generator=generator)
        x = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * eps


# ----------------------------------------------------------------------------------------------------------
# streaming rollout

@torch.no_grad()
def rollout(model, tokens, n_frames: int, memory: MemoryConfig, sampler: SamplerConfig, generator=None,
            cache: KVCache | None = None):
    """Stream n_frames (rounded up to whole chunks), yielding each finished chunk x0 (B, chunk, C, H, W).

    With guidance the conditional and unconditional streams run as one batch of 2B, each with its own half of
    the cache (their keys differ because cross-attention reads different prompts).
    """
    cfg = model.cfg
    B, chunk = tokens.shape[0], cfg.chunk
    guided = sampler.kind == "euler" and sampler.cfg != 1.0
    text = torch.cat([tokens, torch.zeros_like(tokens)]) if guided else tokens
    cache = KVCache(memory, cfg.depth) if cache is None else cache
    sigmas = (euler_sigmas(sampler.steps, sampler.shift) if sampler.kind == "euler"
              else few_step_sigmas(sampler.levels, sampler.shift))
    device = tokens.device
    prompt = model.text(text)   # one prompt for the whole stream: encode it once

    def denoise(x, s):
        xx = torch.cat([x, x]) if guided else x
        sig = torch.full(xx.shape[:2], s, device=device)
        v = model.forward_cached(xx, sig, text, cache, prompt=prompt).float()
        if not guided:
            return v
        v_cond, v_null = v.chunk(2)
        return v_null + sampler.cfg * (v_cond - v_null)

    for _ in range(math.ceil(n_frames / chunk)):
        noise = torch.randn(B, chunk, cfg.channels, cfg.height, cfg.width, device=device, generator=generator)
        if sampler.kind == "euler":
            x0 = sample_euler(denoise, noise, sigmas)
        else:
            x0 = sample_few_step(denoise, noise, sigmas, generator)
        if sampler.clip is not None:
            x0 = x0.clamp(-sampler.clip, sampler.clip)
        clean = torch.cat([x0, x0]) if guided else x0
        model.forward_cached(clean, torch.zeros(clean.shape[:2], device=device), text, cache, write=True,
                             prompt=prompt)   # the clean re-cache
        yield x0
