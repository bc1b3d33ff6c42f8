"""
Routed attention in Triton: the sparse softmax behind top-k history routing, forward and backward.

Resampling Forcing (Guo et al. 2025, §4.2.3) lets each query token attend to its own chunk, the sink frames
and only the k history frames whose mean key it scores highest: the router of Mixture of Contexts, itself
MoBA's router applied to video frames. attention.py decides the frames (`route`) and holds the reference, a
dense boolean mask for SDPA. This file computes the same attention but never reads a frame no query of a
tile selected, so its cost follows the k frames, not the history length.

Routing is per token, but tensor cores want tiles of 64-128 queries that share their keys. The trick
(notes/topk-kernel.md §4, "design A"; the query sorting of MoBA and Sparse VideoGen 2, the index lists of
FastVideo's VSA kernel):

  1. Plan (torch, O(Nq F) work). Per (batch, head), sort the query rows of each group (consecutive query
     frames with identical table rows) by what they selected, so neighbours tend to share frames, and cut
     the sorted rows into tiles of BLOCK_M, padding each group to whole tiles. A tile's frame list is its
     ALWAYS frames first, then the union of its rows' selections. A frame every row of the tile chose is
     FULL; one only some rows chose is MASKED, and the other rows see -inf there. The backward also gets
     the inverse: for each key frame, the tiles that visit it.
  2. Forward: one program per query tile, FlashAttention-2's online softmax over its frames, BLOCK_N keys
     at a time. A frame need not be a multiple of BLOCK_N: its last block is cut to the frame (tail mask).
  3. Backward without atomics, hence bitwise deterministic: dQ by the same query-tile programs; dK/dV by one
     program per block of keys, which owns its rows of dK and dV and loops over the tiles that visit its
     frame in a fixed order.

The queries are permuted only in the bookkeeping: programs gather their rows from q and scatter to o, so
with the same `sel` the kernel equals the reference up to float rounding.

Numerics (the pitfalls of notes/topk-kernel.md §5): logits are dot(q, k) in fp32 and scaled in fp32 after
the dot, identically in forward and backward (P3); a row that sees no key gets 0, never NaN (P5); the
log-sum-exp saved for the backward is in base 2 and stays inside this file (P15); fp32 inputs use IEEE dots
on the GPU, not TF32 (P2); bf16 is GPU only, since Triton's interpreter gets bf16 dots wrong (P1).
"""

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634   # exp(x) = exp2(x * log2(e)): the kernels use exp2, the GPU's native exponential


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _blocks(dtype: torch.dtype) -> dict:
    """Tile sizes and launch options. BLOCK_M: query rows per tile (forward, dQ); BLOCK_N*: keys per step;
    BLOCK_M_DKV: query rows per step of the dK/dV loop. The GPU values were checked offline for sm_90
    (cross-compiled: tensor-core wgmma, pipelined loops, no register spills inside loops, head dims 64 and
    128); their speed is for kernels/bench.py to confirm or tune on the target GPU."""
    if _interpreting():   # programs run one by one in numpy: small tiles are fast and exercise every tail
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_N_DQ=32, BLOCK_N_DKV=32, BLOCK_M_DKV=16, warps=1, stages=1)
    if dtype == torch.float32:   # IEEE fp32 dots run on FMA units, not tensor cores: small tiles, no spills
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_N_DQ=32, BLOCK_N_DKV=32, BLOCK_M_DKV=16, warps=4, stages=2)
    return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_N_DQ=32, BLOCK_N_DKV=64, BLOCK_M_DKV=64, warps=8, stages=3)


# ----------------------------------------------------------------------------------------------------------
# the plan: which key frames each tile of queries visits

