"""
The block-causal diffusion transformer (DiT) every forcing method trains.

It follows Wan2.1's transformer (the model Self Forcing, Rolling Forcing and LongLive build on), scaled down:
  - patchify each frame into (H/p)(W/p) tokens (a (1, p, p) patch: time is never patched);
  - per-frame timestep conditioning: adaLN-Zero modulation computed from sigma[B, F], so one sequence can
    hold frames at different noise levels (Diffusion Forcing, teacher forcing's clean/noisy halves,
    Rolling Forcing's window of rising noise);
  - 3-axis RoPE (time, row, column). Positions are an *input*: the caller (a layout, or a KV-cache policy
    in memory.py) decides where each frame sits in time, so streaming can re-index frames freely;
  - cross-attention to the prompt, with a learned start token so the empty (null) prompt is well defined;
  - two forwards: `forward` for the training layouts of attention.py, and `forward_cached` for streaming,
    where the current chunk attends, unmasked, to the KV cache plus itself.

Keys are returned *before* RoPE so the cache can store them position-free (memory.py).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from attention import attend, attention, layout_mask, stream_mask
from data import VOCAB


@dataclass
class DiTConfig:
    height: int = 32          # frame size in pixels (or latent cells for the Wan shape)
    width: int = 32
    channels: int = 3
    patch: int = 4            # spatial patch; tokens per frame = (height/patch) * (width/patch)
    dim: int = 256
    depth: int = 6
    heads: int = 4
    ffn: int = 1024
    chunk: int = 3            # frames per autoregressive chunk
    frames: int = 12          # training clip length; time positions 0..frames-1 are the trained range
    vocab: int = len(VOCAB)
    text_len: int = 24        # prompt tokens (data.tokenize pads/truncates to this)
    text_layers: int = 2      # small self-attention stack over the prompt words
    rope_theta: float = 10000.0
    topk: int = 0             # history routing: each query attends to its top-k history frames (0 = all of them)
    route_sink: int = 0       # the first route_sink frames of a clip or stream are always attended, never routed

    @property
    def tokens_per_frame(self) -> int:
        return (self.height // self.patch) * (self.width // self.patch)

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @staticmethod
    def preset(name: str) -> "DiTConfig":
        if name == "tiny":    # tests and the CPU demo; patch 4 so the head (dim 64 -> 48 pixel values) is no bottleneck
            return DiTConfig(patch=4, dim=64, depth=2, heads=4, ffn=256, chunk=2, frames=8, text_layers=1)
        if name == "cpu":     # the 2-core CPU recipe: 8x8x4 VAE latents of 32x32 frames, 2x2 patches, 16 tokens/frame
            return DiTConfig(height=8, width=8, channels=4, patch=2, dim=256, depth=4, heads=4, ffn=1024, chunk=2,
                             frames=8, text_layers=1)
        if name == "small":   # ToyWorld 32x32 on one GPU; few-step streaming at 16+ frames/s on a 2-core CPU
            return DiTConfig()
        if name == "wan":     # Wan2.1-T2V-1.3B transformer shapes (480x832 video -> 60x104 latents)
            return DiTConfig(height=60, width=104, channels=16, patch=2, dim=1536, depth=30, heads=12,
                             ffn=8960, chunk=3, frames=21, text_len=512)
        raise ValueError(f"unknown preset {name!r} (tiny, cpu, small, wan)")


# ----------------------------------------------------------------------------------------------------------
# helpers

def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    B, Fr, C, H, W = x.shape
    x = x.reshape(B, Fr, C, H // p, p, W // p, p)
    return x.permute(0, 1, 3, 5, 2, 4, 6).reshape(B, Fr, (H // p) * (W // p), C * p * p)  # (B, F, L, Cpp)


def unpatchify(x: torch.Tensor, p: int, C: int, H: int, W: int) -> torch.Tensor:
    B, Fr = x.shape[:2]
    x = x.reshape(B, Fr, H // p, W // p, C, p, p)
    return x.permute(0, 1, 4, 2, 5, 3, 6).reshape(B, Fr, C, H, W)


def timestep_embedding(sigma: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """Sinusoidal features of sigma * 1000 (the 0..1000 timestep scale of the reference code)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
    args = sigma.float()[..., None] * 1000.0 * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope(cfg: DiTConfig, time_pos: torch.Tensor) -> torch.Tensor:
    """Rotations (F*L, hd/2) as unit complex numbers, for frames at time positions `time_pos` (F,), any values.

    The head dim is split into time / row / column bands as in Wan: hd - 4(hd//6), 2(hd//6), 2(hd//6).
    """
    hd = cfg.head_dim
    bands = (hd - 4 * (hd // 6), 2 * (hd // 6), 2 * (hd // 6))
    freqs = [cfg.rope_theta ** (-torch.arange(0, b, 2, dtype=torch.float64, device=time_pos.device) / b)
             for b in bands]
    Hp, Wp = cfg.height // cfg.patch, cfg.width // cfg.patch
    rows = torch.arange(Hp, device=time_pos.device, dtype=torch.float64).repeat_interleave(Wp)  # (L,)
    cols = torch.arange(Wp, device=time_pos.device, dtype=torch.float64).repeat(Hp)            # (L,)
    Fr, L = time_pos.shape[0], Hp * Wp
    t = time_pos.to(torch.float64)[:, None, None] * freqs[0]                                  # (F, 1, bt/2)
    r = (rows[:, None] * freqs[1])[None]                                                      # (1, L, bh/2)
    c = (cols[:, None] * freqs[2])[None]
    ang = torch.cat([t.expand(Fr, L, -1), r.expand(Fr, -1, -1), c.expand(Fr, -1, -1)], dim=-1)
    ang = ang.reshape(Fr * L, hd // 2).float()   # angles in fp64 first: positions can be large
    return torch.polar(torch.ones_like(ang), ang)   # cos + i sin, computed once a forward for every layer


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x (B, N, H, hd) by rot (N, hd/2), unit complex numbers: each pair (x1, x2) read
    as x1 + i x2 and multiplied, (x1 cos - x2 sin, x1 sin + x2 cos). One complex product, about 5x faster on the
    CPU than the same rotation written with real halves."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))        # (B, N, H, hd/2)
    return torch.view_as_real(pairs * rot[None, :, None]).flatten(-2).type_as(x)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


# ----------------------------------------------------------------------------------------------------------
# modules, leaf to root

class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // heads, eps=1e-6)   # qk-norm (Wan): keeps logits tame in bf16
        self.k_norm = nn.RMSNorm(dim // heads, eps=1e-6)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, rot_q, rot_k, mask=None, past=None):
        """x (B, N, D). past = (k, v) pre-RoPE from the cache, (B, Np, H, hd), or None. mask: see attention.py.

        rot_q, rot_k: the RoPE rotations (model.rope) of the queries and of the keys [past | x]. Returns the output
        and this call's own pre-RoPE (k, v).
        """
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).unbind(2)  # (B, N, H, hd)
        q, k = self.q_norm(q.float()).type_as(q), self.k_norm(k.float()).type_as(k)   # norm in fp32 (its weight's dtype)
        new_kv = (k, v)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1)
        q, k = apply_rope(q, rot_q).to(v.dtype), apply_rope(k, rot_k).to(v.dtype)   # FlexAttention wants one dtype
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)             # (B, H, N, hd)
        o = attention(q, k, v, mask)
        return self.out(o.transpose(1, 2).reshape(B, N, D)), new_kv


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, ctx, ctx_mask, rows=None):
        """x (B, N, D) reads the prompt ctx (B, T, D); ctx_mask (B, T) marks real (non-pad) tokens. rows (B,): the
        ctx row each x row reads, when ctx holds only the distinct prompts (a caption per frame)."""
        B, N, D = x.shape
        H, hd = self.heads, D // self.heads
        q = self.q(x).view(B, N, H, hd).transpose(1, 2)
        k, v = self.kv(ctx).view(ctx.shape[0], -1, 2, H, hd).unbind(2)   # projected once per distinct prompt
        if rows is not None:
            k, v, ctx_mask = k[rows], v[rows], ctx_mask[rows]
        o = attend(q, k.transpose(1, 2), v.transpose(1, 2), ctx_mask[:, None, None, :])
        return self.out(o.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.dim
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(D, cfg.heads)
        self.norm2 = nn.LayerNorm(D, eps=1e-6)
        self.cross = CrossAttention(D, cfg.heads)
        self.norm3 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(D, cfg.ffn), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn, D))
        # per-block offset on the shared time projection (Wan's scheme); zero = adaLN-Zero gates at init
        self.modulation = nn.Parameter(torch.zeros(6, D))

    def forward(self, x, e, ctx, ctx_mask, rot_q, rot_k, mask=None, past=None, captions=None):
        """x (B, F, L, D) tokens; e (B, F, 6, D) per-frame modulation; captions (B, F): with a caption per frame,
        the row of ctx each frame reads. Returns x and this block's (k, v)."""
        B, Fr, L, D = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = (e + self.modulation).unsqueeze(2).unbind(3)  # (B,F,1,D)
        h = modulate(self.norm1(x), shift1, scale1).reshape(B, Fr * L, D)
        a, kv = self.attn(h, rot_q, rot_k, mask, past)
        x = x + gate1 * a.view(B, Fr, L, D)
        if captions is None:   # one caption per clip (B, T, D), read by all its frames
            y = self.cross(self.norm2(x).reshape(B, Fr * L, D), ctx, ctx_mask)
        else:                  # each frame's tokens read their own frame's caption
            y = self.cross(self.norm2(x).reshape(B * Fr, L, D), ctx, ctx_mask, captions.flatten())
        x = x + y.view(B, Fr, L, D)
        x = x + gate2 * self.mlp(modulate(self.norm3(x), shift2, scale2))
        return x, kv


