"""Rolling Forcing's schedule: levels per chunk, the explicit loop it must equal, graded windows, the sink memory."""

import pytest
import torch

from distill import DMDConfig, rolling_train_rollout
from flow import SamplerConfig, few_step_sigmas, to_x0
from memory import KVCache, MemoryConfig
from model import DiT, DiTConfig
from rollout import recache, rolling_rollout

LEVELS = (1.0, 0.7, 0.4)   # W = 3 chunks in the window


def tiny():
    torch.manual_seed(0)
    cfg = DiTConfig.preset("tiny")
    cfg.frames = 16   # room for a window of 3 chunks of 2 behind a sink and some history
    model = DiT(cfg)
    for p in model.parameters():   # open the adaLN-Zero gates: a fresh DiT predicts v = 0
        if (p == 0).all():
            torch.nn.init.normal_(p, std=0.05)
    return model


def recorder(model):
    """Wrap forward_cached to record (sigma of each frame, grad enabled) per call."""
    calls, forward = [], model.forward_cached

    def recorded(x, sigma, *args, **kwargs):
        calls.append((sigma[0].tolist(), torch.is_grad_enabled()))
        return forward(x, sigma, *args, **kwargs)

    model.forward_cached = recorded
    return calls


def test_every_chunk_is_denoised_at_the_w_levels_in_order():
    model, n = tiny(), 7
    calls = recorder(model)
    sampler = SamplerConfig(kind="few", levels=LEVELS, shift=1.0, clip=None)
    tokens = torch.randint(2, 20, (1, 6))
    memory = MemoryConfig("sink", window=4, sink=2)
    out = list(rolling_rollout(model, tokens, n * model.cfg.chunk, memory, sampler, torch.Generator().manual_seed(0)))
    assert len(out) == n
    c, W = model.cfg.chunk, len(LEVELS)
    windows = [s for s, _ in calls if any(v > 0 for v in s)]   # the re-cache calls run at sigma 0
    assert len(windows) == n + W - 1 and len(calls) - len(windows) == n   # one window per step, one re-cache per chunk
    seen = {j: [] for j in range(n)}
    for w, sig in enumerate(windows):
        first = max(0, w - W + 1)
        for i in range(0, len(sig), c):
            assert sig[i:i + c] == [sig[i]] * c   # a chunk's frames share their level
            seen[first + i // c].append(sig[i])
    assert all(levels == pytest.approx(list(LEVELS)) for levels in seen.values()), seen


def explicit_rolling(model, tokens, n, sigmas, memory, generator):
    """The same schedule written as a plain loop over (window, chunk) with the chunk's level index k = w - j."""
    c, W = model.cfg, len(sigmas)
    cache, state, frames = KVCache(memory, c.depth), {}, {}
    for w in range(n + W - 1):
        if w < n:
            state[w] = torch.randn(1, c.chunk, c.channels, c.height, c.width, generator=generator)
        members = [j for j in range(n) if 0 <= w - j < W]
        x = torch.cat([state[j] for j in members], 1)
        sigma = torch.tensor([[sigmas[w - j] for j in members for _ in range(c.chunk)]])
        x0 = to_x0(x, sigma, model.forward_cached(x, sigma, tokens, cache)[0])
        for i, j in enumerate(members):
            x0_j = x0[:, i * c.chunk:(i + 1) * c.chunk]
            if w - j == W - 1:
                frames[j] = x0_j
            else:
                s = sigmas[w - j + 1]
                state[j] = (1 - s) * x0_j + s * torch.randn(x0_j.shape, generator=generator)
        for j in members:
            if w - j == W - 1:
                recache(model, frames[j], tokens, cache)
    return torch.cat([frames[j] for j in range(n)], 1)


@torch.no_grad()
def test_rolling_stream_equals_the_explicit_loop():
    model, n = tiny(), 6
    tokens = torch.randint(2, 20, (1, 6))
    memory = MemoryConfig("sink", window=4, sink=2)
    sampler = SamplerConfig(kind="few", levels=LEVELS, shift=2.0, clip=None)
    streamed = torch.cat(list(rolling_rollout(model, tokens, n * model.cfg.chunk, memory, sampler,
                                              torch.Generator().manual_seed(5))), 1)
    explicit = explicit_rolling(model, tokens, n, few_step_sigmas(LEVELS, 2.0), memory, torch.Generator().manual_seed(5))
    assert torch.allclose(streamed, explicit, atol=1e-5)


@pytest.mark.parametrize("exit_window", range(len(LEVELS)))
def test_graded_windows_tile_the_chunks_and_only_they_carry_gradient(exit_window):
    model, n = tiny(), 5
    calls = recorder(model)
    W, c = len(LEVELS), model.cfg.chunk
    out = rolling_train_rollout(model, torch.randint(2, 20, (1, 6)), n * c, DMDConfig(levels=LEVELS),
                                MemoryConfig("sink", window=4, sink=2), exit_window, torch.Generator().manual_seed(0))
    assert out.shape[1] == n * c and out.requires_grad   # every chunk filled once (the rollout asserts no repeat)
    windows = [g for s, g in calls if any(v > 0 for v in s)]
    assert windows == [w % W == exit_window for w in range(n + W - 1)]
    assert not any(g for s, g in calls if not any(v > 0 for v in s))   # no re-cache with gradient


@torch.no_grad()
def test_a_switch_leaves_the_chunks_that_left_the_window_and_re_encodes_the_cache():
    model, n, W = tiny(), 7, len(LEVELS)
    c, i = model.cfg.chunk, 4   # the switch: chunk 4 enters window 4, when chunks 0 and 1 have left it
    a, b = torch.randint(2, 20, (1, 6)), torch.randint(2, 20, (1, 6))
    memory = MemoryConfig("full")
    sampler = SamplerConfig(kind="few", levels=LEVELS, shift=1.0, clip=None)

    def stream(switches):
        cache = KVCache(memory, model.cfg.depth)
        out = torch.cat(list(rolling_rollout(model, a, n * c, memory, sampler, torch.Generator().manual_seed(0),
                                             cache, switches=switches)), 1)
        return out, cache

    (plain, _), (switched, cache) = stream({}), stream({i * c: b})
    left = (i - W + 1) * c   # frames of the chunks that had left the window at the switch
    assert torch.equal(plain[:, :left], switched[:, :left])
    assert not torch.allclose(plain[:, left:], switched[:, left:])
    under_b = KVCache(memory, model.cfg.depth)   # the cache now holds every frame as if streamed under b
    for j in range(n):
        recache(model, switched[:, j * c:(j + 1) * c], b, under_b)
    for k, k_b in zip(cache.k, under_b.k):
        assert torch.allclose(k, k_b, atol=1e-5)


@torch.no_grad()
def test_a_training_rollout_across_an_event_switches_where_the_chunk_enters_the_window():
    # train.py --event-clips with rolling: a caption per frame. One that never changes is the plain prompt; an
    # event at chunk k switches the prompt at window k, so the chunks graded in earlier windows are untouched
    model, n, W = tiny(), 7, len(LEVELS)
    c, k = model.cfg.chunk, 4
    a, b = torch.randint(2, 20, (1, 6)), torch.randint(2, 20, (1, 6))
    per_frame = torch.cat([a[:, None].expand(-1, k * c, -1), b[:, None].expand(-1, (n - k) * c, -1)], 1)   # (1, F, T)
    memory, dmd = MemoryConfig("full", reencode=False), DMDConfig(levels=LEVELS)
    for exit_window in range(W):
        run = lambda tokens: rolling_train_rollout(model, tokens, n * c, dmd, memory, exit_window,
                                                   torch.Generator().manual_seed(2))
        plain, constant, event = run(a), run(a[:, None].expand(-1, n * c, -1)), run(per_frame)
        assert torch.equal(constant, plain)
        # chunk j is graded in window w: the one with w % W == exit_window among j..j + W - 1
        window = [next(w for w in range(j, j + W) if w % W == exit_window) for j in range(n)]
        for j in range(n):
            same = torch.allclose(event[:, j * c:(j + 1) * c], plain[:, j * c:(j + 1) * c], atol=1e-6)
            assert same == (window[j] < k), (exit_window, j, window[j])
