"""
Streaming through the KV cache: the clean re-cache, the chunked and the rolling rollouts, and prompt switching,
shared by sample.py, eval.py, Resampling Forcing's autoregressive history and the distillation rollouts.

A stream makes one chunk at a time. The chunk is denoised against the cache (the frames already made, at the
positions the memory policy gives them, memory.py); then the model runs once more on the finished x0 at
sigma = 0 and *those* keys/values go into the cache: the clean re-cache of CausVid and Self Forcing. The noisy
keys of a denoising step are never cached, so every later chunk reads the history as clean frames, as it did
in training. `model.forward_cached` returns the keys/values of its call; only `recache` writes them.

With classifier-free guidance the prompt and the null prompt run side by side as one batch of 2B: rows
[0, B) prompted, rows [B, 2B) with the null prompt, each with its own half of the cache (their keys differ,
because cross-attention reads different prompts). `prompts` builds that batch; `recache` repeats the frames
to match it.

Rolling Forcing (Liu et al. 2025) replaces the chunk-by-chunk schedule by a window of W chunks at rising noise
levels, W = the number of few-step levels: each call denoises the whole window jointly (bidirectional inside
it, the cache before it), the oldest chunk leaves it finished and is re-cached, the others are re-noised to
their next level, and a fresh chunk of pure noise enters at the back. Every chunk is thus evaluated at exactly
the W levels, in order, one per window, at one forward per emitted chunk plus its re-cache.
"""

import math

import torch

from flow import SamplerConfig, bound, sample, to_x0
from memory import KVCache, MemoryConfig


def prompts(tokens: torch.Tensor, guided: bool) -> torch.Tensor:
    """The prompt batch a stream runs: tokens (B, T), or [tokens | null prompt] (2B, T) under guidance."""
    return torch.cat([tokens, torch.zeros_like(tokens)]) if guided else tokens