class TextEncoder(nn.Module):
    """Word embeddings + a few self-attention blocks; a learned start token makes the null prompt valid."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.dim
        self.embed = nn.Embedding(cfg.vocab, D)
        self.start = nn.Parameter(torch.randn(1, 1, D) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, cfg.text_len + 1, D) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(D, cfg.heads, 2 * D, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(cfg.text_layers))
        self.norm = nn.LayerNorm(D)

    def forward(self, tokens: torch.Tensor):
        """tokens (B, T) int64, 0 = pad. Returns ctx (B, T+1, D) and its validity mask (B, T+1)."""
        B, T = tokens.shape
        mask = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=tokens.device), tokens != 0], dim=1)
        h = torch.cat([self.start.expand(B, -1, -1), self.embed(tokens)], dim=1) + self.pos[:, :T + 1]
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=~mask)
        return self.norm(h), mask


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        assert cfg.height % cfg.patch == 0 and cfg.width % cfg.patch == 0, "frame size must divide by patch"
        assert cfg.dim % cfg.heads == 0 and cfg.head_dim % 2 == 0
        assert cfg.frames % cfg.chunk == 0, "training clip must be a whole number of chunks"
        self.cfg = cfg
        D = cfg.dim
        self.patch_embed = nn.Linear(cfg.channels * cfg.patch ** 2, D)
        self.time_embed = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))   # shared by all blocks (Wan)
        self.text = TextEncoder(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.head_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.head_modulation = nn.Parameter(torch.zeros(2, D))
        self.head = nn.Linear(D, cfg.channels * cfg.patch ** 2)
        self.reset_parameters()

    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.text.embed.weight, std=0.02)
        nn.init.zeros_(self.time_proj[-1].weight)   # adaLN-Zero: every residual branch starts closed
        nn.init.zeros_(self.head.weight)            # and the model starts by predicting v = 0

    # -- pieces shared by both forwards --------------------------------------------------------------------
    def _embed(self, x, sigma):
        """Video (B, F, C, H, W) and sigma (B, F) -> tokens (B, F, L, D), time emb (B, F, D), mod (B, F, 6, D)."""
        assert x.dim() == 5 and x.shape[2:] == (self.cfg.channels, self.cfg.height, self.cfg.width), x.shape
        assert sigma.shape == x.shape[:2], f"sigma {tuple(sigma.shape)} must be (B, F) = {tuple(x.shape[:2])}"
        h = self.patch_embed(patchify(x, self.cfg.patch))
        with torch.autocast(x.device.type, enabled=False):   # time embedding and modulation in fp32, as Wan
            t = self.time_embed(timestep_embedding(sigma))
            return h, t, self.time_proj(t).unflatten(-1, (6, -1))

    def _head(self, h, t):
        shift, scale = (self.head_modulation + t.unsqueeze(2)).unsqueeze(2).unbind(3)   # (B, F, 1, D)
        out = self.head(modulate(self.head_norm(h), shift, scale))
        c = self.cfg
        return unpatchify(out, c.patch, c.channels, c.height, c.width)

    # -- training layouts ----------------------------------------------------------------------------------
    def forward(self, x, sigma, tokens, layout="block_causal", clean=None, clean_sigma=None, pos=None,
                window=None):
        """Predict the flow v = eps - x0 for every frame of x (B, F, C, H, W) at noise sigma (B, F).

        tokens: the prompt (B, T), or a caption per frame (B, F, T). layout: "bidirectional" | "block_causal" |
        "teacher_forcing". For teacher_forcing, `clean` is the history (B, F, C, H, W) at noise `clean_sigma`
        (default 0), placed before x with the *same* positions; only the noisy half is returned. pos: time
        positions (F,), default 0..F-1.
        """
        B, Fr = x.shape[:2]
        assert tokens.dim() == 2 or tokens.shape[:2] == (B, Fr), f"tokens {tuple(tokens.shape)} for {B} x {Fr} frames"
        pos = torch.arange(Fr, device=x.device) if pos is None else pos
        captions = None
        if tokens.dim() == 3:   # a caption per frame: each distinct one encoded once (a clip has one or two)
            tokens, captions = torch.unique(tokens.flatten(0, 1), dim=0, return_inverse=True)
            captions = captions.view(B, Fr)   # the row of ctx each frame reads
        ctx, ctx_mask = self.text(tokens)
        if layout == "teacher_forcing":
            assert clean is not None and clean.shape == x.shape, "teacher forcing needs a clean history like x"
            clean_sigma = torch.zeros_like(sigma) if clean_sigma is None else clean_sigma
            x, sigma, pos = torch.cat([clean, x], 1), torch.cat([clean_sigma, sigma], 1), torch.cat([pos, pos])
            if captions is not None:   # a history frame reads its own frame's caption, as its noisy twin does
                captions = torch.cat([captions, captions], 1)
        else:
            assert clean is None, f"`clean` is only used by teacher_forcing, not {layout}"
        h, t, e = self._embed(x, sigma)
        rot = rope(self.cfg, pos)
        c = self.cfg
        mask = layout_mask(layout, Fr, c.chunk, c.tokens_per_frame, x.device, window, c.topk, c.route_sink)
        for block in self.blocks:
            h, _ = block(h, e, ctx, ctx_mask, rot, rot, mask, captions=captions)
        out = self._head(h, t)
        return out[:, Fr:] if layout == "teacher_forcing" else out

    # -- streaming -----------------------------------------------------------------------------------------
    def forward_cached(self, x, sigma, tokens, cache, prompt=None):
        """One call of the streaming model: x (B, n, C, H, W) frames of the current chunk (or window) attend,
        unmasked, to the cached frames plus themselves. Positions come from the cache's policy.

        Returns v and this call's keys/values (one pre-RoPE (k, v) per layer). The cache is only read here: the
        caller writes a call's keys/values (rollout.recache, with the finished x0 at sigma 0), never the noisy
        keys of a denoising step. prompt: self.text(tokens), computed once by a caller that makes many calls.
        """
        n = x.shape[1]
        assert tokens.dim() == 2, "a streamed call runs one prompt (B, T); a switch starts a new call"
        ctx, ctx_mask = self.text(tokens) if prompt is None else prompt
        h, t, e = self._embed(x, sigma)
        cache_pos, query_pos = cache.positions(n)
        rot_q = rope(self.cfg, query_pos.to(x.device))
        rot_k = rope(self.cfg, torch.cat([cache_pos, query_pos]).to(x.device))
        mask = stream_mask(cache.frames, n, self.cfg.tokens_per_frame, self.cfg.topk, self.cfg.route_sink)
        new_kv = []
        for i, block in enumerate(self.blocks):
            h, kv = block(h, e, ctx, ctx_mask, rot_q, rot_k, mask, cache.kv(i))
            new_kv.append(kv)
        return self._head(h, t), new_kv


def pick_device(name: str | None) -> torch.device:
    """--device: None picks CUDA when there is one, else the CPU. Raises ValueError for anything unusable."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r} is not a device this code runs on (cpu, cuda, cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for, but this machine has no CUDA GPU (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def forward_flops(cfg: DiTConfig, query_frames: int, key_frames: int) -> float:
    """Multiply-add FLOPs (x2) of one forward of `query_frames` frames attending to `key_frames` frames
    (themselves included). Linear layers and attention; the small prompt encoder is left out."""
    D, L, T = cfg.dim, cfg.tokens_per_frame, cfg.text_len + 1
    Nq, Nk = query_frames * L, key_frames * L
    per_layer = (2 * Nq * (4 * D * D + 2 * D * D + 2 * D * cfg.ffn)   # qkv + out, cross q + out, mlp
                 + 2 * T * 2 * D * D                                   # cross k, v of the prompt
                 + 4 * Nq * Nk * D + 4 * Nq * T * D)                   # self- and cross-attention
    io = 2 * Nq * cfg.channels * cfg.patch ** 2 * D * 2                 # patch embedding and head
    return cfg.depth * per_layer + io


def stream_flops_per_frame(cfg: DiTConfig, steps: int, cached_frames: int) -> float:
    """FLOPs per streamed frame: `steps` denoising calls plus the clean re-cache call per chunk."""
    return (steps + 1) * forward_flops(cfg, cfg.chunk, cached_frames + cfg.chunk) / cfg.chunk


if __name__ == "__main__":
    for name in ("tiny", "cpu", "small", "wan"):
        cfg = DiTConfig.preset(name)
        with torch.device("meta"):
            n = sum(p.numel() for p in DiT(cfg).parameters())
        cached = cfg.frames - cfg.chunk   # a bounded cache that fills the trained range
        print(f"{name:6s} params {n / 1e6:8.2f} M | tokens/frame {cfg.tokens_per_frame:5d} | chunk {cfg.chunk} | "
              f"trained positions 0..{cfg.frames - 1} | GFLOPs per streamed frame (4 steps + re-cache, "
              f"{cached} cached frames) {stream_flops_per_frame(cfg, 4, cached) / 1e9:9.2f}")
