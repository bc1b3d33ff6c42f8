"""Flow matching, the samplers, and the training losses of teacher / diffusion / bidirectional."""

import pytest
import torch

import forcing
from flow import (SamplerConfig, add_noise, chunk_sigma, euler_sigmas, few_step_sigmas, sample_euler, sample_few_step,
                  shift_sigma, to_x0)
from forcing import LOSSES, ResamplingConfig, flow_loss, resample_history
from memory import KVCache, MemoryConfig
from model import DiT, DiTConfig
from rollout import denoiser, prompts, recache, rollout


def test_shift_and_warped_few_step_list():
    assert few_step_sigmas((1.0, 0.75, 0.5, 0.25), 5.0) == pytest.approx([1.0, 0.9375, 0.8333333, 0.625])
    s = torch.linspace(0, 1, 11)
    assert torch.allclose(shift_sigma(s, 1.0), s)
    assert (shift_sigma(s, 3.0) >= s).all()   # the shift spends more time at high noise


def test_noise_and_x0_conversion_round_trip():
    x0, eps = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 4, 3, 8, 8)
    sigma = torch.rand(2, 4)
    xt = add_noise(x0, sigma, eps)
    assert torch.allclose(to_x0(xt, sigma, eps - x0), x0, atol=1e-6)


def test_samplers_reach_the_target_with_an_exact_model():
    target = torch.randn(1, 2, 3, 4, 4)
    exact_v = lambda x, s: (x - target) / s        # the true flow towards a single point
    noise = torch.randn_like(target)
    assert torch.allclose(sample_euler(exact_v, noise, euler_sigmas(7, 3.0)), target, atol=1e-5)
    assert torch.allclose(sample_few_step(exact_v, noise, few_step_sigmas((1.0, 0.5), 5.0)), target, atol=1e-5)


def test_logit_normal_noise_levels_are_shared_per_chunk_and_centred():
    sigma = chunk_sigma(4096, 8, 2, 1.0, "cpu", torch.Generator().manual_seed(0), logit_normal=True)
    assert torch.equal(sigma[:, 0::2], sigma[:, 1::2])   # one level per chunk
    logit = torch.logit(sigma[:, 0::2].double())
    assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1) < 0.03   # sigmoid of a standard normal
    uniform = chunk_sigma(4096, 8, 2, 1.0, "cpu", torch.Generator().manual_seed(0))
    # logit-normal spends about a third as many draws near the ends as uniform does
    ends = lambda s: ((s < 0.1) | (s > 0.9)).float().mean()
    assert ends(sigma) < 0.5 * ends(uniform)


@pytest.mark.parametrize("method", sorted(LOSSES))
def test_every_loss_trains_at_the_logit_normal_levels_when_asked(method, monkeypatch):
    """The flag reaches the noise levels the model is called at (resampling through its teacher-forcing loss)."""
    cfg = DiTConfig.preset("tiny")
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cfg = cfg

        def forward(self, x, sigma, tokens, **layout):
            seen.append(sigma)
            return torch.zeros_like(x)

    x0 = torch.randn(3, cfg.frames, 3, cfg.height, cfg.width)
    tokens = torch.randint(2, cfg.vocab, (3, cfg.text_len))
    monkeypatch.setattr(forcing, "resample_history", lambda model, x0, *a, **k: x0)
    for logit_normal in (False, True):
        LOSSES[method](Recorder(), x0, tokens, 1.0, torch.Generator().manual_seed(5), logit_normal=logit_normal)
    g = torch.Generator().manual_seed(5)
    if method == "resampling":
        torch.randn(3, generator=g)   # its simulation timestep t_s is drawn first
    levels = (3, 1) if method == "bidirectional" else (3, cfg.frames // cfg.chunk)
    expected = torch.sigmoid(torch.randn(levels, generator=g))
    expected = expected.expand(3, cfg.frames) if method == "bidirectional" else expected.repeat_interleave(cfg.chunk, 1)
    assert torch.allclose(seen[1], expected) and not torch.allclose(seen[0], expected)


@pytest.mark.parametrize("method", sorted(LOSSES))
def test_loss_falls_when_overfitting_one_batch(method):
    torch.manual_seed(0)
    cfg = DiTConfig.preset("tiny")
    model = DiT(cfg)
    colours = torch.rand(2, cfg.frames, 3, 1, 1) * 2 - 1   # flat frames: learnable in a few dozen steps
    x0 = colours.expand(-1, -1, -1, cfg.height, cfg.width).contiguous()
    tokens = torch.randint(2, cfg.vocab, (2, cfg.text_len))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)

    def loss_at(step):   # the same noise and noise levels every time, so the objective is fixed
        return LOSSES[method](model, x0, tokens, 3.0, torch.Generator().manual_seed(step % 4))

    with torch.no_grad():
        before = sum(loss_at(i).item() for i in range(4))
    for step in range(60):
        opt.zero_grad()
        loss_at(step).backward()
        opt.step()
    with torch.no_grad():
        after = sum(loss_at(i).item() for i in range(4))
    assert after < 0.7 * before, f"{method}: {before:.4f} -> {after:.4f}"