def recache(model, x0, text, cache: KVCache, prompt=None):
    """The clean re-cache pass: run the finished frames x0 (B, n, C, H, W) at sigma 0 and append their keys and
    values to the cache. text: the stream's prompt batch, B or 2B rows (guided: x0 runs under both halves)."""
    assert text.shape[0] % x0.shape[0] == 0, f"{text.shape[0]} prompts for {x0.shape[0]} streams"
    x = x0.repeat(text.shape[0] // x0.shape[0], 1, 1, 1, 1)                  # (B or 2B, n, C, H, W)
    _, kv = model.forward_cached(x, torch.zeros(x.shape[:2], device=x.device), text, cache, prompt=prompt)
    cache.append(kv, x)


def prefill(model, context, text, cache: KVCache, prompt=None):
    """Write clean frames context (B, K, C, H, W), K whole chunks, into the cache chunk by chunk by the re-cache
    pass, as if the stream had made them: a teacher-forced start. None writes nothing."""
    if context is None:
        return
    chunk = model.cfg.chunk
    assert context.shape[1] % chunk == 0, f"context of {context.shape[1]} frames, chunks of {chunk}"
    for i in range(0, context.shape[1], chunk):
        recache(model, context[:, i:i + chunk], text, cache, prompt)


@torch.no_grad()
def reencode(model, cache: KVCache, text, prompt=None) -> KVCache:
    """A new cache holding exactly the frames `cache` keeps, at the same positions, with the keys and values
    `model` gives them under the prompt batch `text`: each kept frame re-encoded a chunk at a time, at its own
    absolute index, reading the kept frames before it as already re-encoded. The new cache evicts nothing (a
    reader's copy of a memory, not a stream's). Used by a prompt switch (the same model, a new prompt) and by
    Context Forcing's contextual DMD (the same memory, read by the score and the critic)."""
    x, frames, chunk = cache.x, list(cache.frames), model.cfg.chunk
    # placed as the stream's own: absolute (full), or contiguous (the bounded policies)
    keep_all = MemoryConfig("full") if cache.cfg.policy == "full" else MemoryConfig("window", window=max(1, len(frames)))
    fresh = KVCache(keep_all, len(cache.k))
    fresh.next_frame = cache.next_frame
    if x is None:
        return fresh
    assert text.shape[0] % x.shape[0] == 0, f"the cache holds {x.shape[0]} streams, the prompt batch {text.shape[0]}"
    start = 0
    while start < len(frames):   # runs of consecutive frames (the sink, slow frames, the window), a chunk at most
        end = start + 1
        while end < len(frames) and end - start < chunk and frames[end] == frames[end - 1] + 1:
            end += 1
        fresh.next_frame = frames[start]
        recache(model, x[:, start:end], text, fresh, prompt)
        start = end
    assert fresh.frames == frames, "re-encoding must keep exactly the cached frames"
    fresh.next_frame = cache.next_frame
    return fresh


def switch_prompt(model, cache: KVCache, text, prompt=None):
    """A prompt switch (LongLive's KV re-cache): every frame the cache keeps re-encoded under the new prompt
    batch `text` (reencode): the cache becomes what it would be had the kept frames been streamed under the new
    prompt. One extra pass over the kept frames; the frames themselves do not change. A memory with reencode off
    keeps the keys as they were made."""
    if cache.x is None:
        return   # nothing made yet: the new prompt simply starts the stream
    if cache.cfg.resink:   # the old sink leaves before the re-encode: the cache is what the new prompt's would be
        cache.move_sink()
    if not cache.cfg.reencode:   # the kept frames keep their old prompt's keys, as in training with --event-clips
        return
    assert cache.x.shape[0] == text.shape[0], f"the cache holds {cache.x.shape[0]} streams, the prompt batch {text.shape[0]}"
    fresh = reencode(model, cache, text, prompt)
    cache.rewrite([fresh.kv(i) for i in range(len(fresh.k))])


def denoiser(model, text, cache: KVCache, prompt, sampler: SamplerConfig):
    """denoise(x, sigma) -> v for a chunk x (B, n, C, H, W) against the cache; text is the stream's prompt batch
    (prompts(tokens, sampler.guided)): under guidance x runs beside itself under the null prompt.

    sampler.cfg_sigma < 1 guides only the levels up to it (Kynkaanniemi et al. 2024, Applying Guidance in a Limited
    Interval): at the highest levels, where a chunk's layout is decided, guidance pushes away from the null prompt's
    objects and the chunk draws fewer (docs/cpu-recipe.md section 30). The null pass still runs there, so the batch
    and the cache keep one layout.

    sampler.history != 1 adds history guidance (Song et al. 2025, History-Guided Video Diffusion): the chunk also
    runs alone, as the first chunk of a clip, under the prompt, and the step moves further from that prediction
    towards the one that reads the cache, v += (history - 1) (v_cache - v_alone), at the levels up to
    sampler.history_sigma. A model trained block-causally knows the no-history case (every clip's first chunk),
    so this needs no training; it makes the chunk copy what the history shows, the objects' shapes above all.
    At the high levels, where a chunk's layout is decided, it would also amplify every object's growth from
    chunk to chunk until one fills the frame: hence the interval (docs/cpu-recipe.md section 21)."""
    def denoise(x, s):
        assert text.shape[0] == (2 if sampler.guided else 1) * x.shape[0], (text.shape, x.shape)
        xx = torch.cat([x, x]) if sampler.guided else x
        sigma = torch.full(xx.shape[:2], s, device=x.device)
        v = model.forward_cached(xx, sigma, text, cache, prompt=prompt)[0].float()
        if sampler.guided:   # above cfg_sigma the step is the prompt's own (guidance interval)
            v_cond, v_null = v.chunk(2)
            out = v_null + (sampler.cfg if s <= sampler.cfg_sigma else 1.0) * (v_cond - v_null)
        else:
            v_cond = out = v
        if sampler.history != 1 and cache.frames and s <= sampler.history_sigma:
            alone = model(x, sigma[:x.shape[0]], text[:x.shape[0]], layout="block_causal").float()
            out = out + (sampler.history - 1) * (v_cond - alone)
        return out
    return denoise


@torch.no_grad()
def rollout(model, tokens, n_frames: int, memory: MemoryConfig, sampler: SamplerConfig, generator=None,
            cache: KVCache | None = None, context: torch.Tensor | None = None, switches: dict | None = None):
    """Stream n_frames (rounded up to whole chunks), yielding each finished chunk x0 (B, chunk, C, H, W).

    context: clean frames (B, K, C, H, W), K a whole number of chunks, written into the cache first, chunk by
    chunk, by the same re-cache pass: a teacher-forced start (eval.py --tf-start). They are not yielded.
    switches: {frame: tokens (B, T)}, frames a multiple of the chunk counted from the first generated frame:
    the prompt changes there (switch_prompt).
    """
    switches = switches or {}
    assert all(f % model.cfg.chunk == 0 for f in switches), f"switch frames must start chunks: {sorted(switches)}"
    cfg = model.cfg
    B, chunk = tokens.shape[0], cfg.chunk
    text = prompts(tokens, sampler.guided)
    cache = KVCache(memory, cfg.depth) if cache is None else cache
    prompt = model.text(text)   # one prompt for the whole stream: encode it once
    prefill(model, context, text, cache, prompt)
    denoise = denoiser(model, text, cache, prompt, sampler)
    shape, shared = (B, chunk, cfg.channels, cfg.height, cfg.width), None
    if sampler.shared_noise:   # one draw every chunk starts from a share of: chunks alike where the history allows
        shared = torch.randn(shape, device=tokens.device, generator=generator)
    for i in range(math.ceil(n_frames / chunk)):
        if i * chunk in switches:   # a new prompt from this chunk on: re-encode what the cache keeps under it
            text = prompts(switches[i * chunk], sampler.guided)
            prompt = model.text(text)
            switch_prompt(model, cache, text, prompt)
            denoise = denoiser(model, text, cache, prompt, sampler)
        noise = torch.randn(shape, device=tokens.device, generator=generator)
        if shared is not None:   # unit variance kept: a mix of two independent unit normals
            noise = sampler.shared_noise ** 0.5 * shared + (1 - sampler.shared_noise) ** 0.5 * noise
            if sampler.shared_decay < 1:   # the shared draw drifts (an AR(1) walk), so no layout holds for ever
                fresh = torch.randn(shape, device=tokens.device, generator=generator)
                shared = sampler.shared_decay * shared + (1 - sampler.shared_decay ** 2) ** 0.5 * fresh
        x0 = sample(sampler, denoise, noise, generator)
        recache(model, x0, text, cache, prompt)
        yield x0


def rolling_windows(model, tokens, n_chunks: int, sigmas: list[float], cache: KVCache, prompt=None, generator=None,
                    graded=lambda w: False, clip: float | None = None, switches: dict | None = None):
    """Rolling Forcing's windows over n_chunks chunks, yielding (w, first, x0) per window w: the x0
    prediction (B, k * chunk, C, H, W) of the window's chunks first..first + k - 1, oldest first.

    sigmas: the W few-step levels, highest first. Window w holds chunks max(0, w - W + 1)..min(n_chunks - 1, w);
    chunk j sits in it at level sigmas[w - j], so the oldest is at the lowest level and leaves finished (its x0
    of this window is its frame), while the windows ramp up at the start and down at the end. Only finished
    chunks are cached, so while the window ramps up it sees only itself. graded(w): run window w with gradient
    (distillation); every other call, and every re-cache, runs without. clip: as SamplerConfig.clip, applied
    to a finished chunk before it is cached (the yielded x0 is the model's, unclipped). switches: {chunk index i:
    tokens}: from window i, the one chunk i enters, every call runs under the new prompt, and the cache is
    re-encoded under it then (switch_prompt). The chunks already in the window finish under it; the chunks that
    left it are untouched.
    """
    c, W, B = model.cfg, len(sigmas), tokens.shape[0]
    prompt = model.text(tokens) if prompt is None else prompt
    switches = switches or {}
    noisy = {}   # chunk index -> its noisy frames at the level of its next window
    for w in range(n_chunks + W - 1):
        if w in switches:
            tokens = switches[w]
            prompt = model.text(tokens)
            switch_prompt(model, cache, tokens, prompt)
        if w < n_chunks:
            noisy[w] = torch.randn(B, c.chunk, c.channels, c.height, c.width, device=tokens.device,
                                   generator=generator)
        first, last = max(0, w - W + 1), min(n_chunks - 1, w)
        x = torch.cat([noisy[j] for j in range(first, last + 1)], dim=1)               # (B, k * chunk, C, H, W)
        levels = torch.tensor([sigmas[w - j] for j in range(first, last + 1)], device=tokens.device)
        sigma = levels.repeat_interleave(c.chunk)[None].expand(B, -1)                  # (B, k * chunk)
        with torch.set_grad_enabled(torch.is_grad_enabled() and graded(w)):
            x0 = to_x0(x, sigma, model.forward_cached(x, sigma, tokens, cache, prompt=prompt)[0].float())
        for j, x0_j in zip(range(first, last + 1), x0.detach().split(c.chunk, dim=1)):
            k = w - j + 1   # the chunk's next level
            if k < W:
                eps = torch.randn(x0_j.shape, device=x0_j.device, generator=generator)
                noisy[j] = (1 - sigmas[k]) * x0_j + sigmas[k] * eps
        if w - first == W - 1:   # the oldest chunk is finished: it leaves the window and enters the cache
            done = x0[:, :c.chunk].detach()
            with torch.no_grad():
                recache(model, bound(done, clip), tokens, cache, prompt)
            del noisy[first]
        yield w, first, x0


@torch.no_grad()
def rolling_rollout(model, tokens, n_frames: int, memory: MemoryConfig, sampler: SamplerConfig, generator=None,
                    cache: KVCache | None = None, context: torch.Tensor | None = None, switches: dict | None = None):
    """Stream n_frames (whole chunks) on Rolling Forcing's schedule, yielding each chunk (B, chunk, C, H, W) as
    it leaves the window. A few-step (distilled) sampler: its levels are the window's, no guidance. context and
    switches ({frame: tokens}): as for rollout; a switch takes effect when its chunk enters the window
    (rolling_windows), so the W - 1 chunks then in the window finish under the new prompt."""
    assert sampler.kind == "few", "the rolling schedule runs the few-step levels of a distilled model"
    cfg = model.cfg
    switches = switches or {}
    assert all(f % cfg.chunk == 0 for f in switches), f"switch frames must start chunks: {sorted(switches)}"
    cache = KVCache(memory, cfg.depth) if cache is None else cache
    prefill(model, context, tokens, cache)
    W = len(sampler.levels)
    for w, first, x0 in rolling_windows(model, tokens, math.ceil(n_frames / cfg.chunk), sampler.sigmas(), cache,
                                        generator=generator, clip=sampler.clip,
                                        switches={f // cfg.chunk: t for f, t in switches.items()}):
        if w - first == W - 1:
            chunk = x0[:, :cfg.chunk]
            yield bound(chunk, sampler.clip)
