"""Equivalences of the block-causal DiT: causality, teacher-forcing layout, KV-cache streaming, RoPE."""

import pytest
import torch

from flow import SamplerConfig
from memory import KVCache, MemoryConfig
from model import DiT, DiTConfig, apply_rope, rope
from rollout import recache, rollout



@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def make(frames=12, seed=0):
    torch.manual_seed(seed)
    cfg = DiTConfig.preset("tiny")
    model = DiT(cfg).eval()
    # adaLN-Zero and the zero head make a fresh model a constant function; randomise so outputs depend on inputs
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, frames, cfg.channels, cfg.height, cfg.width)
    clean = torch.randn_like(x)
    sigma = torch.rand(2, frames // cfg.chunk).repeat_interleave(cfg.chunk, 1)
    tokens = torch.randint(2, cfg.vocab, (2, cfg.text_len))
    return model, cfg, x, clean, sigma, tokens


def peak(d):
    return float(d.max()) if d.numel() else 0.0


def test_block_causal_future_never_changes_past():
    model, cfg, x, _, sigma, tokens = make()
    out = model(x, sigma, tokens, layout="block_causal")
    for j in range(1, x.shape[1] // cfg.chunk):
        x2 = x.clone()
        x2[:, j * cfg.chunk:] += torch.randn_like(x2[:, j * cfg.chunk:])
        out2 = model(x2, sigma, tokens, layout="block_causal")
        assert peak((out[:, :j * cfg.chunk] - out2[:, :j * cfg.chunk]).abs()) < 1e-6
        assert peak((out[:, j * cfg.chunk:] - out2[:, j * cfg.chunk:]).abs()) > 1e-3   # and the future does move


@pytest.mark.parametrize("layout", ["block_causal", "bidirectional", "teacher_forcing"])
def test_a_caption_per_frame_is_one_caption_when_they_agree_and_causal_when_they_change(layout):
    """train.py --event-clips: each frame reads its own frame's caption. The same caption on every frame must be
    exactly the one-caption model (so a fine-tune starts where its model is); a caption that changes at a chunk
    must change nothing before it, in the clean history of teacher forcing either."""
    model, cfg, x, clean, sigma, tokens = make()
    other = torch.randint(2, cfg.vocab, tokens.shape)
    history = dict(clean=clean) if layout == "teacher_forcing" else {}
    one = model(x, sigma, tokens, layout=layout, **history)
    per_frame = tokens[:, None].repeat(1, x.shape[1], 1)   # (B, F, T)
    assert torch.equal(model(x, sigma, per_frame, layout=layout, **history), one)
    j = 2 * cfg.chunk
    per_frame[:, j:] = other[:, None]   # a scene event at frame j
    out = model(x, sigma, per_frame, layout=layout, **history)
    if layout != "bidirectional":
        assert peak((out[:, :j] - one[:, :j]).abs()) < 1e-6
    assert peak((out[:, j:] - one[:, j:]).abs()) > 1e-3
    assert peak((out[:, j:] - model(x, sigma, other, layout=layout, **history)[:, j:]).abs()) > 1e-3   # reads both


def test_teacher_forcing_causality():
    model, cfg, x, clean, sigma, tokens = make()
    out = model(x, sigma, tokens, layout="teacher_forcing", clean=clean)
    c = cfg.chunk
    for j in range(x.shape[1] // c):
        # noisy frames of chunk j only affect chunk j
        x2 = x.clone()
        x2[:, j * c:(j + 1) * c] += 1.0
        diff = (model(x2, sigma, tokens, layout="teacher_forcing", clean=clean) - out).abs().amax(dim=(0, 2, 3, 4))
        assert peak(diff[:j * c]) < 1e-6 and peak(diff[(j + 1) * c:]) < 1e-6 and peak(diff[j * c:]) > 1e-3
        # clean frames of chunk j only affect the noisy chunks after j
        clean2 = clean.clone()
        clean2[:, j * c:(j + 1) * c] += 1.0
        diff = (model(x, sigma, tokens, layout="teacher_forcing", clean=clean2) - out).abs().amax(dim=(0, 2, 3, 4))
        assert peak(diff[:(j + 1) * c]) < 1e-6
        if j + 1 < x.shape[1] // c:
            assert peak(diff[(j + 1) * c:]) > 1e-3


def test_teacher_forcing_equals_block_causal_on_clean_history():
    model, cfg, x, clean, sigma, tokens = make()
    tf = model(x, sigma, tokens, layout="teacher_forcing", clean=clean)
    c = cfg.chunk
    for j in range(x.shape[1] // c):
        seq = torch.cat([clean[:, :j * c], x[:, j * c:(j + 1) * c]], 1)
        sig = torch.cat([torch.zeros_like(sigma[:, :j * c]), sigma[:, j * c:(j + 1) * c]], 1)
        bc = model(seq, sig, tokens, layout="block_causal")[:, j * c:]
        assert (bc - tf[:, j * c:(j + 1) * c]).abs().max() <= 1e-4


@pytest.mark.parametrize("policy,window", [("full", None), ("window", 4)])
def test_streaming_cache_equals_full_forward(policy, window):
    model, cfg, x, clean, sigma, tokens = make(frames=12)
    cache = KVCache(MemoryConfig(policy=policy, window=window or 6), cfg.depth)
    c = cfg.chunk
    for j in range(x.shape[1] // c):
        noisy = x[:, j * c:(j + 1) * c]
        streamed, _ = model.forward_cached(noisy, sigma[:, j * c:(j + 1) * c], tokens, cache)
        recache(model, clean[:, j * c:(j + 1) * c], tokens, cache)
        seq = torch.cat([clean[:, :j * c], noisy], 1)
        sig = torch.cat([torch.zeros_like(sigma[:, :j * c]), sigma[:, j * c:(j + 1) * c]], 1)
        full = model(seq, sig, tokens, layout="block_causal", window=window)[:, j * c:]
        assert (streamed - full).abs().max() <= 1e-4, f"chunk {j}"
    if window:
        assert len(cache) == window


def test_rope_shift_invariance():
    model, cfg, x, clean, sigma, tokens = make()
    pos = torch.arange(x.shape[1])
    for layout in ("block_causal", "bidirectional"):
        a = model(x, sigma, tokens, layout=layout, pos=pos)
        b = model(x, sigma, tokens, layout=layout, pos=pos + 37)
        assert (a - b).abs().max() <= 1e-4
    # and positions do matter: reversing time changes the output
    assert (model(x, sigma, tokens, layout="bidirectional", pos=pos.flip(0)) - a).abs().max() > 1e-3


def test_rope_complex_product_equals_the_rotation_of_pairs():
    """apply_rope's complex product is the plain rotation of each pair (x1, x2) by its angle, in fp32 and bf16."""
    cfg = DiTConfig.preset("tiny")
    pos = torch.tensor([0.0, 3.0, 1e4])   # large positions too: bounded ones are small, full-memory ones are not
    rot = rope(cfg, pos)
    ang = rot.angle()                                              # (N, hd/2)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, rot.shape[0], cfg.heads, cfg.dim // cfg.heads).to(dtype)
        x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
        cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
        ref = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
        out = apply_rope(x, rot)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
    assert torch.allclose(rot.abs(), torch.ones(()))


def test_bounded_positions_and_constant_cache_over_long_stream():
    model, cfg, *_ , tokens = make()
    memory = MemoryConfig(policy="sink", window=4, sink=2)
    memory.check(cfg.chunk, cfg.frames)
    cache = KVCache(memory, cfg.depth)
    sampler = SamplerConfig(kind="few", levels=(1.0, 0.5), shift=1.0)
    n_frames = 10 * cfg.frames
    sizes, max_pos = [], 0
    for _ in rollout(model, tokens, n_frames, memory, sampler, cache=cache):
        cached, query = cache.positions(cfg.chunk)
        max_pos = max(max_pos, int(torch.cat([cached, query]).max()))
        sizes.append(cache.nbytes())
    assert cache.next_frame == n_frames
    assert max_pos < cfg.frames, f"position {max_pos} outside the trained range 0..{cfg.frames - 1}"
    warm = (memory.sink + memory.window) // cfg.chunk
    assert len(set(sizes[warm:])) == 1 and sizes[-1] > 0
    # the full policy is the baseline that leaves the trained range and keeps growing
    full = KVCache(MemoryConfig(policy="full"), cfg.depth)
    for _ in rollout(model, tokens, 3 * cfg.frames, MemoryConfig(policy="full"), sampler, cache=full):
        pass
    assert int(full.positions(cfg.chunk)[1].max()) >= cfg.frames and full.nbytes() > sizes[-1]


def test_sink_keeps_first_frames():
    model, cfg, *_, tokens = make()
    memory = MemoryConfig(policy="sink", window=4, sink=2)
    cache = KVCache(memory, cfg.depth)
    for _ in rollout(model, tokens, 20, memory, SamplerConfig(kind="few", levels=(1.0,)), cache=cache):
        pass
    assert cache.frames == [0, 1, 16, 17, 18, 19]


def test_memory_check_rejects_positions_outside_training():
    with pytest.raises(ValueError, match="exceeds"):
        MemoryConfig(policy="sink", window=8, sink=4).check(chunk=2, trained_frames=8)
    with pytest.raises(ValueError, match="unknown memory policy"):
        MemoryConfig(policy="slow").check(chunk=2, trained_frames=8)


def routed(model, topk):
    model.cfg.topk = topk
    return model


def test_routing_with_k_covering_history_is_dense():
    model, cfg, x, clean, sigma, tokens = make()
    dense_bc = model(x, sigma, tokens, layout="block_causal")
    dense_tf = model(x, sigma, tokens, layout="teacher_forcing", clean=clean)
    routed(model, x.shape[1])
    assert (model(x, sigma, tokens, layout="block_causal") - dense_bc).abs().max() <= 1e-5
    assert (model(x, sigma, tokens, layout="teacher_forcing", clean=clean) - dense_tf).abs().max() <= 1e-5
    routed(model, 1)   # and a real top-1 is not dense
    assert (model(x, sigma, tokens, layout="block_causal") - dense_bc).abs().max() > 1e-4


@pytest.mark.parametrize("topk", [1, 2])
@pytest.mark.parametrize("policy,route_sink", [("full", 0), ("sink", 0), ("sink", 2)])
def test_routed_streaming_equals_routed_full_forward(topk, policy, route_sink):
    # the same keys at the same positions give the same scores, so the cache picks what the full forward picks;
    # and one rule decides which frames are never routed away (the model's route_sink), whatever the memory keeps
    model, cfg, x, clean, sigma, tokens = make(frames=12)
    routed(model, topk).cfg.route_sink = route_sink
    cache = KVCache(MemoryConfig(policy=policy, sink=2, window=10), cfg.depth)   # nothing evicted in 12 frames
    c = cfg.chunk
    tf = model(x, sigma, tokens, layout="teacher_forcing", clean=clean)
    for j in range(x.shape[1] // c):
        streamed, _ = model.forward_cached(x[:, j * c:(j + 1) * c], sigma[:, j * c:(j + 1) * c], tokens, cache)
        recache(model, clean[:, j * c:(j + 1) * c], tokens, cache)
        assert (streamed - tf[:, j * c:(j + 1) * c]).abs().max() <= 1e-4, f"chunk {j}"


def test_time_embedding_and_modulation_stay_fp32_under_autocast():
    model, cfg, x, _, sigma, _ = make()
    h, t, e = model._embed(x, sigma)
    with torch.autocast("cpu", torch.bfloat16):
        h16, t16, e16 = model._embed(x, sigma)
    assert h16.dtype == torch.bfloat16                     # the tokens do run in bf16
    assert t16.dtype == e16.dtype == torch.float32
    assert torch.equal(t16, t) and torch.equal(e16, e)     # bit for bit what fp32 computes
