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

The model asks this file for its masks (`layout_mask` for a training layout, `stream_mask` for a streaming call)
and attends through `attention`, whatever the mask turned out to be.

On CPU the table becomes a dense boolean token mask for SDPA. On CUDA, training uses FlexAttention with a
BlockMask built from the same table (dense masks are quadratic in memory; FlexAttention also skips blocks
that are fully masked). FlexAttention has no CPU backward in torch 2.13, hence the split.
"""

import contextlib
from dataclasses import dataclass

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


# ----------------------------------------------------------------------------------------------------------
# top-k history routing (Resampling Forcing §4.2.3, after Mixture of Contexts and MoBA)
#
# A query token does not attend to all of its history: it attends to its own chunk, to any sink frames, and
# to the k history frames it scores highest by q . mean(K of the frame). Routing has no parameters and no
# gradient; it only decides which keys the softmax sees. A frame table says, per (query frame, key frame),
# what routing may do: NEVER (masked by the layout), ALWAYS (own chunk, sinks) or CANDIDATE (history, routed).
# (table > 0) is the layout's mask, so top-k covering every candidate is exactly the dense layout.
# kernels/routed_attention.py computes the same attention without touching the frames a query skipped.

NEVER, ALWAYS, CANDIDATE = 0, 1, 2


def routing_table(layout: str, frames: int, chunk: int, sink: int = 0) -> torch.Tensor:
    """int8 (Fq, Fk) frame table of a training layout; (table > 0) == frame_mask(layout, frames, chunk).

    block_causal: own chunk ALWAYS, earlier chunks CANDIDATE. teacher_forcing (the 2F sequence
    [clean | noisy]): a clean frame as block_causal over the clean half; a noisy frame of chunk c has the
    clean chunks before c as CANDIDATE and its own noisy chunk ALWAYS. History frames with index < sink
    (of the clean half) are ALWAYS instead of CANDIDATE: the attention sink is never routed away.
    """
    assert layout in ("block_causal", "teacher_forcing"), f"routing needs a causal layout, not {layout!r}"
    assert frames % chunk == 0, f"frames ({frames}) must be a whole number of chunks ({chunk})"
    f = torch.arange(frames)
    c = f // chunk
    same = c[:, None] == c[None, :]
    before = c[None, :] < c[:, None]
    history = torch.where(before, torch.where(f[None, :] < sink, ALWAYS, CANDIDATE), NEVER)
    causal = torch.where(same, ALWAYS, history)
    if layout == "block_causal":
        return causal.to(torch.int8)
    top = torch.cat([causal, torch.zeros_like(causal)], dim=1)               # clean never sees noisy
    bottom = torch.cat([history, torch.where(same, ALWAYS, NEVER)], dim=1)   # noisy: clean history, own chunk
    return torch.cat([top, bottom], dim=0).to(torch.int8)


def cache_table(cached: int, sink: int, query: int) -> torch.Tensor:
    """int8 (query, cached + query) frame table of a streaming call, keys = [cached frames | query chunk].

    The first `sink` cached frames are ALWAYS, the other cached frames CANDIDATE, the query chunk ALWAYS.
    """
    assert 0 <= sink <= cached and query > 0, (cached, sink, query)
    row = torch.full((cached + query,), CANDIDATE, dtype=torch.int8)
    row[:sink] = ALWAYS
    row[cached:] = ALWAYS
    return row.expand(query, -1).clone()


@contextlib.contextmanager
def exact_fp32(device):
    """Matmuls in full fp32: autocast off and, on CUDA, TF32 off (restored on exit)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


@torch.no_grad()
def route(q: torch.Tensor, k: torch.Tensor, table: torch.Tensor, L: int, topk: int) -> torch.Tensor:
    """Pick, for every query token and head, its top-k candidate history frames.

    q (B, H, Nq, hd), k (B, H, Nk, hd): exactly the tensors given to the attention, so *after* RoPE. By
    linearity q . mean(K_f) = mean_j (q . k_j): the score is the mean pre-softmax logit the query would give
    frame f, relative position included, i.e. what attention itself would see. (Pre-RoPE keys would score
    content alone and could be cached per frame; we prefer the score that matches the attention and
    recompute the means, an O(Nk hd) pass, on every call, so the KV cache stores no per-frame descriptor.)

    score[b, h, t, j] = q[b, h, t] . mean over the L tokens of key frame j of k[b, h], in fp32, for the
    CANDIDATE frames of t's frame only. Returns sel int32 (B, H, Nq, topk): the chosen frame indices, best
    first; -1 pads a query with fewer than topk candidates. Equal scores prefer the more recent (higher
    index) frame. Deterministic (a stable sort), and without gradient: selection is a discrete choice.
    The scores are exact fp32 whatever the caller runs under: autocast would compute the matmul in bf16 and
    TF32 would round its inputs, and either changes which frames near-identical frames lose to.
    """
    B, H, Nq, hd = q.shape
    Fq, Fk = table.shape
    assert Nq == Fq * L and k.shape[2] == Fk * L, f"q/k tokens ({Nq}, {k.shape[2]}) != table {Fq}x{Fk} * L={L}"
    with exact_fp32(q.device):
        kbar = k.float().unflatten(2, (Fk, L)).mean(3)                    # (B, H, Fk, hd) mean key per frame
        score = q.float() @ kbar.transpose(-1, -2)                        # (B, H, Nq, Fk)
    cand = (table.to(q.device) == CANDIDATE).repeat_interleave(L, dim=0)  # (Nq, Fk)
    score = score.masked_fill(~cand, float("-inf"))
    # a stable sort keeps equal scores in input order; sorting the reversed frame axis puts the recent first
    best, idx = score.flip(-1).sort(dim=-1, descending=True, stable=True)
    best, idx = best[..., :topk], Fk - 1 - idx[..., :topk]
    sel = torch.where(best > float("-inf"), idx, -1).to(torch.int32)      # non-candidates are never chosen
    return F.pad(sel, (0, topk - sel.shape[-1]), value=-1)                # topk > Fk: pad the rest


