"""
Flow matching (rectified flow, as in Wan and Self Forcing) and the samplers that integrate it.

A frame at noise level sigma in [0, 1] is
    x_t = (1 - sigma) x0 + sigma eps,
the model predicts the velocity v = eps - x0, so x0 = x_t - sigma v. Noise levels are warped by the timestep
shift sigma' = s sigma / (1 + (s - 1) sigma), which spends more of training and sampling at high noise, where
the layout of a frame is decided (s = 1 is the identity; docs/cpu-recipe.md says why the small presets use it).

Two samplers turn pure noise for one chunk into x0, calling `denoise(x, sigma) -> v`:
  euler  the many-step flow ODE, with classifier-free guidance (the models trained by flow matching);
  few    predict x0, re-noise it with fresh noise to the next level, repeat (the distilled few-step models of
         Self Forcing, Rolling Forcing and Context Forcing, at the levels of their public few-step lists).
"""

from dataclasses import dataclass

import torch


def shift_sigma(sigma, s: float):
    """Timestep shift: sigma' = s sigma / (1 + (s - 1) sigma). s = 1 is the identity."""
    return s * sigma / (1 + (s - 1) * sigma)


def expand(sigma: torch.Tensor) -> torch.Tensor:
    return sigma[:, :, None, None, None]   # (B, F) -> (B, F, 1, 1, 1) to broadcast over frames


def add_noise(x0, sigma, eps):
    return (1 - expand(sigma)) * x0 + expand(sigma) * eps


def to_x0(x_t, sigma, v):
    return x_t - expand(sigma) * v


def training_sigma(shape, shift: float, device, generator=None, logit_normal: bool = False) -> torch.Tensor:
    """Training noise levels: uniform, or logit-normal (sigmoid of a standard normal, SD3's choice, which spends
    training on the middle levels and little near 0 and 1), then the timestep shift."""
    u = (torch.sigmoid(torch.randn(shape, device=device, generator=generator)) if logit_normal
         else torch.rand(shape, device=device, generator=generator))
    return shift_sigma(u, shift)


def chunk_sigma(batch: int, frames: int, chunk: int, shift: float, device, generator=None,
                logit_normal: bool = False) -> torch.Tensor:
    """Training noise levels (B, F): one sigma per chunk, shared by its frames."""
    return training_sigma((batch, frames // chunk), shift, device, generator, logit_normal).repeat_interleave(chunk, 1)


# ----------------------------------------------------------------------------------------------------------
# samplers

@dataclass
class SamplerConfig:
    kind: str = "euler"         # "euler": many-step flow ODE with CFG; "few": predict x0, re-noise (distilled)
    steps: int = 16             # euler steps
    cfg: float = 3.0            # classifier-free guidance scale (euler); 1 = off
    cfg_sigma: float = 1.0      # ... applied at the noise levels up to this one only (1 = at every level)
    history: float = 1.0        # history guidance scale (rollout.denoiser); 1 = off
    history_sigma: float = 0.5  # ... applied at the noise levels up to this one only
    shared_noise: float = 0.0   # share of each chunk's starting noise drawn once for the stream (rollout); 0 = off
    shared_decay: float = 1.0   # ... that draw's correlation from one chunk to the next; 1 = fixed for the stream
    shift: float = 3.0          # timestep shift of the step grid
    levels: tuple = (1.0, 0.75, 0.5, 0.25)   # few-step levels before the shift
    clip: float | None = 1.0    # |x0| bound of the data: pixels live in [-1, 1]; VAE latents are unbounded (None)

    @property
    def guided(self) -> bool:
        """Does a denoising call run the prompt and the null prompt side by side (a batch of 2B)?"""
        return self.kind == "euler" and self.cfg != 1.0

    def sigmas(self) -> list[float]:
        if self.kind == "euler":
            return euler_sigmas(self.steps, self.shift)
        return few_step_sigmas(self.levels, self.shift)


def euler_sigmas(steps: int, shift: float) -> list[float]:
    """steps + 1 noise levels from 1 down to 0, evenly spaced then shifted."""
    return [float(shift_sigma(1 - i / steps, shift)) for i in range(steps + 1)]


def even_levels(n: int) -> tuple:
    """n few-step levels before the shift, evenly spaced from 1 (n = 4: Self Forcing's [1, .75, .5, .25]). The one
    definition a student is trained at (distill.few_step_levels) and streamed at (sample.py --steps)."""
    return tuple(1 - i / n for i in range(n))


def few_step_sigmas(levels, shift: float) -> list[float]:
    """The warped few-step list: [1, .75, .5, .25] at s = 5 feeds [1, .9375, .8333, .625]."""
    return [float(shift_sigma(s, shift)) for s in levels]


def sample_euler(denoise, noise, sigmas):
    x = noise
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (s_next - s) * denoise(x, s)
    return x


def sample_few_step(denoise, noise, sigmas, generator=None, exit_step: int | None = None):
    """Consistency-style sampler of the distilled models: predict x0, re-noise it with fresh noise.

    exit_step: stop at that step and return its x0 (Self Forcing's training rollout). Only the returned step runs
    with gradient (if gradient is on at all): the steps before it only choose where it starts."""
    last = len(sigmas) - 1 if exit_step is None else exit_step
    assert 0 <= last < len(sigmas), (exit_step, len(sigmas))
    x = noise
    for i, s in enumerate(sigmas[:last + 1]):
        with torch.set_grad_enabled(torch.is_grad_enabled() and i == last):
            x0 = x - s * denoise(x, s)
        if i == last:
            return x0
        eps = torch.randn(x0.shape, device=x0.device, generator=generator)
        x = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * eps


def bound(x, clip: float | None):
    """Clip finished frames to the data's range |x| <= clip; None (VAE latents, which are unbounded) leaves them."""
    return x if clip is None else x.clamp(-clip, clip)


def sample(sampler: SamplerConfig, denoise, noise, generator=None):
    """x0 of one chunk from pure noise, by the sampler's kind, clipped to the data's range if it has one."""
    sigmas = sampler.sigmas()
    x0 = sample_euler(denoise, noise, sigmas) if sampler.kind == "euler" else \
        sample_few_step(denoise, noise, sigmas, generator)
    return bound(x0, sampler.clip)
