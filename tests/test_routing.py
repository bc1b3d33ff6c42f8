"""Top-k history routing, the reference (attention.py): tables, which frames are picked, and what is attended."""

import pytest
import torch

from attention import (ALWAYS, CANDIDATE, NEVER, attend, cache_table, frame_mask, route, routed_attend,
                       routed_mask, routing_table, token_mask)


@pytest.mark.parametrize("layout", ["block_causal", "teacher_forcing"])
@pytest.mark.parametrize("frames,chunk", [(6, 1), (6, 2), (12, 3)])
@pytest.mark.parametrize("sink", [0, 1, 2])
def test_tables_agree_with_frame_mask(layout, frames, chunk, sink):
    table = routing_table(layout, frames, chunk, sink)
    assert table.dtype == torch.int8
    assert torch.equal(table > 0, frame_mask(layout, frames, chunk))


def test_tables_by_hand():
    # block_causal, 6 frames in chunks of 2, one sink frame: frame 4 routes among frames 1-3
    t = routing_table("block_causal", 6, 2, sink=1)
    assert t[4].tolist() == [ALWAYS, CANDIDATE, CANDIDATE, CANDIDATE, ALWAYS, ALWAYS]
    assert t[1].tolist() == [ALWAYS, ALWAYS, NEVER, NEVER, NEVER, NEVER]
    # teacher_forcing [clean 0..3 | noisy 0..3], chunks of 2: noisy frame 2 routes among clean 0, 1
    t = routing_table("teacher_forcing", 4, 2)
    assert t[6].tolist() == [CANDIDATE, CANDIDATE, NEVER, NEVER, NEVER, NEVER, ALWAYS, ALWAYS]
    assert t[2].tolist() == [CANDIDATE, CANDIDATE, ALWAYS, ALWAYS, NEVER, NEVER, NEVER, NEVER]
    # streaming: 5 cached frames (2 sinks) and a query chunk of 3
    t = cache_table(cached=5, sink=2, query=3)
    assert t.shape == (3, 8) and (t == t[0]).all()
    assert t[0].tolist() == [ALWAYS, ALWAYS, CANDIDATE, CANDIDATE, CANDIDATE, ALWAYS, ALWAYS, ALWAYS]