def routed_mask(table: torch.Tensor, sel: torch.Tensor, L: int) -> torch.Tensor:
    """Bool (B, H, Nq, Nk) token mask: the ALWAYS frames of each query's row plus the frames in `sel`."""
    B, H, Nq, _ = sel.shape
    Fk = table.shape[1]
    picked = torch.zeros(B, H, Nq, Fk + 1, dtype=torch.bool, device=sel.device)
    picked.scatter_(-1, torch.where(sel < 0, Fk, sel).long(), True)       # -1 lands in a spare column
    frames = picked[..., :Fk] | (table.to(sel.device) == ALWAYS).repeat_interleave(L, dim=0)  # (B, H, Nq, Fk)
    return frames.repeat_interleave(L, dim=-1)                            # (B, H, Nq, Nk)


def routed_attend(q, k, v, table: torch.Tensor, L: int, topk: int, kernel=None) -> torch.Tensor:
    """Attention with top-k history routing. q (B, H, Nq, hd), k/v (B, H, Nk, hd), table (Fq, Fk) int8.

    topk <= 0 routes nothing: every candidate frame is attended (the dense layout (table > 0)).
    kernel: None = the Triton kernel on CUDA, the reference (SDPA with routed_mask) elsewhere; True forces
    the kernel (on CPU only under TRITON_INTERPRET=1); False forces the reference.
    """
    kernel = q.is_cuda if kernel is None else kernel
    if topk <= 0:
        if not kernel:
            return attend(q, k, v, token_mask(table > 0, L).to(q.device))
        table = (table > 0).to(torch.int8)                                # every visible frame ALWAYS
        sel = torch.empty(*q.shape[:3], 0, dtype=torch.int32, device=q.device)
    else:
        sel = route(q, k, table, L, topk)
        if not kernel:
            return attend(q, k, v, routed_mask(table, sel, L))
    from kernels.routed_attention import routed_attention                # triton is imported only when used

    return routed_attention(q, k, v, table, sel, L)


# ----------------------------------------------------------------------------------------------------------
# what the model calls: the mask of a layout or a streaming call, and one attention for every kind of mask

@dataclass
class Routing:
    """Attend with top-k history routing (routed_attend) instead of a fixed mask."""
    table: torch.Tensor   # int8 (Fq, Fk) frame table: never / always / candidate
    L: int                # tokens per frame
    topk: int


_MASKS = {}   # (layout, frames, chunk, window, L, device) -> mask: built once per shape


def layout_mask(layout: str, frames: int, chunk: int, L: int, device, window: int | None = None, topk: int = 0,
                route_sink: int = 0):
    """The mask of a training layout: None (bidirectional), top-k Routing, or the table of frame_mask as a
    dense token mask (CPU) or a FlexAttention BlockMask (CUDA)."""
    if layout == "bidirectional":
        return None
    if topk > 0:
        assert window is None, "history routing replaces the window; use one or the other"
        return Routing(routing_table(layout, frames, chunk, route_sink), L, topk)
    key = (layout, frames, chunk, window, L, str(device))
    if key not in _MASKS:
        table = frame_mask(layout, frames, chunk, window)
        _MASKS[key] = block_mask(table, L, device) if device.type == "cuda" else token_mask(table, L).to(device)
    return _MASKS[key]


def stream_mask(cached: list[int], query: int, L: int, topk: int = 0, route_sink: int = 0):
    """The mask of a streaming call: `query` frames attend to the cached frames (absolute indices `cached`) and
    themselves. None (all of it) unless routing picks among the history; the cached frames with absolute index
    < route_sink are then always attended, the same rule as routing_table's."""
    if topk <= 0 or not cached:
        return None
    sinks = sum(f < route_sink for f in cached)
    return Routing(cache_table(len(cached), sinks, query), L, topk)   # on the host: the kernel plans from it


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
    """q (B, H, Nq, hd), k/v (B, H, Nk, hd) -> (B, H, Nq, hd) under any mask of this file."""
    if isinstance(mask, Routing):
        return routed_attend(q, k, v, mask.table, mask.L, mask.topk)
    return attend(q, k, v, mask)
