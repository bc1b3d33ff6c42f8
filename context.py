"""
Context Forcing (Chen et al. 2026): a long-context teacher, and contextual DMD on the student's long rollouts.

Self and Rolling Forcing grade the student's clip with a score that sees only that clip, so however long the
student streams, what it is taught never depends on more than a clip of past: the student-teacher mismatch
that caps how far back a student learns to look. Context Forcing gives the teacher the student's own memory:
  memory    the stream keeps its past in slow/fast memory (memory.py, slowfast): an attention sink, a slow
            memory of the surprising frames and a fast FIFO of the latest, at bounded positions.
  teacher   the long-context teacher: a causal model trained by teacher forcing on clips far longer than its
            window, *through* that memory (context_teacher_loss): the real clip streams into the memory chunk by
            chunk, and each chunk is denoised from noise against the memory of the frames before it, as at
            inference. Error-Recycling Fine-Tuning (Stable Video Infinity) makes it robust to a drifted
            history: the model's own x0 errors are kept in a bank (ErrorBank) and added to the frames that go
            into its memory, never to what it denoises or the target, so it learns to read a history like the
            student's.
  CDMD      contextual DMD (contextual_dmd_loss): the student streams a long rollout through its memory and
            its last chunks are graded by DMD, where the real score (the teacher, guided) and the critic (a
            causal model trained on the student's chunks) read the *same* memory: the frames the student's
            cache holds before each graded chunk, at the same positions, each re-encoded by the reader
            (rollout.reencode).
  stages    stage 1 is Self Forcing on short windows (distill.py, --method self); stage 2 is CDMD from it, the
            rollout growing by a curriculum from one training clip to ContextConfig.long frames.

Decisions the paper leaves open, taken here (the memory's own are in memory.py):
- The teacher is causal: the default many-step model fine-tuned by context_teacher_loss (train.py --method
  context-teacher), so it reads a KV cache as the student does. Its memory keys come from the no-gradient clean
  re-cache, as at inference: the gradient reaches each chunk's own forward, not the keys of its history.
- The error bank keeps x0 errors of chunks by noise-level bucket; a chunk entering memory gets, with
  probability `recycle`, an error drawn from the bucket of a Resampling Forcing simulation timestep t_s
  (mostly light), scaled by U(1 - modulation, 1 + modulation), as LongLive 2.0's recipe scales its errors.
- Graded chunks are the rollout's last clip (the teacher's training length), each graded against the memory
  as it stood before it. So the score reads the student's earlier graded chunks as clean history: for a causal
  score DMD is the sum over chunks of the conditional gradient, chunk given its past.
- The critic is causal, starts as the teacher, and is trained by flow matching on the graded chunks against the
  same memory snapshots; no gradient reaches any memory's keys (as Self Forcing's cache).
- Curriculum: the rollout grows linearly from one clip to `long` over the first `ramp` of the run.
- Training promotes by the fixed tau (memory.py): a rollout of 8-32 frames is too short for the quantile of a
  stream's own similarities that `promote` reads (sample.py --promote, docs/context.md section 7).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distill import DMDConfig, Distiller, dmd_sigma
from flow import SamplerConfig, add_noise, chunk_sigma, sample_few_step, to_x0
from forcing import drop_prompt, simulation_timestep
from memory import KVCache, MemoryConfig, filling
from rollout import denoiser, prompts, recache, reencode

CONTEXT_TEACHER, CONTEXT = "context-teacher", "context"


@dataclass
class ContextConfig:
    clip: int = 32           # frames of the teacher's training clips (several times its window)
    long: int = 32           # CDMD: the longest student rollout, in frames, reached by the curriculum
    ramp: float = 0.5        # share of the CDMD run over which the rollout grows from one clip to `long`
    recycle: float = 0.9     # probability that a chunk entering the teacher's memory gets a recycled error
    modulation: float = 0.3  # a recycled error is scaled by U(1 - modulation, 1 + modulation)
    resample_shift: float = 0.6   # t_s of the error's bucket: Resampling Forcing's simulation timestep
    buckets: int = 10        # noise-level buckets of the error bank
    bank: int = 32           # errors kept per bucket (a ring)


def context_memory(cfg) -> MemoryConfig:
    """The slow/fast memory of a model trained on cfg.frames-frame clips, beside one chunk: sink, slow and fast
    fill the trained range, so positions never leave it."""
    return filling("slowfast", cfg.frames, cfg.chunk, cfg.chunk)


# ----------------------------------------------------------------------------------------------------------
# the long-context teacher: teacher forcing through slow/fast memory, with error recycling

class ErrorBank:
    """The model's own x0 errors (x0 prediction - x0) of whole chunks, in rings by noise-level bucket."""

    def __init__(self, cfg: ContextConfig):
        self.cfg = cfg
        self.rings = [[] for _ in range(cfg.buckets)]

    def bucket(self, sigma: float) -> int:
        return min(int(sigma * self.cfg.buckets), self.cfg.buckets - 1)

    def add(self, err: torch.Tensor, sigma: torch.Tensor):
        """err (B, chunk, C, H, W) made at noise levels sigma (B,)."""
        for e, s in zip(err.detach().float().cpu(), sigma.tolist()):
            ring = self.rings[self.bucket(s)]
            ring.append(e)
            del ring[:-self.cfg.bank]

    def inject(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        """x (B, chunk, C, H, W) with a recycled error added to each sample with probability cfg.recycle."""
        cfg, B = self.cfg, x.shape[0]
        ts = simulation_timestep(B, cfg.resample_shift, "cpu", generator)
        hit = torch.rand(B, generator=generator) < cfg.recycle
        scale = 1 + cfg.modulation * (2 * torch.rand(B, generator=generator) - 1)
        errors = torch.zeros_like(x)
        for b in range(B):
            ring = self.rings[self.bucket(float(ts[b]))]
            pick = int(torch.randint(max(1, len(ring)), (1,), generator=generator))
            if hit[b] and ring:
                errors[b] = float(scale[b]) * ring[pick].to(x.device, x.dtype)
        return x + errors

    def state_dict(self) -> dict:
        return {"rings": [torch.stack(r) if r else torch.zeros(0) for r in self.rings]}

    def load_state_dict(self, state: dict):
        self.rings = [list(r.unbind(0)) for r in state["rings"]]


def context_teacher_loss(model, x0, tokens, shift: float, memory: MemoryConfig, bank: ErrorBank | None = None,
                 generator=None):
    """Flow matching of every chunk of a long clip x0 (B, N, C, H, W) against the slow/fast memory of the
    frames before it: the clip streams chunk by chunk, each chunk is noised to its own level and denoised
    through the cache, then its frames (plus a recycled error, with a bank) go into the memory by the clean
    re-cache. The noise and the levels are drawn first, so a bank changes the memory and nothing else."""
    B, N = x0.shape[:2]
    c = model.cfg.chunk
    assert N % c == 0, f"a clip of {N} frames is not a whole number of {c}-frame chunks"
    sigma = chunk_sigma(B, N, c, shift, x0.device, generator)   # (B, N), one level per chunk
    eps = torch.randn(x0.shape, device=x0.device, generator=generator)
    text = drop_prompt(tokens, generator=generator)
    prompt = model.text(text)
    cache = KVCache(memory, model.cfg.depth)
    losses = []
    for i in range(0, N, c):
        xc, s = x0[:, i:i + c], sigma[:, i:i + c]
        x_t = add_noise(xc, s, eps[:, i:i + c])
        v, _ = model.forward_cached(x_t, s, text, cache, prompt=prompt)
        losses.append(F.mse_loss(v.float(), (eps[:, i:i + c] - xc).float()))
        history = xc
        if bank is not None:
            bank.add(to_x0(x_t, s, v.detach().float()) - xc, s[:, 0])
            history = bank.inject(xc, generator)
        with torch.no_grad():
            recache(model, history, text, cache, prompt)
    return torch.stack(losses).mean()


# ----------------------------------------------------------------------------------------------------------
# contextual DMD: the student's long rollout, graded by a score and a critic that read its memory

def context_rollout(model, tokens, n_frames: int, graded: int, cfg: DMDConfig, memory: MemoryConfig,
                    exit_step: int, generator=None):
    """The student's few-step rollout of n_frames through its memory (distill.self_rollout, with the memory
    kept). Returns its last `graded` frames (B, graded, C, H, W), whose exit steps carry the gradient, and one
    snapshot of the cache per graded chunk: the memory that chunk was made against."""
    c = model.cfg
    assert n_frames % c.chunk == 0 and graded % c.chunk == 0 and graded <= n_frames, (n_frames, graded)
    B, device = tokens.shape[0], tokens.device
    sampler = SamplerConfig(kind="few", levels=cfg.levels, shift=cfg.shift)
    cache = KVCache(memory, c.depth)
    prompt = model.text(tokens)
    denoise = denoiser(model, tokens, cache, prompt, sampler)
    out, views = [], []
    for i in range(0, n_frames, c.chunk):
        grade = i >= n_frames - graded
        noise = torch.randn(B, c.chunk, c.channels, c.height, c.width, device=device, generator=generator)
        with torch.set_grad_enabled(torch.is_grad_enabled() and grade):
            x0 = sample_few_step(denoise, noise, sampler.sigmas(), generator, exit_step)
        if grade:
            out.append(x0)
            views.append(cache.snapshot())
        with torch.no_grad():
            recache(model, x0.detach(), tokens, cache, prompt)
    return torch.cat(out, dim=1), views


def memory_x0(model, x_t, sigma, tokens, memory: KVCache, guidance: float | None = None) -> torch.Tensor:
    """x0 of a noisy chunk x_t (B, chunk, C, H, W) at sigma (B, chunk) read by `model` against `memory` (the
    student's frames, re-encoded by `model`). guidance: DMD's cond + g (cond - uncond), the null prompt's half
    reading the memory re-encoded under the null prompt; None: the prompt alone."""
    text = prompts(tokens, guidance is not None)
    view = reencode(model, memory, text)
    xx = torch.cat([x_t, x_t]) if guidance is not None else x_t
    v = model.forward_cached(xx, torch.cat([sigma] * (xx.shape[0] // x_t.shape[0])), text, view)[0].float()
    if guidance is not None:
        v_cond, v_null = v.chunk(2)
        v = v_cond + guidance * (v_cond - v_null)   # x0 is linear in v: guide either
    return to_x0(x_t, sigma, v)


def contextual_dmd_loss(x, views, tokens, score, critic, cfg: DMDConfig, generator=None):
    """DMD (distill.dmd_loss) of the graded chunks x (B, G, C, H, W), the score and the critic reading, chunk by
    chunk, the memory views[j] the student made chunk j against. Returns (loss, grad)."""
    B, G = x.shape[:2]
    c = G // len(views)
    with torch.no_grad():
        xd = x.detach().float()
        sigma = dmd_sigma(B, G, cfg, x.device, generator)
        x_t = add_noise(xd, sigma, torch.randn(xd.shape, device=x.device, generator=generator))
        parts = [slice(j * c, (j + 1) * c) for j in range(len(views))]
        fake = torch.cat([memory_x0(critic, x_t[:, p], sigma[:, p], tokens, m) for p, m in zip(parts, views)], 1)
        real = torch.cat([memory_x0(score, x_t[:, p], sigma[:, p], tokens, m, cfg.guidance)
                          for p, m in zip(parts, views)], 1)
        norm = (xd - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)   # per sample (DMD eq. 8)
        grad = torch.nan_to_num((fake - real) / norm)
    loss = 0.5 * F.mse_loss(x.float(), (xd - grad).detach())
    return loss, grad


def contextual_critic_loss(critic, x, views, tokens, cfg: DMDConfig, generator=None):
    """Flow matching of the causal critic on the student's graded chunks x (detached), each against its memory."""
    x = x.detach().float()
    B, G = x.shape[:2]
    c = G // len(views)
    sigma = dmd_sigma(B, G, cfg, x.device, generator)
    eps = torch.randn(x.shape, device=x.device, generator=generator)
    losses = []
    for j, view in enumerate(views):
        p = slice(j * c, (j + 1) * c)
        with torch.no_grad():
            memory = reencode(critic, view, tokens)
        v = critic.forward_cached(add_noise(x[:, p], sigma[:, p], eps[:, p]), sigma[:, p], tokens, memory)[0]
        losses.append(F.mse_loss(v.float(), eps[:, p] - x[:, p]))
    return torch.stack(losses).mean()


def rollout_length(ctx: ContextConfig, clip: int, chunk: int, progress: float) -> int:
    """The curriculum: the rollout's frames at `progress` (0..1) of the run, from one clip up to ctx.long."""
    grown = clip + (ctx.long - clip) * min(1.0, progress / ctx.ramp if ctx.ramp > 0 else 1.0)
    return max(clip, int(grown) // chunk * chunk)


class ContextDistiller(Distiller):
    """Distiller with contextual DMD: rollouts through slow/fast memory, growing by the curriculum (set
    `progress` before each step); the score is the long-context teacher and the critic a causal model."""

    def __init__(self, score, critic, cfg: DMDConfig, lr: float, ctx: ContextConfig):
        super().__init__(CONTEXT, score, critic, cfg, lr)
        self.ctx, self.progress = ctx, 0.0
        self.memory = context_memory(score.cfg)

    def rollout(self, student, tokens):
        c = student.cfg
        n = rollout_length(self.ctx, c.frames, c.chunk, self.progress)
        exit_step = int(torch.randint(len(self.cfg.levels), (1,)))
        return context_rollout(student, tokens, n, c.frames, self.cfg, self.memory, exit_step)

    def critic_loss(self, samples, tokens):
        return contextual_critic_loss(self.critic, *samples, tokens, self.cfg)

    def dmd_loss(self, samples, tokens):
        return contextual_dmd_loss(*samples, tokens, self.score, self.critic, self.cfg)[0]
