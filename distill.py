"""
Distribution matching distillation (DMD) of a causal few-step student on its own rollouts: Self Forcing and
Rolling Forcing.

Self Forcing (Huang et al. 2025) trains the streaming student on what it makes itself: the few-step sampler
runs inside training, chunk after chunk through the KV cache with the clean re-cache, exactly as at inference,
and a clip-level loss compares the finished clip with what a good model would make. That loss is DMD (Yin et
al. 2024), which needs two more models, both bidirectional clip models:
  score   the real score: a frozen model trained on the world's videos (train.py --method bidirectional),
          guided by classifier-free guidance in DMD's form cond + g (cond - uncond);
  critic  the fake score: the same kind of model, trained by flow matching on the *student's* samples, so it
          knows the distribution the student makes now. It takes several steps per student step.
The gradient that moves a student sample x is the difference of the two scores' x0 predictions at a noised
copy of x, (critic - score), normalised per sample by mean |x - score's x0| (DMD eq. 8); the loss
0.5 |x - sg(x - grad)|^2 has exactly that gradient. Where critic and score agree, the student is not moved.

The rollout keeps the gradient small and honest: one few-step index, drawn per rollout and shared by
every chunk, is the exit step: chunk by chunk the sampler runs without gradient up to that step, the exit step
runs with gradient and its x0 prediction is the chunk's output. The re-cache of that output runs without
gradient, and the cache holds detached keys, so no gradient crosses from one chunk into another through
attention: each chunk's gradient path is its own exit-step forward.

Rolling Forcing (Liu et al. 2025) trains on its own schedule (rollout.rolling_windows): the graded calls are
the windows w with w = exit (mod W), which tile the chunks without overlap, so every chunk gets exactly one
graded x0 prediction, at the noise level its window gave it.

Sizes and schedule follow the public Self Forcing code: the DMD noise level t is one per clip, uniform then
shifted, clamped to [0.02, 0.98]; the critic has no guidance and no prompt dropout.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flow import SamplerConfig, add_noise, even_levels, few_step_sigmas, sample_few_step, shift_sigma, to_x0
from memory import KVCache, MemoryConfig
from rollout import denoiser, recache, rolling_windows


@dataclass
class DMDConfig:
    levels: tuple = (1.0, 0.75, 0.5, 0.25)   # the student's few-step list before the shift (its W for rolling)
    shift: float = 1.0            # warp of the few-step list and of DMD's noise level (the score's training shift)
    guidance: float = 3.0         # the score's guidance g in DMD's form cond + g (cond - uncond) (= standard g + 1)
    t_min: float = 0.02           # DMD's noise level is clamped to [t_min, t_max]
    t_max: float = 0.98
    critic_steps: int = 5         # critic updates per student update


def dmd_sigma(batch: int, frames: int, cfg: DMDConfig, device, generator=None) -> torch.Tensor:
    """DMD's noise levels (B, F): one per clip (the score and critic are clip models), shifted, clamped."""
    u = torch.rand(batch, 1, device=device, generator=generator)
    return shift_sigma(u, cfg.shift).clamp(cfg.t_min, cfg.t_max).expand(batch, frames)


def guided_x0(score, x_t, sigma, tokens, guidance: float) -> torch.Tensor:
    """The real score's x0 at x_t with guidance in DMD's form: cond + g (cond - uncond), one batch of 2B."""
    B = x_t.shape[0]
    v = score(torch.cat([x_t, x_t]), torch.cat([sigma, sigma]), torch.cat([tokens, torch.zeros_like(tokens)]),
              layout="bidirectional").float()
    v_cond, v_null = v[:B], v[B:]
    return to_x0(x_t, sigma, v_cond + guidance * (v_cond - v_null))   # x0 is linear in v: guide either