def test_object_weighted_loss_is_the_weighted_mean_of_the_same_errors():
    torch.manual_seed(0)
    cfg = DiTConfig.preset("tiny")
    model = DiT(cfg).eval()
    x0 = torch.randn(2, cfg.frames, 3, cfg.height, cfg.width)
    tokens = torch.randint(2, cfg.vocab, (2, cfg.text_len))
    sigma = torch.rand(2, cfg.frames)
    mask = (torch.rand(2, cfg.frames, 1, cfg.height, cfg.width) < 0.1).float()   # "object" cells

    def loss(weight):   # the same noise and prompt dropout every call
        with torch.no_grad():
            return flow_loss(model, x0, sigma, tokens, torch.Generator().manual_seed(1), weight,
                             layout="teacher_forcing", clean=x0).item()

    plain, only_objects, only_rest = loss(None), loss(mask), loss(1 - mask)
    assert loss(torch.full_like(mask, 3.0)) == pytest.approx(plain, rel=1e-5)   # a uniform weight changes nothing
    n = mask.mean().item()
    assert plain == pytest.approx(n * only_objects + (1 - n) * only_rest, rel=1e-4)   # the two parts of the mean
    assert loss(1 + 4 * mask) == pytest.approx((5 * n * only_objects + (1 - n) * only_rest) / (1 + 4 * n), rel=1e-4)


