"""DMD and the self-forcing rollout: the gradient DMD gives, the critic's loss, where the rollout's gradient flows."""

import copy

import torch

from distill import DMDConfig, critic_loss, dmd_loss, ode_loss, ode_trajectory, self_rollout
from flow import SamplerConfig
from memory import MemoryConfig
from model import DiT, DiTConfig
from rollout import rollout


def tiny(seed):
    torch.manual_seed(seed)
    return DiT(DiTConfig.preset("tiny"))


def randomise_heads(*models):
    """A fresh DiT predicts v = 0 (adaLN-Zero); open the gates so different models predict different things."""
    for m in models:
        for p in m.parameters():
            if (p == 0).all():
                torch.nn.init.normal_(p, std=0.05)


def clip_and_tokens(cfg, batch=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.frames, cfg.channels, cfg.height, cfg.width, generator=g)
    return x, torch.randint(2, 20, (batch, 6), generator=g)


def test_dmd_gradient_is_nonzero_at_init_and_zero_where_critic_and_score_agree():
    score, critic = tiny(0), tiny(1)
    randomise_heads(score, critic)
    x, tokens = clip_and_tokens(score.cfg)
    x.requires_grad_(True)
    loss, grad = dmd_loss(x, tokens, score, critic, DMDConfig(), torch.Generator().manual_seed(0))
    loss.backward()
    assert grad.abs().max() > 1e-3
    assert torch.allclose(x.grad, grad / grad.numel(), atol=1e-9)   # the loss pushes x by exactly grad
    # without guidance the real score is the score's conditional x0: a critic equal to it moves nothing
    _, same = dmd_loss(x, tokens, score, copy.deepcopy(score), DMDConfig(guidance=0.0),
                       torch.Generator().manual_seed(0))
    assert same.abs().max() == 0