class Plan(NamedTuple):
    perm: torch.Tensor         # int32 (B, H, T*BLOCK_M): query row in each tile slot, -1 = padding
    tile_list: torch.Tensor    # int32 (B, H, T, Fk): 2*frame + masked, ALWAYS frames first
    tile_count: torch.Tensor   # int32 (B, H, T): entries used in tile_list
    frame_list: torch.Tensor   # int32 (B, H, Fk, T): 2*tile + masked, the tiles that visit each key frame
    frame_count: torch.Tensor  # int32 (B, H, Fk)
    block_m: int


def make_plan(table: torch.Tensor, sel: torch.Tensor, L: int, block_m: int) -> Plan:
    """Sort and tile the queries, list each tile's frames and each frame's tiles. Stable sorts only: the
    plan, and with it the order of every accumulation, is a function of (table, sel)."""
    B, H, Nq, K = sel.shape
    Fq, Fk = table.shape
    dev = sel.device
    tab = table.cpu()
    # groups: runs of query frames with the same table row, so a tile never mixes two ALWAYS sets
    new_group = torch.ones(Fq, dtype=torch.bool)
    new_group[1:] = (tab[1:] != tab[:-1]).any(1)
    group_of_frame = new_group.long().cumsum(0) - 1                           # (Fq,)
    G = int(group_of_frame[-1]) + 1
    rows_per_group = torch.bincount(group_of_frame, minlength=G) * L         # (G,)
    tiles_per_group = (rows_per_group + block_m - 1) // block_m
    T = int(tiles_per_group.sum())
    first_row = rows_per_group.cumsum(0) - rows_per_group
    first_slot = (tiles_per_group.cumsum(0) - tiles_per_group) * block_m
    group_of_row = group_of_frame.repeat_interleave(L)                       # (Nq,)
    # sorted position i stays in its row's group (groups are contiguous and lead the key): its slot is
    # the group's first slot plus its rank inside the group
    slot = (torch.arange(Nq) - first_row[group_of_row] + first_slot[group_of_row]).to(dev)

    # sort key: the group, then the chosen frames (most recent first) as the digits of a base-(Fk + 1) number,
    # so rows that chose the same set are adjacent, and sets sharing their most recent frames are near. Any
    # order is correct; only speed depends on it, so a large topk keeps just the digits that fit in int64.
    digits = 0
    while digits < K and G * (Fk + 1) ** (digits + 1) < 2 ** 62:
        digits += 1
    chosen = sel.sort(dim=-1, descending=True).values.long() + 1             # (B, H, Nq, K), 0 = none
    key = group_of_row.to(dev).expand(B, H, Nq)
    for j in range(digits):
        key = key * (Fk + 1) + chosen[..., j]
    order = key.argsort(dim=-1, stable=True)                                 # (B, H, Nq)
    perm = torch.full((B, H, T * block_m), -1, dtype=torch.int32, device=dev)
    perm[..., slot] = order.to(torch.int32)

    # per tile: frames any row chose (union) and frames every real row chose (shared)
    real = perm >= 0                                                         # (B, H, T*BM)
    sel_p = sel.gather(2, perm.clamp(min=0).long()[..., None].expand(-1, -1, -1, K))
    sel_p = torch.where(real[..., None], sel_p, -1)                          # (B, H, T*BM, K)
    hits = torch.zeros(B, H, T * block_m, Fk + 1, dtype=torch.bool, device=dev)
    hits.scatter_(-1, torch.where(sel_p < 0, Fk, sel_p).long(), True)        # -1 lands in a spare column
    hits = hits[..., :Fk].view(B, H, T, block_m, Fk)
    union = hits.any(3)                                                      # (B, H, T, Fk)
    shared = (hits | ~real.view(B, H, T, block_m, 1)).all(3)
    group_of_tile = torch.repeat_interleave(torch.arange(G), tiles_per_group)
    first_frame = torch.nonzero(new_group).flatten()                         # (G,)
    always = (tab[first_frame][group_of_tile] == 1).to(dev)                  # (T, Fk)
    # 0 = skipped, 1 = FULL, 2 = MASKED
    kind = torch.where(always, 1, torch.where(union, torch.where(shared, 1, 2), 0))   # (B, H, T, Fk)

    # tile lists, ALWAYS frames first: every real row then has a finite running max before any MASKED frame
    rank = torch.where(always, 0, torch.where(kind > 0, 1, 2))
    frames = rank.argsort(dim=-1, stable=True)                               # (B, H, T, Fk)
    tile_list = frames * 2 + (kind.gather(-1, frames) == 2)
    tile_count = (kind > 0).sum(-1)
    # inverse lists, in tile order
    kind_t = kind.transpose(2, 3)                                            # (B, H, Fk, T)
    tiles = (kind_t == 0).to(torch.int8).argsort(dim=-1, stable=True)
    frame_list = tiles * 2 + (kind_t.gather(-1, tiles) == 2)
    frame_count = (kind_t > 0).sum(-1)
    i32 = dict(dtype=torch.int32)
    return Plan(perm, tile_list.to(**i32).contiguous(), tile_count.to(**i32).contiguous(),
                frame_list.to(**i32).contiguous(), frame_count.to(**i32).contiguous(), block_m)


