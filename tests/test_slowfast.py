"""Context Forcing's slow/fast memory: promotion by surprise, bounded sizes and positions, constant bytes."""

import torch

from flow import SamplerConfig
from memory import KVCache, MemoryConfig, filling
from model import DiT, DiTConfig
from rollout import rollout

L, H, HD = 4, 2, 8   # tokens per frame, heads, head dim of the hand-built keys


def frame_kv(content: torch.Tensor, depth: int = 2):
    """Keys/values of one frame whose tokens carry `content` (L, H * HD) plus an offset shared by every frame (the
    descriptor must see past it): one (k, v) per layer."""
    k = (content + torch.arange(H * HD) / 4).view(1, L, H, HD)
    return [(k, k.clone()) for _ in range(depth)]


def test_a_repeated_frame_is_not_promoted_and_a_new_one_is():
    torch.manual_seed(0)
    a, b, c = torch.randn(L, H * HD), torch.randn(L, H * HD), torch.randn(L, H * HD)
    cache = KVCache(MemoryConfig("slowfast", window=2, sink=1, slow=3, tau=0.95), depth=2)
    for content in (a, a, a, b, b, c, c, c):   # frames 0..7; frame 0 is the sink
        cache.append(frame_kv(content), torch.zeros(1, 1, 3, 4, 4))
    # leaving the fast FIFO in order: 1 (a after a: dropped), 2 (a after a: dropped), 3 (b after a: promoted),
    # 4 (b after b: dropped), 5 (c after b: promoted); 6 and 7 are the fast FIFO
    assert cache.slow == [3, 5] and cache.frames == [0, 3, 5, 6, 7] and cache.promoted == 2
    assert torch.equal(cache.k[0][0, 1], frame_kv(b)[0][0][0]) and torch.equal(cache.k[1][0, 2], frame_kv(c)[0][0][0])


def test_sizes_positions_and_bytes_stay_bounded_over_a_long_stream():
    torch.manual_seed(0)
    cfg = MemoryConfig("slowfast", window=4, sink=2, slow=6, tau=0.95)
    cache = KVCache(cfg, depth=2)
    sizes, chunk = [], 2
    for t in range(300):
        if t % 3 == 0:   # a new scene every third chunk, a still one between
            scene = torch.randn(L, H * HD)
        kvs = frame_kv(scene)
        cache.append([(torch.cat([k, k], 1), torch.cat([v, v], 1)) for k, v in kvs], torch.zeros(1, chunk, 3, 4, 4))
        fast = [f for f in cache.frames if f >= cfg.sink and f not in cache.slow]
        assert len(cache.slow) <= cfg.slow and len(fast) <= cfg.window and len(cache) <= cfg.sink + cfg.slow + cfg.window
        assert cache.frames == sorted(cache.frames) and cache.frames[:cfg.sink] == list(range(cfg.sink))
        cached, query = cache.positions(chunk)
        assert int(query.max()) <= cfg.sink + cfg.slow + cfg.window + chunk - 1
        sizes.append(cache.nbytes())
    assert len(set(sizes[50:])) == 1 and 0 < cache.promoted < 300   # constant once slow memory is full
    assert cache.left == cache.next_frame - len(cache) + len(cache.slow)   # every frame not in sink or fast has left
    assert cache.reach() == cache.next_frame - min(cache.slow)


@torch.no_grad()
def test_a_model_streams_through_slowfast_memory():
    torch.manual_seed(0)
    cfg = DiTConfig.preset("tiny")
    model = DiT(cfg)
    memory = MemoryConfig("slowfast", window=2, sink=2, slow=2)
    memory.check(cfg.chunk, cfg.frames)
    cache = KVCache(memory, cfg.depth)
    video = torch.cat(list(rollout(model, torch.randint(2, 20, (1, 6)), 40, memory, SamplerConfig(steps=2, cfg=1.0),
                                   cache=cache)), 1)
    assert video.shape[1] == 40 and torch.isfinite(video).all()
    assert len(cache) <= 6 and cache.frames[:2] == [0, 1]


def test_filled_memories_hold_the_same_frames_so_policies_compare_at_equal_bytes():
    cfg = DiTConfig.preset("cpu")
    sizes = {}
    for policy in ("window", "sink", "slowfast"):
        memory = filling(policy, cfg.frames, cfg.chunk, cfg.chunk)
        memory.check(cfg.chunk, cfg.frames)
        cache = KVCache(memory, depth=2)
        for t in range(40):   # every frame new: slowfast promotes each one that leaves its fast FIFO
            k = torch.randn(1, cfg.chunk * L, H, HD)
            cache.append([(k, k.clone()) for _ in range(2)], torch.zeros(1, cfg.chunk, 3, 4, 4))
        sizes[policy] = (len(cache), cache.nbytes())
    assert len(set(sizes.values())) == 1 and sizes["sink"][0] == cfg.frames - cfg.chunk, sizes


def promoted_frames(memory: MemoryConfig, jitter: float, n: int = 400, every: int = 50) -> list[int]:
    """The frames promoted over a hand-built stream, one frame per append: a scene that changes completely every
    `every` frames and moves by `jitter` (noise on its tokens) from frame to frame between."""
    torch.manual_seed(0)
    cache, promoted = KVCache(memory, depth=2), []
    for t in range(n):
        if t % every == 0:
            scene = torch.randn(L, H * HD)
        before = set(cache.slow)
        cache.append(frame_kv(scene + jitter * torch.randn(L, H * HD)), torch.zeros(1, 1, 3, 4, 4))
        promoted += sorted(set(cache.slow) - before)
    return promoted


def test_promote_keeps_the_same_share_on_a_still_and_a_busy_scene():
    jumps = set(range(50, 400, 50))   # the frames where the scene changes (frame 0 is the sink)
    tau, share = MemoryConfig("slowfast", window=2, sink=1, slow=3), MemoryConfig("slowfast", window=2, sink=1,
                                                                                 slow=3, promote=0.02)
    still, busy = promoted_frames(tau, 0.05), promoted_frames(tau, 0.6)
    assert set(still) == jumps and len(busy) > 200   # a fixed tau: the jumps on one scene, most frames on the other
    for jitter in (0.05, 0.6):
        frames = promoted_frames(share, jitter)
        assert jumps <= set(frames), jitter          # every change of scene is promoted on both scenes ...
        late = [f for f in frames if f >= 100]       # ... and, once 100 similarities are known, about the share:
        assert len(late) <= 2 * 0.02 * 300, (jitter, late)   # (the jumps themselves are 2.3% of the frames)