def dmd_loss(x, tokens, score, critic, cfg: DMDConfig, generator=None):
    """The student's loss on its rollout x (B, F, C, H, W), which carries the gradient.

    Returns (loss, grad) where grad = (critic x0 - score x0) / mean|x - score x0| is what the loss pushes x by:
    d loss / d x = grad / numel. Computed without gradient, in fp32.
    """
    B, Fr = x.shape[:2]
    with torch.no_grad():
        xd = x.detach().float()
        sigma = dmd_sigma(B, Fr, cfg, x.device, generator)
        x_t = add_noise(xd, sigma, torch.randn(xd.shape, device=x.device, generator=generator))
        fake = to_x0(x_t, sigma, critic(x_t, sigma, tokens, layout="bidirectional").float())
        real = guided_x0(score, x_t, sigma, tokens, cfg.guidance)
        norm = (xd - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)   # per sample (DMD eq. 8)
        grad = torch.nan_to_num((fake - real) / norm)
    loss = 0.5 * F.mse_loss(x.float(), (xd - grad).detach())
    return loss, grad


def critic_loss(critic, x, tokens, cfg: DMDConfig, generator=None):
    """Flow matching of the critic on the student's samples x (detached): its v at x_t against eps - x."""
    x = x.detach().float()
    B, Fr = x.shape[:2]
    sigma = dmd_sigma(B, Fr, cfg, x.device, generator)
    eps = torch.randn(x.shape, device=x.device, generator=generator)
    v = critic(add_noise(x, sigma, eps), sigma, tokens, layout="bidirectional")
    return F.mse_loss(v.float(), eps - x)


def chunk_prompts(tokens, n_chunks: int, chunk: int) -> dict:
    """{chunk index: prompt (B, T)} for chunk 0 and every chunk whose caption differs from the one before: tokens
    (B, T) gives {0: tokens}; a caption per frame (B, F, T, train.py --event-clips) gives each chunk its first
    frame's caption. The events that --event-clips places fall on chunk starts; one that a random window happens
    to cross inside a chunk takes effect at the next chunk start, where eval.py --switches switches too."""
    if tokens.dim() == 2:
        return {0: tokens}
    firsts = tokens[:, ::chunk][:, :n_chunks]                                          # (B, n_chunks, T)
    return {i: firsts[:, i] for i in range(n_chunks) if i == 0 or not torch.equal(firsts[:, i], firsts[:, i - 1])}


