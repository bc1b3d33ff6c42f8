"""
Attention masks for the three training layouts, and the one attention call the model uses.

A video is a sequence of frames grouped into chunks (the autoregressive unit). Every mask here is decided
at the level of frames and only then expanded to tokens, so one small boolean table per layout is the
single source of truth for both backends:

  bidirectional    every frame sees every frame (the clip model DMD uses as its score)
  block_causal     a frame sees its own chunk and every earlier chunk (Diffusion Forcing; the streaming
                   model). With `window=W`, history is limited to the W frames just before the chunk,
                   which is what a rolling KV cache of W frames sees at inference.
  teacher_forcing  the 2F sequence [clean history | noisy frames] (CausVid / Self Forcing's teacher
                   forcing mask): a clean frame sees clean chunks up to its own (block-causal); a noisy
                   frame in chunk c sees clean chunks strictly before c plus the noisy frames of chunk c.

On CPU the table becomes a dense boolean token mask for SDPA. On CUDA, training uses FlexAttention with a
BlockMask built from the same table (dense masks are quadratic in memory; FlexAttention also skips blocks
that are fully masked). FlexAttention has no CPU backward in torch 2.13, hence the split.
"""

import torch
import torch.nn.functional as F

LAYOUTS = ("bidirectional", "block_causal", "teacher_forcing")


def frame_mask(layout: str, frames: int, chunk: int, window: int | None = None) -> torch.Tensor:
    """Boolean (Fq, Fk) table: may query frame i attend to key frame j? F = frames of the clip.

    For teacher_forcing the table is (2F, 2F) over [clean 0..F-1 | noisy 0..F-1].
    """
    assert layout in LAYOUTS, f"unknown layout {layout!r}"
    assert frames % chunk == 0, f"frames ({frames}) must be a whole number of chunks ({chunk})"
    if layout == "bidirectional":
        assert window is None, "a window only makes sense for causal layouts"
        return torch.ones(frames, frames, dtype=torch.bool)
    f = torch.arange(frames)
    c = f // chunk
    same = c[:, None] == c[None, :]
    before = c[None, :] < c[:, None]                        # key chunk strictly before query chunk
    if window is not None:                                  # history limited to the last `window` frames
        before &= f[None, :] >= (c[:, None] * chunk - window)
    causal = same | before
    if layout == "block_causal":
        return causal
    # teacher_forcing: quadrants [[clean->clean, clean->noisy], [noisy->clean, noisy->noisy]]
    no = torch.zeros(frames, frames, dtype=torch.bool)
    top = torch.cat([causal, no], dim=1)                    # clean frames never see noisy ones
    bottom = torch.cat([before, same], dim=1)               # noisy: clean history before, own noisy chunk
    return torch.cat([top, bottom], dim=0)


def token_mask(table: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """Expand a frame table to a dense (Nq, Nk) token mask for SDPA."""
    L = tokens_per_frame
    return table.repeat_interleave(L, dim=0).repeat_interleave(L, dim=1)


_flex = None


def block_mask(table: torch.Tensor, tokens_per_frame: int, device):
    """FlexAttention BlockMask equivalent to token_mask(table, L), without building the dense mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    table = table.to(device)
    L = tokens_per_frame

    def mask_mod(b, h, q_idx, kv_idx):
        return table[q_idx // L, kv_idx // L]

    Nq, Nk = table.shape[0] * L, table.shape[1] * L
    return create_block_mask(mask_mod, None, None, Nq, Nk, device=device)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
    """Softmax attention. q (B, H, Nq, hd), k/v (B, H, Nk, hd) -> (B, H, Nq, hd).

    mask: None (attend to everything), a boolean (Nq, Nk) tensor (True = may attend), or a FlexAttention
    BlockMask. Every mask built in this file keeps each query's own frame, so no row is ever empty.
    """
    if mask is None or isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    global _flex
    if _flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        # compiled on GPU (the eager path materialises the scores); eager elsewhere (CPU forward tests)
        _flex = torch.compile(flex_attention, dynamic=False) if q.is_cuda else flex_attention
    return _flex(q, k, v, block_mask=mask)