# ----------------------------------------------------------------------------------------------------------
# kernels
#
# Addressing: (batch, head) and frame offsets go into scalar base pointers in int64; offsets inside one
# head's tokens stay int32 (checked by the wrapper). Per-element int64 offsets cost registers the
# compiler then spills (seen on sm_90: hundreds of bytes of stack for the same kernel).

@triton.jit
def _rows(PERM, SEL, bh, slot, n_slots, Nq, TOPK, BLOCK: tl.constexpr, TOPK_P2: tl.constexpr):
    """Query rows in plan slots [slot, slot + BLOCK) of head bh: (row ids, real-row mask, their selections)."""
    perm = tl.load(PERM + bh.to(tl.int64) * n_slots + slot + tl.arange(0, BLOCK))
    real = perm >= 0                                         # padding slots hold -1
    rows = tl.where(real, perm, 0)
    kk = tl.arange(0, TOPK_P2)
    sel = tl.load(SEL + bh.to(tl.int64) * Nq * TOPK + rows[:, None] * TOPK + kk[None, :],
                  mask=real[:, None] & (kk < TOPK)[None, :], other=-1)
    return rows, real, sel


@triton.jit
def _chose(sel, f):
    """Did each row (of a (rows, TOPK_P2) selection block) choose frame f? (A sum, not a max: with a max
    here Triton 3.9 stops software-pipelining the dK/dV loop.)"""
    return tl.sum(tl.where(sel == f, 1, 0), axis=1) > 0