def self_rollout(model, tokens, n_frames: int, cfg: DMDConfig, memory: MemoryConfig, exit_step: int,
                 generator=None):
    """The student's few-step rollout of n_frames (whole chunks) through its KV cache: (B, n_frames, C, H, W).

    Every chunk runs the few-step sampler without gradient up to `exit_step`; that step runs with gradient (if
    grad is enabled at all) and its x0 prediction is the chunk. The clean re-cache runs without gradient.
    tokens: the prompt (B, T), or a caption per frame (B, F, T): a clip across a scene event, where each chunk
    streams under its own caption and the frames made before keep the keys of theirs, as a stream sampled with
    --no-reencode switches (rollout.switch_prompt) and as the event-clip model was trained. The score and the
    critic then read the same caption per frame, so DMD grades the switch.
    """
    c = model.cfg
    assert n_frames % c.chunk == 0 and 0 <= exit_step < len(cfg.levels), (n_frames, exit_step)
    B, device = tokens.shape[0], tokens.device
    sampler = SamplerConfig(kind="few", levels=cfg.levels, shift=cfg.shift)   # the student's, unguided
    cache = KVCache(memory, c.depth)
    captions, chunks = chunk_prompts(tokens, n_frames // c.chunk, c.chunk), []
    for i in range(n_frames // c.chunk):
        if i in captions:   # a new caption: this chunk and the later ones run under it
            text = captions[i]
            prompt = model.text(text)
            denoise = denoiser(model, text, cache, prompt, sampler)
        noise = torch.randn(B, c.chunk, c.channels, c.height, c.width, device=device, generator=generator)
        x0 = sample_few_step(denoise, noise, sampler.sigmas(), generator, exit_step)
        with torch.no_grad():
            recache(model, x0.detach(), text, cache, prompt)
        chunks.append(x0)
    return torch.cat(chunks, dim=1)


def rolling_train_rollout(model, tokens, n_frames: int, cfg: DMDConfig, memory: MemoryConfig, exit_window: int,
                          generator=None):
    """Rolling Forcing's training rollout: the rolling schedule of rollout.rolling_windows, where the
    windows w with w % W == exit_window run with gradient. Those windows do not overlap and together cover every
    chunk once, so each chunk's output is its one graded x0 prediction, at the level its window gave it.
    tokens: the prompt (B, T) or a caption per frame (B, F, T), as for self_rollout.
    """
    c, W = model.cfg, len(cfg.levels)
    assert n_frames % c.chunk == 0 and 0 <= exit_window < W, (n_frames, exit_window)
    n = n_frames // c.chunk
    out = [None] * n
    graded = lambda w: w % W == exit_window
    cache = KVCache(memory, c.depth)
    # a caption per frame: each new caption switches the prompt when its first chunk enters the window, as a
    # switch does at inference (the chunks still in the window finish under it)
    switches = chunk_prompts(tokens, n, c.chunk)
    start = switches.pop(0)
    assert not switches or not memory.reencode, "a training rollout across an event keeps the old keys"
    for w, first, x0 in rolling_windows(model, start, n, few_step_sigmas(cfg.levels, cfg.shift), cache,
                                        generator=generator, graded=graded, switches=switches):
        if graded(w):
            for j, part in enumerate(x0.split(c.chunk, dim=1), start=first):
                assert out[j] is None, f"chunk {j} graded twice"
                out[j] = part
    return torch.cat(out, dim=1)


# ----------------------------------------------------------------------------------------------------------
# Causal Forcing's causal ODE initialisation: the few-step student regresses its causal teacher's ODE

@torch.no_grad()
def ode_trajectory(teacher, x, tokens, grid, every: int, guidance: float, noise=None, generator=None):
    """The causal teacher's guided Euler ODE from noise for every chunk of the real clip x (B, F, C, H, W) at
    once, each chunk with the real frames before it as its clean history (the teacher-forcing layout): Causal
    Forcing's causal ODE pairs, made on the fly. grid: the teacher's Euler noise levels, 1 down to 0 (flow.
    euler_sigmas); every: keep the state at every `every`-th level, the few-step student's levels. Returns the
    kept states (W, B, F, C, H, W) and the end of the ODE (B, F, C, H, W).
    """
    B = x.shape[0]
    text, clean = torch.cat([tokens, torch.zeros_like(tokens)]), torch.cat([x, x])   # [prompt | null prompt]
    z = torch.randn(x.shape, device=x.device, generator=generator) if noise is None else noise
    states = []
    for i, (s, s_next) in enumerate(zip(grid[:-1], grid[1:])):
        if i % every == 0:
            states.append(z)
        sigma = torch.full((2 * B, x.shape[1]), s, device=x.device)
        v = teacher(torch.cat([z, z]), sigma, text, layout="teacher_forcing", clean=clean).float()
        z = z + (s_next - s) * (v[B:] + guidance * (v[:B] - v[B:]))   # the sampler's guidance: null + g (cond - null)
    return torch.stack(states), z


def ode_loss(model, x, tokens, teacher, grid, every: int, guidance: float, generator=None):
    """The student's x0 at a kept state of the teacher's ODE, against the ODE's end: one level per clip, shared by
    its chunks (as Causal Forcing does), the real frames as history. Teaches the few-step sampler the guided
    teacher's map from noise to frames, so DMD starts from a student that already draws what the teacher draws."""
    states, end = ode_trajectory(teacher, x, tokens, grid, every, guidance, generator=generator)
    B, Fr = x.shape[:2]
    i = torch.randint(len(states), (B,), device=x.device, generator=generator)
    z = states[i, torch.arange(B, device=x.device)]                                    # (B, F, C, H, W)
    sigma = torch.tensor(grid[::every][:len(states)], device=x.device)[i][:, None].expand(B, Fr)
    x0 = to_x0(z, sigma, model(z, sigma, tokens, layout="teacher_forcing", clean=x).float())
    return F.mse_loss(x0, end)


# ----------------------------------------------------------------------------------------------------------
# training: what train.py runs for --method self and --method rolling

DISTILLED = ("self", "rolling")   # the DMD methods
ODE = "ode"                       # Causal Forcing's causal ODE initialisation of a few-step student
ROLLING_SHARE = 0.5    # Rolling Forcing mixes its rolling rollout with self forcing's, half and half
CRITIC_LR = 0.2        # the critic's learning rate as a share of the student's (4e-7 against 2e-6 in the reference)
BETAS = (0.0, 0.999)   # Adam without momentum for both, as the reference: the critic's target moves every step


def rolling_room(cfg) -> int:
    """The most chunks a rolling window may hold: room for a chunk of sink and a chunk of history beside it within
    the model's trained frames, and at most four (the reference's few-step list)."""
    return max(1, min(4, cfg.frames // cfg.chunk - 2))


def few_step_levels(method: str, cfg, n: int | None = None) -> tuple:
    """The student's n few-step levels, evenly spaced from 1 (train.py --levels). By default Self Forcing's four
    (also Context Forcing's); for rolling, whose window holds one chunk per level, as many as rolling_room."""
    return even_levels(n or (rolling_room(cfg) if method == "rolling" else 4))


def student_rollout(method: str, model, tokens, n_frames: int, cfg: DMDConfig, generator=None):
    """One training rollout of the student, its graded exit step (or window) drawn here: Self Forcing's rollout,
    or for rolling, Rolling Forcing's with probability ROLLING_SHARE. Full memory: the rollout is one clip."""
    assert method in DISTILLED, method
    exit_step = int(torch.randint(len(cfg.levels), (1,), generator=generator))
    memory = MemoryConfig("full", reencode=False)   # (across an event the frames made keep their caption's keys)
    if method == "rolling" and float(torch.rand(1, generator=generator)) < ROLLING_SHARE:
        return rolling_train_rollout(model, tokens, n_frames, cfg, memory, exit_step, generator)
    return self_rollout(model, tokens, n_frames, cfg, memory, exit_step, generator)


class Distiller:
    """The two models DMD adds to the student: the frozen score and the critic, with the critic's optimizer.

    One training step (train.py) is cfg.critic_steps critic updates, each on a fresh rollout of the student made
    without gradient, then the student's DMD loss on one more rollout, which carries the gradient.
    """

    def __init__(self, method: str, score, critic, cfg: DMDConfig, lr: float):
        self.method, self.cfg = method, cfg
        self.score = score.eval().requires_grad_(False)
        self.critic = critic.train().requires_grad_(True)
        self.opt = torch.optim.AdamW(critic.parameters(), lr=CRITIC_LR * lr, betas=BETAS, weight_decay=0.0)

    def train_critic(self, student, tokens, lr: float, grad_clip: float, amp) -> float:
        """cfg.critic_steps flow-matching updates of the critic on the student's samples; the mean loss. amp: the
        autocast context the forwards run under."""
        for group in self.opt.param_groups:
            group["lr"] = CRITIC_LR * lr
        losses = []
        for _ in range(self.cfg.critic_steps):
            with torch.no_grad(), amp:
                samples = self.rollout(student, tokens)
            with amp:
                loss = self.critic_loss(samples, tokens)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.critic.parameters(), grad_clip)
            self.opt.step()
            losses.append(loss.item())
        return sum(losses) / len(losses)

    def student_loss(self, student, tokens):
        """The DMD loss of one graded rollout of the student."""
        return self.dmd_loss(self.rollout(student, tokens), tokens)

    # what a rollout is and how it is graded: Self and Rolling Forcing's; Context Forcing's in context.py
    def rollout(self, student, tokens):
        """One rollout of the score's clip length."""
        return student_rollout(self.method, student, tokens, self.score.cfg.frames, self.cfg)

    def critic_loss(self, x, tokens):
        return critic_loss(self.critic, x, tokens, self.cfg)

    def dmd_loss(self, x, tokens):
        return dmd_loss(x, tokens, self.score, self.critic, self.cfg)[0]

    def state_dict(self) -> dict:
        return {"critic": self.critic.state_dict(), "critic_optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict):
        self.critic.load_state_dict(state["critic"])
        self.opt.load_state_dict(state["critic_optimizer"])