def test_critic_loss_falls_on_a_fixed_batch():
    critic = tiny(0)
    x, tokens = clip_and_tokens(critic.cfg)
    opt = torch.optim.AdamW(critic.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        loss = critic_loss(critic, x, tokens, DMDConfig(), torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_one_graded_step_per_chunk_and_no_gradient_through_the_cache():
    model = tiny(0)
    randomise_heads(model)
    cfg, dmd = model.cfg, DMDConfig()
    tokens = clip_and_tokens(cfg)[1]
    calls = []   # (grad enabled, sigma, output) of every denoising and re-cache call
    forward = model.forward_cached

    def recorded(x, sigma, *args, **kwargs):
        v, kv = forward(x, sigma, *args, **kwargs)
        calls.append((torch.is_grad_enabled(), float(sigma[0, 0]), v))
        return v, kv

    model.forward_cached = recorded
    for exit_step in range(len(dmd.levels)):
        calls.clear()
        out = self_rollout(model, tokens, cfg.frames, dmd, MemoryConfig("full"), exit_step,
                           torch.Generator().manual_seed(0))
        chunks = cfg.frames // cfg.chunk
        graded = [c for c in calls if c[0]]
        assert len(graded) == chunks                       # exactly one graded call per chunk ...
        level = DMDConfig().levels[exit_step]              # ... at the shared exit step (shift 1: levels = sigmas)
        assert all(abs(s - level) < 1e-6 for _, s, _ in graded)
        assert len(calls) == chunks * (exit_step + 2)      # exit_step + 1 denoising calls and one re-cache each
        # the second chunk's graded call does not depend on the first chunk's: nothing crosses the cache
        first, second = graded[0][2], graded[1][2]
        assert torch.autograd.grad(second.sum(), first, allow_unused=True)[0] is None
        assert torch.autograd.grad(out[:, :cfg.chunk].sum(), first)[0].abs().sum() > 0


def test_rollout_at_the_last_exit_step_is_what_streaming_makes():
    model = tiny(0)
    randomise_heads(model)
    cfg, dmd = model.cfg, DMDConfig(levels=(1.0, 0.6, 0.3))
    tokens = clip_and_tokens(cfg)[1]
    with torch.no_grad():
        trained = self_rollout(model, tokens, cfg.frames, dmd, MemoryConfig("full"), len(dmd.levels) - 1,
                               torch.Generator().manual_seed(3))
    sampler = SamplerConfig(kind="few", levels=dmd.levels, shift=dmd.shift, clip=None)
    streamed = torch.cat(list(rollout(model, tokens, cfg.frames, MemoryConfig("full"), sampler,
                                      torch.Generator().manual_seed(3))), dim=1)
    assert torch.allclose(trained, streamed, atol=1e-5)


def test_a_rollout_across_an_event_is_the_stream_that_switches_without_reencode():
    # train.py --event-clips with self: a caption per frame, the event at a chunk start. The rollout must be what
    # sample.py streams with the switch there and --no-reencode (the old frames keep their keys), and a caption per
    # frame that never changes must be the plain prompt
    model = tiny(0)
    randomise_heads(model)
    cfg, dmd = model.cfg, DMDConfig(levels=(1.0, 0.5))
    a, b = torch.randint(2, 20, (1, 6)), torch.randint(2, 20, (1, 6))
    k = cfg.chunk * (cfg.frames // cfg.chunk // 2)   # the event: the middle chunk start
    per_frame = torch.cat([a[:, None].expand(-1, k, -1), b[:, None].expand(-1, cfg.frames - k, -1)], 1)   # (1, F, T)
    last = len(dmd.levels) - 1
    with torch.no_grad():
        trained = self_rollout(model, per_frame, cfg.frames, dmd, MemoryConfig("full"), last,
                               torch.Generator().manual_seed(3))
        plain = self_rollout(model, a, cfg.frames, dmd, MemoryConfig("full"), last, torch.Generator().manual_seed(3))
        constant = self_rollout(model, a[:, None].expand(-1, cfg.frames, -1), cfg.frames, dmd, MemoryConfig("full"),
                                last, torch.Generator().manual_seed(3))
    sampler = SamplerConfig(kind="few", levels=dmd.levels, shift=dmd.shift, clip=None)
    streams = {reencode: torch.cat(list(rollout(model, a, cfg.frames, MemoryConfig("full", reencode=reencode), sampler,
                                                torch.Generator().manual_seed(3), switches={k: b})), dim=1)
               for reencode in (False, True)}
    assert torch.equal(constant, plain)
    assert torch.allclose(trained, streams[False], atol=1e-5)
    assert torch.allclose(trained[:, :k], plain[:, :k], atol=1e-6)          # the event changes nothing before it
    assert not torch.allclose(trained[:, k:], plain[:, k:], atol=1e-3)      # and what follows it
    assert not torch.allclose(trained[:, k:], streams[True][:, k:], atol=1e-3)


def test_ode_pairs_are_the_teachers_own_stream_from_the_real_history():
    # Causal Forcing's causal ODE, all chunks at once in the teacher-forcing layout, must be for each chunk exactly
    # what sample.py's Euler sampler streams from the same noise after the real frames before it were re-cached
    teacher = tiny(0)
    randomise_heads(teacher)
    teacher.eval()
    c = teacher.cfg
    x, tokens = clip_and_tokens(c, batch=1)
    sampler = SamplerConfig(kind="euler", steps=6, cfg=2.5, shift=1.0, clip=None)
    n = c.frames // c.chunk
    noise = [torch.randn(1, c.chunk, c.channels, c.height, c.width, generator=torch.Generator().manual_seed(k))
             for k in range(n)]
    states, end = ode_trajectory(teacher, x, tokens, sampler.sigmas(), 3, sampler.cfg, noise=torch.cat(noise, 1))
    assert states.shape == (2, *x.shape) and torch.equal(states[0], torch.cat(noise, 1))
    for k in range(n):
        history = x[:, :k * c.chunk] if k else None
        (streamed,) = rollout(teacher, tokens, c.chunk, MemoryConfig("full"), sampler,
                              torch.Generator().manual_seed(k), context=history)
        assert torch.allclose(end[:, k * c.chunk:(k + 1) * c.chunk], streamed, atol=1e-4), k


def test_ode_loss_falls_on_a_fixed_batch():
    teacher, student = tiny(0), tiny(0)
    randomise_heads(teacher)
    student.load_state_dict(teacher.state_dict())
    x, tokens = clip_and_tokens(teacher.cfg)
    grid = SamplerConfig(kind="euler", steps=4, cfg=3.0, shift=1.0).sigmas()
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = ode_loss(student, x, tokens, teacher, grid, 2, 3.0, torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
