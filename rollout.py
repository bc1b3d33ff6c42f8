"""
Streaming through the KV cache: the clean re-cache, and the chunk-by-chunk rollout every sampler, eval and the
autoregressive history of Resampling Forcing share.

A stream makes one chunk at a time. The chunk is denoised against the cache (the frames already made, at the
positions the memory policy gives them, memory.py); then the model runs once more on the finished x0 at
sigma = 0 and *those* keys/values go into the cache: the clean re-cache of CausVid and Self Forcing. The noisy
keys of a denoising step are never cached, so every later chunk reads the history as clean frames, as it did
in training. `model.forward_cached` returns the keys/values of its call; only `recache` writes them.

With classifier-free guidance the prompt and the null prompt run side by side as one batch of 2B: rows
[0, B) prompted, rows [B, 2B) with the null prompt, each with its own half of the cache (their keys differ,
because cross-attention reads different prompts). `prompts` builds that batch; `recache` repeats the frames
to match it.
"""

import math

import torch

from flow import SamplerConfig, sample
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
    cache.append(kv, x.shape[1])


def denoiser(model, text, cache: KVCache, prompt, cfg: float):
    """denoise(x, sigma) -> v for a chunk x (B, n, C, H, W) against the cache, guided when text holds 2B rows."""
    def denoise(x, s):
        guided = text.shape[0] == 2 * x.shape[0]
        xx = torch.cat([x, x]) if guided else x
        sigma = torch.full(xx.shape[:2], s, device=x.device)
        v = model.forward_cached(xx, sigma, text, cache, prompt=prompt)[0].float()
        if not guided:
            return v
        v_cond, v_null = v.chunk(2)
        return v_null + cfg * (v_cond - v_null)
    return denoise


@torch.no_grad()
def rollout(model, tokens, n_frames: int, memory: MemoryConfig, sampler: SamplerConfig, generator=None,
            cache: KVCache | None = None, context: torch.Tensor | None = None):
    """Stream n_frames (rounded up to whole chunks), yielding each finished chunk x0 (B, chunk, C, H, W).

    context: clean frames (B, K, C, H, W), K a whole number of chunks, written into the cache first, chunk by
    chunk, by the same re-cache pass: a teacher-forced start (eval.py --tf-start). They are not yielded.
    """
    cfg = model.cfg
    B, chunk = tokens.shape[0], cfg.chunk
    text = prompts(tokens, sampler.guided)
    cache = KVCache(memory, cfg.depth) if cache is None else cache
    prompt = model.text(text)   # one prompt for the whole stream: encode it once
    if context is not None:
        assert context.shape[1] % chunk == 0, f"context of {context.shape[1]} frames, chunks of {chunk}"
        for i in range(0, context.shape[1], chunk):
            recache(model, context[:, i:i + chunk], text, cache, prompt)
    denoise = denoiser(model, text, cache, prompt, sampler.cfg)
    for _ in range(math.ceil(n_frames / chunk)):
        noise = torch.randn(B, chunk, cfg.channels, cfg.height, cfg.width, device=tokens.device, generator=generator)
        x0 = sample(sampler, denoise, noise, generator)
        recache(model, x0, text, cache, prompt)
        yield x0