def frames_with_means(means, L, seed=0):
    """Keys (1, 1, F*L, hd) whose frame f has mean key means[f] exactly: integer noise summing to zero over
    the frame, so every float sum is exact and ties between frames are real ties."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(-3, 4, (len(means), L, means.shape[1]), generator=g).float()
    noise[:, -1] = -noise[:, :-1].sum(1)
    return (means[:, None] + noise).reshape(1, 1, -1, means.shape[1])


def test_query_equal_to_a_mean_key_picks_that_frame():
    L, hd = 3, 8
    means = torch.eye(hd)[:5] * 2.0                       # 4 cached frames + 1 query frame, orthogonal means
    k = frames_with_means(means, L)
    table = cache_table(cached=4, sink=0, query=1)
    q = means[2].expand(1, 1, L, hd).clone()              # every query token equals frame 2's mean key
    sel = route(q, k, table, L, topk=1)
    assert sel.dtype == torch.int32 and sel.shape == (1, 1, L, 1)
    assert (sel == 2).all()
    # with k=2 the runner-up is a tie (score 0 for frames 0, 1, 3): the most recent, frame 3, wins
    assert route(q, k, table, L, topk=2)[0, 0, 0].tolist() == [2, 3]
    # q is tested against candidates only: a sink frame is never picked, however well it matches
    assert route(q, k, cache_table(cached=4, sink=3, query=1), L, topk=1)[0, 0, 0].tolist() == [3]


def test_ties_prefer_recent_and_few_candidates_pad():
    L, hd = 2, 4
    table = routing_table("block_causal", 8, 2, sink=1)
    q = torch.randn(1, 2, 8 * L, hd)
    sel = route(q, torch.zeros(1, 2, 8 * L, hd), table, L, topk=3)   # every score is 0: all ties
    by_frame = sel[0, 0, ::L]                                        # one query token per frame
    assert by_frame[6].tolist() == [5, 4, 3]      # candidates 1..5: the three most recent
    assert by_frame[3].tolist() == [1, -1, -1]    # candidates {1} (0 is the sink): all taken, -1 padded
    assert by_frame[0].tolist() == [-1, -1, -1]   # first chunk: no history at all
    assert torch.equal(sel[0, 0], sel[0, 1])


def test_selection_is_per_token_per_head_and_deterministic():
    torch.manual_seed(0)
    L, table = 5, routing_table("teacher_forcing", 6, 2, sink=1)
    q, k = torch.randn(2, 3, 12 * L, 16), torch.randn(2, 3, 12 * L, 16)
    sel = route(q, k, table, L, topk=2)
    assert torch.equal(sel, route(q, k, table, L, topk=2))
    cand = (table == CANDIDATE).repeat_interleave(L, 0)            # (Nq, Fk)
    picked = sel[sel >= 0].long()
    rows = (sel >= 0).nonzero()[:, 2]
    assert cand[rows, picked].all()                                # only candidates are picked
    assert len({tuple(s.tolist()) for s in sel[0, 0, 6 * L + 4 * L:]}) > 1   # tokens of one frame differ
    # best first: scores along sel never increase
    kbar = k.unflatten(2, (12, L)).mean(3)
    score = torch.einsum("bhnd,bhfd->bhnf", q, kbar)
    s = score.gather(-1, sel.clamp(min=0).long())
    both = (sel[..., 0] >= 0) & (sel[..., 1] >= 0)
    assert (s[..., 0][both] >= s[..., 1][both]).all()


def test_routed_mask_is_always_plus_selected():
    L, table = 2, cache_table(cached=4, sink=1, query=2)
    sel = torch.tensor([2, -1], dtype=torch.int32).expand(1, 1, 2 * L, 2)
    m = routed_mask(table, sel, L)
    assert m.shape == (1, 1, 2 * L, 6 * L)
    assert m[0, 0, :, ::L].int().tolist() == [[1, 0, 1, 0, 1, 1]] * (2 * L)


@pytest.mark.parametrize("layout", ["block_causal", "teacher_forcing", "cache"])
@pytest.mark.parametrize("sink", [0, 1])
def test_topk_covering_history_is_dense(layout, sink):
    torch.manual_seed(0)
    L, hd = 5, 16
    if layout == "cache":
        table, dense = cache_table(4, sink, 2), None
    else:
        table, dense = routing_table(layout, 6, 2, sink), token_mask(frame_mask(layout, 6, 2), L)
    q = torch.randn(1, 2, table.shape[0] * L, hd)
    k, v = torch.randn(2, 1, 2, table.shape[1] * L, hd)
    expected = attend(q, k, v, dense)
    for topk in (table.shape[1], 0):                               # k >= history, and no routing
        assert (routed_attend(q, k, v, table, L, topk) - expected).abs().max() < 1e-5
    assert (routed_attend(q, k, v, table, L, 1) - expected).abs().max() > 1e-3   # routing does change it


def test_no_gradient_through_selection():
    torch.manual_seed(0)
    L, table = 5, routing_table("teacher_forcing", 4, 2, sink=0)
    q, k, v = (torch.randn(1, 2, 8 * L, 16, requires_grad=True) for _ in range(3))
    out = routed_attend(q, k, v, table, L, topk=1)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    sel = route(q, k, table, L, topk=1)
    assert not sel.requires_grad
    fixed = routed_mask(table, sel, L)                             # the same mask, as a constant
    expected = torch.autograd.grad(attend(q, k, v, fixed).square().sum(), (q, k, v))
    for g, e in zip(grads, expected):
        assert torch.equal(g, e)


def test_streaming_cache_routing():
    torch.manual_seed(0)
    L, cached, sink, query = 4, 6, 2, 3
    table = cache_table(cached, sink, query)
    q = torch.randn(1, 2, query * L, 16)
    k, v = torch.randn(2, 1, 2, (cached + query) * L, 16)
    sel = route(q, k, table, L, topk=2)
    assert ((sel >= sink) & (sel < cached)).all()                  # never a sink, never the query chunk
    m = routed_mask(table, sel, L)
    assert m[..., : sink * L].all() and m[..., cached * L:].all()  # sinks and the chunk itself, always
    assert (m.sum(-1) == (sink + 2 + query) * L).all()             # plus exactly two routed frames
    assert torch.allclose(routed_attend(q, k, v, table, L, 2), attend(q, k, v, m))


def test_route_scores_in_fp32_under_autocast():
    # near-identical frames: bf16 scores would reorder them (the test checks that it would, so it can fail)
    torch.manual_seed(0)
    L, hd, frames = 4, 32, 8
    base = torch.randn(1, 2, 1, hd)
    k = base + 1e-3 * torch.randn(1, 2, frames * L, hd)
    q = torch.randn(1, 2, 2 * L, hd) * 4
    table = cache_table(cached=frames - 2, sink=0, query=2)
    exact = route(q, k, table, L, topk=2)
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(route(q, k, table, L, topk=2), exact)
        kbar = k.float().unflatten(2, (frames, L)).mean(3)
        bf16 = (q.float() @ kbar.transpose(-1, -2))[..., :frames - 2]   # what autocast makes of the same matmul
    assert bf16.dtype == torch.bfloat16
    assert not torch.equal(bf16.float().topk(2, dim=-1).indices, (q @ kbar.transpose(-1, -2))[..., :frames - 2].topk(2, dim=-1).indices)