@triton.jit
def _load_kv(k_ptr, v_ptr, cols, skn, svn, inside, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    """Keys and values at token offsets `cols` of a frame; past its end (a tail block) they read as 0."""
    offs_d = tl.arange(0, HEAD_DIM)
    k_ptrs = k_ptr + cols[:, None] * skn + offs_d[None, :]
    v_ptrs = v_ptr + cols[:, None] * svn + offs_d[None, :]
    if MASKED:
        return tl.load(k_ptrs, mask=inside[:, None], other=0.0), tl.load(v_ptrs, mask=inside[:, None], other=0.0)
    return tl.load(k_ptrs), tl.load(v_ptrs)   # whole blocks: unmasked loads, which vectorise best


@triton.jit
def _split(code, sel, real, L, BLOCK_N: tl.constexpr):
    """A frame-list entry -> (frame, rows that see it, where its masked blocks start).

    A FULL frame runs its whole blocks unmasked and only its tail block masked; a MASKED frame runs all of
    its blocks masked. So each loop below exists in two copies (unmasked, masked) instead of four:
    every inlined copy of a pipelined loop costs registers."""
    f = code // 2
    masked = code % 2 == 1
    chose = tl.where(masked, _chose(sel, f), real)
    split = tl.where(masked, 0, (L // BLOCK_N) * BLOCK_N)
    return f, chose, split


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, k_ptr, v_ptr, skn, svn, lo, hi, L, chose, qk_scale,
                BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax over the keys [lo, hi) of one frame (k_ptr/v_ptr point at its first token). MASKED:
    keys past L and rows not in `chose` get -inf."""
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        inside = cols < L
        k, v = _load_kv(k_ptr, v_ptr, cols, skn, svn, inside, HEAD_DIM, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale   # (BLOCK_M, BLOCK_N), base-2 logits
        if MASKED:
            s = tl.where(chose[:, None] & inside[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)   # a row that has seen no key yet: avoid -inf - -inf
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


# Forward. grid = (T tiles, B*H); tiles of one head are adjacent in launch order, so that head's K/V stays
# in L2. A program owns BLOCK_M query rows (gathered through the plan), walks its frame list and writes
# those rows of O and of LSE2 (base-2 log-sum-exp of the scaled logits, for the backward).
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE2, SEL, PERM, TILE_LIST, TILE_COUNT,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                H, Nq, Fk, L, n_tiles, TOPK, qk_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, TOPK_P2: tl.constexpr,
                DOT_PREC: tl.constexpr):
    tile, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    rows, real, sel = _rows(PERM, SEL, bh, tile * BLOCK_M, n_tiles * BLOCK_M, Nq, TOPK, BLOCK_M, TOPK_P2)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :], mask=real[:, None], other=0.0)
    k_head, v_head = K + b * skb + h * skh, V + b * svb + h * svh

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    entries = TILE_LIST + (bh.to(tl.int64) * n_tiles + tile) * Fk
    for e in range(tl.load(TILE_COUNT + bh * n_tiles + tile)):   # ALWAYS frames come first in the list
        f, chose, split = _split(tl.load(entries + e), sel, real, L, BLOCK_N)
        k_ptr, v_ptr = k_head + (f * L).to(tl.int64) * skn, v_head + (f * L).to(tl.int64) * svn
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_ptr, v_ptr, skn, svn, 0, split, L, chose, qk_scale,
                                    BLOCK_N, HEAD_DIM, False, DOT_PREC)
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_ptr, v_ptr, skn, svn, split, L, L, chose, qk_scale,
                                    BLOCK_N, HEAD_DIM, True, DOT_PREC)

    # a row that saw no key (impossible with attention.py's tables, guarded anyway) outputs 0 and stores
    # LSE2 = +inf, which makes every probability the backward recomputes for it exactly 0
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    o = acc / l_safe[:, None]
    tl.store(O + b * sob + h * soh + rows[:, None] * son + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=real[:, None])
    tl.store(LSE2 + bh.to(tl.int64) * Nq + rows, tl.where(seen, m_i + tl.math.log2(l_safe), float("inf")),
             mask=real)


@triton.jit
def _dq_blocks(dq, q, do, lse2, delta, k_ptr, v_ptr, skn, svn, lo, hi, L, chose, qk_scale,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    """dQ contributions of keys [lo, hi) of one frame: dq += (p * (dp - delta)) @ k."""
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        inside = cols < L
        k, v = _load_kv(k_ptr, v_ptr, cols, skn, svn, inside, HEAD_DIM, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale   # as in the forward, bit for bit
        if MASKED:
            s = tl.where(chose[:, None] & inside[None, :], s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])                  # the forward's probabilities, recomputed
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


# dQ. grid = (T tiles, B*H), as the forward: a program owns BLOCK_M query rows and their rows of dQ,
# accumulated in registers over its frame list in list order, so the sum order is fixed.
@triton.jit
def _dq_kernel(Q, K, V, DO, DQ, LSE2, DELTA, SEL, PERM, TILE_LIST, TILE_COUNT,
               sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn,
               H, Nq, Fk, L, n_tiles, TOPK, qk_scale, sm_scale,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, TOPK_P2: tl.constexpr,
               DOT_PREC: tl.constexpr):
    tile, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    rows, real, sel = _rows(PERM, SEL, bh, tile * BLOCK_M, n_tiles * BLOCK_M, Nq, TOPK, BLOCK_M, TOPK_P2)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :], mask=real[:, None], other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdn + offs_d[None, :], mask=real[:, None], other=0.0)
    lse2 = tl.load(LSE2 + bh.to(tl.int64) * Nq + rows, mask=real, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * Nq + rows, mask=real, other=0.0)
    k_head, v_head = K + b * skb + h * skh, V + b * svb + h * svh

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    entries = TILE_LIST + (bh.to(tl.int64) * n_tiles + tile) * Fk
    for e in range(tl.load(TILE_COUNT + bh * n_tiles + tile)):
        f, chose, split = _split(tl.load(entries + e), sel, real, L, BLOCK_N)
        k_ptr, v_ptr = k_head + (f * L).to(tl.int64) * skn, v_head + (f * L).to(tl.int64) * svn
        dq = _dq_blocks(dq, q, do, lse2, delta, k_ptr, v_ptr, skn, svn, 0, split, L, chose, qk_scale,
                        BLOCK_N, HEAD_DIM, False, DOT_PREC)
        dq = _dq_blocks(dq, q, do, lse2, delta, k_ptr, v_ptr, skn, svn, split, L, L, chose, qk_scale,
                        BLOCK_N, HEAD_DIM, True, DOT_PREC)
    tl.store(DQ + b * sgb + h * sgh + rows[:, None] * sgn + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=real[:, None])


# dK/dV. grid = (Fk * cdiv(L, BLOCK_N), B*H): a program owns BLOCK_N keys of one frame (the frame's last
# block may be shorter) and their rows of dK and dV. It loops over the inverse list of query tiles that
# visit the frame, BLOCK_MS rows at a time, in list order. Each dK/dV row is written once, by its owner,
# after a fixed-order sum: no atomics, so two backward runs agree bit for bit. Frames no tile visits get
# zeros. One loop body serves FULL and MASKED visits (for FULL, `chose` = the real rows), and a tail block
# needs no mask: its missing keys load as 0 and only feed rows of dK/dV that are never stored.
@triton.jit
def _dkdv_kernel(Q, K, V, DO, DK, DV, LSE2, DELTA, SEL, PERM, FRAME_LIST, FRAME_COUNT,
                 sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
                 skgb, skgh, skgn, svgb, svgh, svgn,
                 H, Nq, Fk, L, n_tiles, TOPK, qk_scale, sm_scale,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_MS: tl.constexpr, HEAD_DIM: tl.constexpr,
                 TOPK_P2: tl.constexpr, DOT_PREC: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    blocks_per_frame = tl.cdiv(L, BLOCK_N)
    f = pid // blocks_per_frame
    cols = (pid % blocks_per_frame) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = cols < L
    keys = f * L + cols
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(K + b * skb + h * skh + keys[:, None] * skn + offs_d[None, :], mask=inside[:, None], other=0.0)
    v = tl.load(V + b * svb + h * svh + keys[:, None] * svn + offs_d[None, :], mask=inside[:, None], other=0.0)
    q_head, do_head = Q + b * sqb + h * sqh, DO + b * sdb + h * sdh
    lse_head, delta_head = LSE2 + bh.to(tl.int64) * Nq, DELTA + bh.to(tl.int64) * Nq

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    PARTS: tl.constexpr = BLOCK_M // BLOCK_MS
    entries = FRAME_LIST + (bh.to(tl.int64) * Fk + f) * n_tiles
    for i in range(tl.load(FRAME_COUNT + bh * Fk + f) * PARTS):   # (visiting tile, part of it)
        code = tl.load(entries + i // PARTS)
        rows, real, sel = _rows(PERM, SEL, bh, (code // 2) * BLOCK_M + (i % PARTS) * BLOCK_MS,
                                n_tiles * BLOCK_M, Nq, TOPK, BLOCK_MS, TOPK_P2)
        chose = tl.where(code % 2 == 1, _chose(sel, f), real)
        q = tl.load(q_head + rows[:, None] * sqn + offs_d[None, :], mask=real[:, None], other=0.0)
        do = tl.load(do_head + rows[:, None] * sdn + offs_d[None, :], mask=real[:, None], other=0.0)
        lse2 = tl.load(lse_head + rows, mask=real, other=float("inf"))   # padding rows: p = 0
        delta = tl.load(delta_head + rows, mask=real, other=0.0)
        # transposed, keys on the rows: s_t = (q k^T)^T, computed in fp32 and scaled after the dot (P3)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale   # (BLOCK_N, BLOCK_MS)
        p_t = tl.math.exp2(tl.where(chose[None, :], s_t, float("-inf")) - lse2[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    tl.store(DK + b * skgb + h * skgh + keys[:, None] * skgn + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=inside[:, None])
    tl.store(DV + b * svgb + h * svgh + keys[:, None] * svgn + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=inside[:, None])


# ----------------------------------------------------------------------------------------------------------
# launchers and the autograd wrapper

def _strides(x):
    return x.stride(0), x.stride(1), x.stride(2)


def _launch_forward(q, k, v, sel, plan, L, scale, cfg):
    """Returns o (B, H, Nq, hd) in q's dtype and lse2 (B, H, Nq) fp32, base 2 of the log2(e)-scaled logits."""
    B, H, Nq, D = q.shape
    K, Fk, T = sel.shape[-1], plan.tile_list.shape[-1], plan.tile_count.shape[-1]
    o = torch.empty(B, H, Nq, D, dtype=q.dtype, device=q.device)
    lse2 = torch.empty(B, H, Nq, dtype=torch.float32, device=q.device)
    _fwd_kernel[(T, B * H)](
        q, k, v, o, lse2, sel, plan.perm, plan.tile_list, plan.tile_count,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        H, Nq, Fk, L, T, K, scale * LOG2E,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], HEAD_DIM=D, TOPK_P2=triton.next_power_of_2(max(K, 1)),
        DOT_PREC=_precision(q),
        num_warps=cfg["warps"], num_stages=cfg["stages"])
    return o, lse2


def _launch_backward(q, k, v, o, do, lse2, sel, plan, L, scale, cfg):
    B, H, Nq, D = q.shape
    K, Fk, T = sel.shape[-1], plan.tile_list.shape[-1], plan.tile_count.shape[-1]
    delta = (o.float() * do.float()).sum(-1)                 # (B, H, Nq): rowsum(O * dO) of the softmax grad
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    common = dict(HEAD_DIM=D, TOPK_P2=triton.next_power_of_2(max(K, 1)), DOT_PREC=_precision(q),
                  num_warps=cfg["warps"], num_stages=cfg["stages"])
    _dq_kernel[(T, B * H)](
        q, k, v, do, dq, lse2, delta, sel, plan.perm, plan.tile_list, plan.tile_count,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        H, Nq, Fk, L, T, K, scale * LOG2E, scale,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N_DQ"], **common)
    _dkdv_kernel[(Fk * triton.cdiv(L, cfg["BLOCK_N_DKV"]), B * H)](
        q, k, v, do, dk, dv, lse2, delta, sel, plan.perm, plan.frame_list, plan.frame_count,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
        H, Nq, Fk, L, T, K, scale * LOG2E, scale,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N_DKV"], BLOCK_MS=cfg["BLOCK_M_DKV"], **common)
    return dq, dk, dv


def _precision(q):
    return "ieee" if q.dtype == torch.float32 else "tf32"   # the GPU would silently use TF32 for fp32 (P2)


def _check(q, k, v, table, sel, L):
    assert q.dim() == 4 and k.shape == v.shape and k.shape[:2] == q.shape[:2] and k.shape[3] == q.shape[3], \
        f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected (B, H, N, hd) with shared B, H, hd"
    assert q.dtype == k.dtype == v.dtype and q.dtype in (torch.float32, torch.float16, torch.bfloat16), \
        f"q, k, v must share one of fp32/fp16/bf16 (got {q.dtype}, {k.dtype}, {v.dtype})"
    D = q.shape[3]
    assert D >= 16 and D & (D - 1) == 0, f"head dim {D}: the kernel needs a power of two >= 16"
    Fq, Fk = table.shape
    assert q.shape[2] == Fq * L and k.shape[2] == Fk * L, \
        f"tokens (q {q.shape[2]}, k {k.shape[2]}) must be table {Fq}x{Fk} frames times L={L}"
    assert sel.shape[:3] == q.shape[:3] and sel.dtype == torch.int32, "sel: int32 (B, H, Nq, topk) from route()"
    assert max(x.shape[2] * x.stride(2) for x in (q, k, v)) < 2 ** 31, "one head's tokens must span < 2^31 elements"
    if not q.is_cuda and not _interpreting():
        raise RuntimeError("routed_attention on CPU needs Triton's interpreter: set TRITON_INTERPRET=1 "
                           "before triton is imported")
    if q.dtype == torch.bfloat16 and _interpreting():
        raise RuntimeError("bf16 is not supported by Triton's interpreter (wrong dot products): use fp32/fp16")


class RoutedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, table, sel, L, scale):
        cfg = _blocks(q.dtype)
        # strided views are fine (the model passes transposed q/k/v), but the head dim must be contiguous
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        sel = sel.contiguous()
        plan = make_plan(table, sel, L, cfg["BLOCK_M"])
        o, lse2 = _launch_forward(q, k, v, sel, plan, L, scale, cfg)
        ctx.save_for_backward(q, k, v, o, lse2, sel, *plan[:5])
        ctx.L, ctx.scale, ctx.cfg, ctx.block_m = L, scale, cfg, plan.block_m
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse2, sel, *lists = ctx.saved_tensors
        do = do if do.stride(-1) == 1 else do.contiguous()
        plan = Plan(*lists, ctx.block_m)
        dq, dk, dv = _launch_backward(q, k, v, o, do, lse2, sel, plan, ctx.L, ctx.scale, ctx.cfg)
        return dq, dk, dv, None, None, None, None


def routed_attention(q, k, v, table, sel, L, scale=None):
    """Softmax attention of q (B, H, Nq, hd) over the keys k/v (B, H, Nk, hd) of the ALWAYS frames of each
    query's table row plus the frames in sel (int32 (B, H, Nq, topk), -1 = none), as attention.route gives
    them. table: int8 (Fq, Fk) frame table, L tokens per frame. Differentiable in q, k, v. Equals
    attention.attend(q, k, v, attention.routed_mask(table, sel, L)) up to float rounding."""
    _check(q, k, v, table, sel, L)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return RoutedAttention.apply(q, k, v, table, sel, L, scale)


if __name__ == "__main__":   # python kernels/routed_attention.py: one check against the reference
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from attention import attend, routed_mask, route, routing_table

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not _interpreting():
        sys.exit("no GPU: run as TRITON_INTERPRET=1 python kernels/routed_attention.py")
    torch.manual_seed(0)
    L, table = 40, routing_table("teacher_forcing", 6, 2, sink=1)
    q, k, v = (torch.randn(1, 2, table.shape[0] * L, 32, device=dev, requires_grad=True) for _ in range(3))
    sel = route(q, k, table, L, topk=1)
    o = routed_attention(q, k, v, table, sel, L)
    ref = attend(q, k, v, routed_mask(table, sel, L))
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    print("max |kernel - reference|  o", f"{(o - ref).abs().max().item():.2e}",
          *(f"d{n} {(a - b).abs().max().item():.2e}" for n, a, b in zip("qkv", grads, ref_grads)))