@pytest.mark.parametrize("method", ["teacher", "diffusion"])
def test_streaming_reproduces_a_memorised_clip(method):
    # end to end: train on one clip until it is memorised, then stream it from noise through the KV cache with
    # Euler steps. A wrong sign or scale in the sampler, a stale or missing cache, or a train/stream mismatch of
    # positions would all leave the stream far from the clip.
    torch.manual_seed(0)
    cfg = DiTConfig(height=8, width=8, patch=2, dim=64, depth=2, heads=4, ffn=128, chunk=2, frames=4, text_layers=1)
    cells = torch.rand(1, cfg.frames, 3, 2, 2) * 2 - 1
    x0 = cells.repeat_interleave(4, -1).repeat_interleave(4, -2)          # (1, F, 3, 8, 8): 2x2 colour blocks
    tokens = torch.randint(2, cfg.vocab, (1, cfg.text_len))
    model = DiT(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        loss = LOSSES[method](model, x0.expand(8, -1, -1, -1, -1), tokens.expand(8, -1), 3.0, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    sampler = SamplerConfig(steps=8, cfg=1.0, shift=3.0)
    video = torch.cat(list(rollout(model, tokens, cfg.frames, MemoryConfig("full"), sampler,
                                   torch.Generator().manual_seed(1))), dim=1)
    rel = ((video - x0) ** 2).mean(dim=(0, 2, 3, 4)) / x0.var()            # per frame, 1 = knows nothing
    assert (rel < 0.25).all(), f"{method}: per-frame error / variance {rel.tolist()}"


def test_history_guidance_extrapolates_from_the_chunk_alone_to_the_chunk_on_the_cache():
    # the no-history branch must be the chunk with no history at all: the same chunk streamed against an empty
    # cache (a different code path: the cached call, not the clip forward). Against an empty cache, and above
    # its highest level, the guidance is off; else it moves the guided step by (G - 1)(v_cache - v_alone).
    model, cfg, x0, tokens = randomised_tiny(3)
    model.eval()
    G, s = 2.5, 0.4
    plain, hist = SamplerConfig(steps=4, cfg=3.0, shift=1.0), SamplerConfig(steps=4, cfg=3.0, shift=1.0, history=G)
    text = prompts(tokens, True)
    x = torch.randn(2, cfg.chunk, 3, cfg.height, cfg.width, generator=torch.Generator().manual_seed(4))
    sigma = torch.full((2, cfg.chunk), s)
    with torch.no_grad():
        cache = KVCache(MemoryConfig("full"), cfg.depth)
        torch.testing.assert_close(denoiser(model, text, cache, None, hist)(x, s),
                                   denoiser(model, text, cache, None, plain)(x, s))
        v_alone = model.forward_cached(x, sigma, tokens, KVCache(MemoryConfig("full"), cfg.depth))[0]
        for i in range(0, 4, cfg.chunk):
            recache(model, x0[:, i:i + cfg.chunk], text, cache)
        v_cache = model.forward_cached(torch.cat([x, x]), torch.cat([sigma, sigma]), text, cache)[0][:2]
        want = denoiser(model, text, cache, None, plain)(x, s) + (G - 1) * (v_cache - v_alone)
        got = denoiser(model, text, cache, None, hist)(x, s)
        above = [denoiser(model, text, cache, None, sampler)(x, hist.history_sigma + 0.1) for sampler in (hist, plain)]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (got - denoiser(model, text, cache, None, plain)(x, s)).abs().max() > 1e-3
    torch.testing.assert_close(*above)


def test_guidance_interval_guides_only_the_levels_up_to_its_sigma():
    # above cfg_sigma the step is the prompt's own prediction (guidance 1), at and below it the guided one
    model, cfg, x0, tokens = randomised_tiny(3)
    model.eval()
    every = SamplerConfig(steps=4, cfg=3.0, shift=1.0)
    interval = SamplerConfig(steps=4, cfg=3.0, cfg_sigma=0.5, shift=1.0)
    text = prompts(tokens, True)
    x = torch.randn(2, cfg.chunk, 3, cfg.height, cfg.width, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = KVCache(MemoryConfig("full"), cfg.depth)
        recache(model, x0[:, :cfg.chunk], text, cache)
        v = {s: [denoiser(model, text, cache, None, sampler)(x, s) for sampler in (every, interval)]
             for s in (0.5, 0.8)}
        v_cond = model.forward_cached(torch.cat([x, x]), torch.full((4, cfg.chunk), 0.8), text, cache)[0][:2].float()
    torch.testing.assert_close(v[0.5][1], v[0.5][0])
    torch.testing.assert_close(v[0.8][1], v_cond, atol=1e-5, rtol=1e-4)
    assert (v[0.8][0] - v_cond).abs().max() > 1e-3   # guidance does move the step there


def test_history_guidance_leaves_the_first_chunk_and_changes_the_rest():
    model, cfg, _, tokens = randomised_tiny(5)
    model.eval()
    streams = [torch.cat(list(rollout(model, tokens, 3 * cfg.chunk, MemoryConfig("full"),
                                      SamplerConfig(steps=4, cfg=2.0, shift=1.0, history=h, history_sigma=1.0),
                                      torch.Generator().manual_seed(6))), dim=1) for h in (1.0, 3.0)]
    torch.testing.assert_close(streams[0][:, :cfg.chunk], streams[1][:, :cfg.chunk])
    assert (streams[0][:, cfg.chunk:] - streams[1][:, cfg.chunk:]).abs().max() > 1e-3


def test_shared_noise_starts_every_chunk_from_one_draw_and_a_fresh_one(monkeypatch):
    import rollout as R

    model, cfg, _, tokens = randomised_tiny(7)
    model.eval()
    seen, n = [], 3
    monkeypatch.setattr(R, "sample", lambda sampler, denoise, noise, gen: seen.append(noise) or torch.zeros_like(noise))
    for a, decay in ((0.25, 1.0), (0.25, 0.6), (0.0, 1.0)):
        seen.clear()
        list(R.rollout(model, tokens, n * cfg.chunk, MemoryConfig("full"),
                       SamplerConfig(steps=2, shift=1.0, shared_noise=a, shared_decay=decay),
                       torch.Generator().manual_seed(4)))
        g = torch.Generator().manual_seed(4)
        draw = lambda: torch.randn(seen[0].shape, generator=g)
        # with a share, the stream's one draw comes first and every chunk mixes it with its own (and, drifting,
        # the draw then moves by a fresh one of its own); without, the chunks take the generator's draws as
        # before the option existed
        want, shared = [], draw() if a else None
        for _ in range(n):
            fresh = draw()
            want.append(a ** 0.5 * shared + (1 - a) ** 0.5 * fresh if a else fresh)
            if a and decay < 1:
                shared = decay * shared + (1 - decay ** 2) ** 0.5 * draw()
        assert len(seen) == n
        for got, w in zip(seen, want):
            torch.testing.assert_close(got, w, rtol=0, atol=0)


def randomised_tiny(seed=0):
    torch.manual_seed(seed)
    cfg = DiTConfig.preset("tiny")
    model = DiT(cfg)
    with torch.no_grad():   # a fresh model predicts v = 0 (zero head); give it something to say
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x0 = torch.rand(2, cfg.frames, 3, cfg.height, cfg.width) * 2 - 1
    tokens = torch.randint(2, cfg.vocab, (2, cfg.text_len))
    return model, cfg, x0, tokens


@pytest.mark.parametrize("mode", ["autoregressive", "parallel", "noise"])
def test_resampled_history_degrades_with_ts_and_carries_no_gradient(mode):
    model, cfg, x0, tokens = randomised_tiny()
    rs = ResamplingConfig(mode=mode, steps=3)
    errors = []
    for ts in (0.0, 0.2, 0.5, 0.9):
        hist = resample_history(model, x0, tokens, torch.full((2,), ts), rs, torch.Generator().manual_seed(0))
        assert not hist.requires_grad and hist.grad_fn is None
        history = hist[:, :-cfg.chunk]   # the last chunk is nobody's history and stays ground truth
        assert torch.equal(hist[:, -cfg.chunk:], x0[:, -cfg.chunk:]) or mode != "autoregressive"
        errors.append((history - x0[:, :-cfg.chunk]).abs().mean().item())
    assert errors[0] < 1e-6, "t_s = 0 must give back the ground truth"
    assert errors[0] < errors[1] < errors[2] < errors[3], errors


def test_autoregressive_resampling_conditions_on_degraded_history():
    # other noise on chunk 0 changes chunk 1 of the autoregressive history (it is finished against the degraded
    # chunk 0); in parallel mode chunk 1 is finished against the ground truth and cannot move
    model, cfg, x0, tokens = randomised_tiny()
    ts, c = torch.full((2,), 0.7), cfg.chunk
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    eps2 = eps.clone()
    eps2[:, :c] = torch.randn(eps2[:, :c].shape, generator=torch.Generator().manual_seed(2))
    for mode, depends in (("autoregressive", True), ("parallel", False)):
        rs = ResamplingConfig(mode=mode, steps=2)
        a = resample_history(model, x0, tokens, ts, rs, eps=eps)
        b = resample_history(model, x0, tokens, ts, rs, eps=eps2)
        assert (a[:, :c] - b[:, :c]).abs().max() > 1e-3                  # chunk 0 itself always moves
        moved = (a[:, c:2 * c] - b[:, c:2 * c]).abs().max().item()
        assert (moved > 1e-4) == depends, (mode, moved)


@pytest.mark.parametrize("mode", ["noise", "parallel", "autoregressive"])
def test_resampled_history_is_labelled_clean_as_at_inference(mode):
    # at inference the history is re-cached at sigma 0, so training must label it 0 too, in every Table 2 row
    torch.manual_seed(0)
    cfg = DiTConfig.preset("tiny")
    model = DiT(cfg)
    seen = []
    embed = model._embed
    model._embed = lambda x, sigma: seen.append(sigma) or embed(x, sigma)
    x0 = torch.randn(2, cfg.frames, 3, cfg.height, cfg.width)
    tokens = torch.randint(2, cfg.vocab, (2, cfg.text_len))
    LOSSES["resampling"](model, x0, tokens, 3.0, cfg=ResamplingConfig(mode=mode))
    sigma = seen[-1]                                          # the training forward: [history | noisy] frames
    assert sigma.shape == (2, 2 * cfg.frames)
    assert (sigma[:, :cfg.frames] == 0).all() and (sigma[:, cfg.frames:] > 0).all()


@torch.no_grad()
def test_resample_share_keeps_the_truth_as_history_for_the_other_clips(monkeypatch):
    """--resample-share: the clips drawn for resampling get exactly the history resample_history makes for them
    alone; every other clip's history is its ground truth, as in teacher forcing; share 1 is the method itself."""
    model, cfg, _, _ = randomised_tiny()
    x0 = torch.rand(8, cfg.frames, 3, cfg.height, cfg.width) * 2 - 1
    tokens = torch.randint(2, cfg.vocab, (8, cfg.text_len))
    seen = []
    monkeypatch.setattr(forcing, "teacher_loss", lambda *a, history=None, **k: seen.append(history) or 0.0)
    for share in (0.5, 1.0):
        rs = ResamplingConfig(steps=2, share=share)
        LOSSES["resampling"](model, x0, tokens, 1.0, torch.Generator().manual_seed(3), cfg=rs)
        g = torch.Generator().manual_seed(3)
        ts = forcing.simulation_timestep(8, rs.shift, "cpu", g)
        pick = torch.rand(8, generator=g) < share if share < 1 else torch.ones(8, dtype=torch.bool)
        assert 0 < pick.sum() < 8 or share == 1, "the seed must draw both kinds of clip"
        expected = x0.clone()
        expected[pick] = resample_history(model, x0[pick], tokens[pick], ts[pick], rs, g)
        assert torch.equal(seen[-1], expected)
        assert (seen[-1][pick, :-cfg.chunk] - x0[pick, :-cfg.chunk]).abs().amax() > 1e-3   # degraded, not the truth


@torch.no_grad()
@pytest.mark.parametrize("mode", ["autoregressive", "parallel"])
def test_resampled_history_reads_each_chunks_own_caption(mode):
    """--event-clips: the history of a clip with a caption per frame is finished chunk by chunk under each chunk's
    caption. The same caption everywhere gives exactly the one-caption history; a caption that changes at a chunk
    leaves the chunks before it as they were."""
    model, cfg, x0, tokens = randomised_tiny()
    rs, ts, c = ResamplingConfig(mode=mode, steps=2), torch.full((2,), 0.7), cfg.chunk
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    one = resample_history(model, x0, tokens, ts, rs, eps=eps)
    per_frame = tokens[:, None].repeat(1, x0.shape[1], 1)   # (B, F, T)
    assert torch.equal(resample_history(model, x0, per_frame, ts, rs, eps=eps), one)
    per_frame[:, c:] = torch.randint(2, cfg.vocab, tokens.shape)[:, None]   # an event at the second chunk
    switched = resample_history(model, x0, per_frame, ts, rs, eps=eps)
    assert torch.equal(switched[:, :c], one[:, :c]) and (switched[:, c:2 * c] - one[:, c:2 * c]).abs().max() > 1e-3
