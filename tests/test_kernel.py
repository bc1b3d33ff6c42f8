"""The Triton routed-attention kernel against the reference (attention.py), forward and backward.

Without a GPU the kernel runs in Triton's interpreter (numpy, one program at a time), which must be switched
on before triton is imported; shapes are tiny to keep this file fast. L = 40 tokens per frame is not a
multiple of any block size, so every frame ends in a tail block. With a GPU the same tests run the compiled
kernel, and the bf16 test runs too.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported: kernels/ imports it at module level

import pytest  # noqa: E402

from attention import (attend, cache_table, frame_mask, route, routed_attend, routed_mask,  # noqa: E402
                       routing_table, token_mask)
from kernels.routed_attention import _blocks, make_plan, routed_attention  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
L = 40


def table_for(layout, sink):
    if layout == "cache":                                  # streaming: 4 cached frames, a query chunk of 2
        return cache_table(cached=4, sink=sink, query=2)
    if layout == "block_causal":
        return routing_table("block_causal", 6, 2, sink)
    return routing_table("teacher_forcing", 4, 1, sink)   # 8 frames: [clean 0..3 | noisy 0..3]


def inputs(table, dtype, B=1, H=2, hd=16, seed=0, gain=1.0):
    """q (B, H, Nq, hd) and k, v (B, H, Nk, hd), as the model passes them: transposed (B, N, H, hd) views."""
    g = torch.Generator().manual_seed(seed)
    Nq, Nk = table.shape[0] * L, table.shape[1] * L
    q, k, v = (torch.randn(B, n, H, hd, generator=g) for n in (Nq, Nk, Nk))
    q, k = q * gain, k * gain
    return [x.to(DEV, dtype).requires_grad_().transpose(1, 2) for x in (q, k, v)]


def run(fn, q, k, v, seed=1):
    """Output and (dq, dk, dv) for a fixed random output gradient."""
    o = fn(q, k, v)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed)).to(o.device, o.dtype)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def reference(q, k, v, table, sel):
    """The reference in float64 on the same (rounded) inputs: what the kernel should compute."""
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    return run(lambda a, b, c: attend(a, b, c, routed_mask(table, sel, L).to(a.device)), q64, k64, v64)


def rel_err(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("layout", ["cache", "block_causal", "teacher_forcing"])
@pytest.mark.parametrize("topk", [1, 2, 3])
@pytest.mark.parametrize("sink", [0, 1])
def test_matches_reference_fp32(layout, topk, sink):
    table = table_for(layout, sink)
    q, k, v = inputs(table, torch.float32, H=1, seed=topk + 10 * sink)   # several heads: the tests below
    sel = route(q, k, table, L, topk)
    got = run(lambda a, b, c: routed_attention(a, b, c, table, sel, L), q, k, v)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, reference(q, k, v, table, sel)):
        assert rel_err(a, b) < 1e-4, f"{name}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("layout", ["cache", "block_causal", "teacher_forcing"])
def test_matches_reference_fp16(layout):
    table = table_for(layout, sink=1)
    q, k, v = inputs(table, torch.float16, hd=32)
    sel = route(q, k, table, L, topk=2)
    got = run(lambda a, b, c: routed_attention(a, b, c, table, sel, L), q, k, v)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, reference(q, k, v, table, sel)):
        assert a.dtype == torch.float16 and rel_err(a, b) < 2e-3, f"{name}: {rel_err(a, b):.2e}"


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="bf16 needs a GPU: Triton's interpreter gets bf16 dot products wrong (triton #11584)")
def test_matches_reference_bf16():
    table = table_for("teacher_forcing", sink=1)
    q, k, v = inputs(table, torch.bfloat16, hd=64)
    sel = route(q, k, table, L, topk=2)
    got = run(lambda a, b, c: routed_attention(a, b, c, table, sel, L), q, k, v)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, reference(q, k, v, table, sel)):
        assert rel_err(a, b) < 2e-2, f"{name}: {rel_err(a, b):.2e}"


def test_large_logits():
    # logits of +-100s: the online softmax and the recomputed backward probabilities must agree exactly
    # in fp32 (pitfall P3: a backward that rescales keys in low precision drifts with |logit|)
    table = table_for("block_causal", sink=1)
    q, k, v = inputs(table, torch.float32, gain=4.0)
    sel = route(q, k, table, L, topk=2)
    got = run(lambda a, b, c: routed_attention(a, b, c, table, sel, L), q, k, v)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, reference(q, k, v, table, sel)):
        assert rel_err(a, b) < 1e-4, f"{name}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("topk", [6, 0])   # k >= every history, and no routing at all
def test_full_topk_is_dense_block_causal(topk):
    table = routing_table("block_causal", 6, 2, sink=0)
    q, k, v = inputs(table, torch.float32)
    got = run(lambda a, b, c: routed_attend(a, b, c, table, L, topk, kernel=True), q, k, v)
    dense = token_mask(frame_mask("block_causal", 6, 2), L).to(DEV)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, run(lambda *x: attend(*x, dense), q64, k64, v64)):
        assert rel_err(a, b) < 1e-4, f"{name}: {rel_err(a, b):.2e}"


def test_tile_shapes_of_the_plan():
    # every row chose the same frames: every tile lists them FULL, and the kernel still matches
    table = table_for("cache", sink=1)
    q, k, v = inputs(table, torch.float32, B=2)
    sel = torch.tensor([3, 1], dtype=torch.int32, device=DEV).expand(2, 2, q.shape[2], 2).contiguous()
    plan = make_plan(table, sel, L, _blocks(torch.float32)["BLOCK_M"])
    entries = torch.cat([plan.tile_list[b, h, t, :n] for b in range(2) for h in range(2)
                         for t, n in enumerate(plan.tile_count[b, h].tolist())])
    assert (entries % 2 == 0).all() and set((entries // 2).tolist()) == {0, 1, 3, 4, 5}
    # every real row appears in exactly one tile slot
    for row in plan.perm.view(4, -1):
        assert torch.equal(row[row >= 0].sort().values.long().cpu(), torch.arange(q.shape[2]))
    o = routed_attention(q, k, v, table, sel, L)
    assert rel_err(o, reference(q, k, v, table, sel)[0]) < 1e-4
    # a topk far above the history: -1 padding everywhere, and a sort key that would overflow int64 if
    # every digit were kept (40 frames, topk 16: 41^16 > 2^62)
    table = cache_table(cached=38, sink=1, query=2)
    sel = torch.full((1, 1, 2 * L, 16), -1, dtype=torch.int32, device=DEV)
    sel[..., 0] = 5
    plan = make_plan(table, sel, L, 32)
    assert torch.equal(plan.perm[plan.perm >= 0].sort().values.long().cpu(), torch.arange(2 * L))


def test_backward_is_bitwise_deterministic():
    table = table_for("teacher_forcing", sink=1)
    q, k, v = inputs(table, torch.float32, B=2, H=1)
    sel = route(q, k, table, L, topk=2)
    first = run(lambda a, b, c: routed_attention(a, b, c, table, sel, L), q, k, v)
    second = run(lambda a, b, c: routed_attention(a, b, c, table, sel, L), q, k, v)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_a_row_with_no_key_gives_zeros_not_nan():
    # impossible with attention.py's tables (a query always sees its own chunk), guarded anyway: query
    # frame 0 has only candidates and selects none; frame 1 is an ordinary row
    table = torch.tensor([[2, 2, 0], [1, 2, 1]], dtype=torch.int8)
    q, k, v = inputs(table, torch.float32)
    sel = torch.full((1, 2, 2 * L, 1), -1, dtype=torch.int32, device=DEV)
    sel[:, :, L:] = 1
    o, dq, dk, dv = run(lambda a, b, c: routed_attention(a, b, c, table, sel, L), q, k, v)
    assert all(torch.isfinite(x).all() for x in (o, dq, dk, dv))
    assert (o[:, :, :L] == 0).all() and (dq[:, :, :L] == 0).all()
    expected = attend(q[:, :, L:], k, v, routed_mask(table, sel, L)[:, :, L:].to(DEV))
    assert rel_err(o[:, :, L:], expected.double()) < 1e-4
