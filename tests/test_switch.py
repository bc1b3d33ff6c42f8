"""Prompt switching: the frames before a switch are untouched by it, and after it the cache holds re-encoded keys
(or, without re-encoding, the keys a model trained with a caption per frame read)."""

import pytest
import torch

from flow import SamplerConfig
from memory import KVCache, MemoryConfig
from model import DiT, DiTConfig
from rollout import prefill, rollout, switch_prompt


def tiny():
    torch.manual_seed(0)
    model = DiT(DiTConfig.preset("tiny"))
    for p in model.parameters():   # open the adaLN-Zero gates: a fresh DiT predicts v = 0
        if (p == 0).all():
            torch.nn.init.normal_(p, std=0.05)
    return model


@torch.no_grad()
@pytest.mark.parametrize("policy", ["full", "sink"])
def test_frames_before_a_switch_are_unchanged_and_after_it_follow_the_new_prompt(policy):
    model = tiny()
    c = model.cfg.chunk
    a, b = torch.randint(2, 20, (1, 6)), torch.randint(2, 20, (1, 6))
    sampler = SamplerConfig(steps=3, cfg=2.0, shift=1.0)   # guided: the switch re-encodes both halves of the batch
    memory = MemoryConfig(policy, window=4, sink=2)

    def stream(switches):
        g = torch.Generator().manual_seed(0)
        return torch.cat(list(rollout(model, a, 5 * c, memory, sampler, g, switches=switches)), 1)

    plain, switched, to_b = stream({}), stream({3 * c: b}), stream({0: b})
    assert torch.equal(plain[:, :3 * c], switched[:, :3 * c])
    assert not torch.allclose(plain[:, 3 * c:], switched[:, 3 * c:])
    assert not torch.allclose(to_b[:, :c], plain[:, :c])   # the new prompt changes what is drawn


@torch.no_grad()
def test_switch_leaves_the_cache_as_if_its_frames_were_streamed_under_the_new_prompt():
    model = tiny()
    c, depth = model.cfg.chunk, model.cfg.depth
    a, b = torch.randint(2, 20, (1, 6)), torch.randint(2, 20, (1, 6))
    frames = torch.randn(1, 3 * c, model.cfg.channels, model.cfg.height, model.cfg.width)
    cache = KVCache(MemoryConfig("full"), depth)
    prefill(model, frames, a, cache)
    before = [k.clone() for k in cache.k]
    switch_prompt(model, cache, b)
    under_b = KVCache(MemoryConfig("full"), depth)
    prefill(model, frames, b, under_b)
    assert cache.frames == under_b.frames and torch.equal(cache.x, frames)
    for i in range(depth):
        assert torch.allclose(cache.k[i], under_b.k[i], atol=1e-6) and torch.allclose(cache.v[i], under_b.v[i], atol=1e-6)
        # the keys were re-encoded, not kept (the first layer's keys come before any cross-attention)
        assert i == 0 or not torch.allclose(cache.k[i], before[i])


@torch.no_grad()
def test_a_switch_without_reencode_streams_what_a_caption_per_frame_trains():
    """--no-reencode keeps the old prompt's keys: the next chunk is then exactly what the block-causal forward of
    a clip with a caption per frame (train.py --event-clips) predicts, which the re-encoded cache is not."""
    model = tiny()
    c, depth = model.cfg.chunk, model.cfg.depth
    a, b = torch.randint(2, 20, (1, 6)), torch.randint(2, 20, (1, 6))
    frames = torch.randn(1, 3 * c, model.cfg.channels, model.cfg.height, model.cfg.width)
    sigma = torch.zeros(1, 3 * c)
    sigma[:, 2 * c:] = 0.7   # a clean history of two chunks under a, then a noisy chunk under b
    per_frame = torch.cat([a[:, None].expand(-1, 2 * c, -1), b[:, None].expand(-1, c, -1)], 1)   # (1, F, T)
    trained = model(frames, sigma, per_frame, layout="block_causal")[:, 2 * c:]
    streamed = {}
    for reencode in (False, True):
        cache = KVCache(MemoryConfig("full", reencode=reencode), depth)
        prefill(model, frames[:, :2 * c], a, cache)
        before = [k.clone() for k in cache.k]
        switch_prompt(model, cache, b)
        assert all(torch.equal(k, k0) for k, k0 in zip(cache.k, before)) != reencode
        streamed[reencode] = model.forward_cached(frames[:, 2 * c:], sigma[:, 2 * c:], b, cache)[0]
    assert torch.allclose(streamed[False], trained, atol=1e-5)
    assert not torch.allclose(streamed[True], trained, atol=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("policy", ["sink", "slowfast"])
def test_resink_moves_the_sink_to_the_first_frames_made_after_a_switch(policy):
    model = tiny()
    c = model.cfg.chunk
    a, b = torch.randint(2, 20, (1, 6)), torch.randint(2, 20, (1, 6))
    sampler = SamplerConfig(steps=2, cfg=2.0, shift=1.0)
    runs = {}
    for resink in (False, True):
        memory = MemoryConfig(policy, window=2, sink=2, slow=2 if policy == "slowfast" else 0, tau=1.0, resink=resink)
        cache, sizes = KVCache(memory, model.cfg.depth), []
        g = torch.Generator().manual_seed(0)
        chunks = []
        for x0 in rollout(model, a, 8 * c, memory, sampler, g, cache=cache, switches={4 * c: b}):
            chunks.append(x0)
            sizes.append(len(cache))
        runs[resink] = torch.cat(chunks, 1), cache, sizes
    (kept, kept_cache, kept_sizes), (moved, moved_cache, moved_sizes) = runs[False], runs[True]
    assert torch.equal(kept[:, :4 * c], moved[:, :4 * c])        # the frames before the switch are untouched
    assert not torch.allclose(kept[:, 4 * c:], moved[:, 4 * c:])   # after it the sink the model reads differs
    assert 0 in kept_cache.frames and kept_cache.sink_from == 0
    assert moved_cache.sink_from == 4 * c and moved_cache.frames[:2] == [4 * c, 4 * c + 1]
    assert max(moved_sizes) <= 2 + memory.slow + 2 and moved_sizes[-1] == kept_sizes[-1]   # the same bounded cache
