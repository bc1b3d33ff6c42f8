"""Context Forcing: error recycling touches only the teacher's memory, the score and critic read the student's
memory, contextual DMD's gradient, the critic's loss and the curriculum."""

import copy

import torch

from context import (ContextConfig, ErrorBank, context_rollout, contextual_critic_loss, contextual_dmd_loss,
                     context_teacher_loss, rollout_length)
from distill import DMDConfig
from memory import KVCache, MemoryConfig
from model import DiT, DiTConfig
from rollout import prefill, prompts, reencode


def tiny(seed):
    torch.manual_seed(seed)
    model = DiT(DiTConfig.preset("tiny"))
    for p in model.parameters():   # open the adaLN-Zero gates: a fresh DiT predicts v = 0
        if (p == 0).all():
            torch.nn.init.normal_(p, std=0.05)
    return model


def tokens(batch=2):
    return torch.randint(2, 20, (batch, 6), generator=torch.Generator().manual_seed(1))


SLOWFAST = MemoryConfig("slowfast", window=2, sink=2, slow=2, tau=0.99)


def test_error_recycling_changes_the_memory_and_only_the_memory():
    model = tiny(0)
    cfg = model.cfg
    x0 = torch.randn(2, 4 * cfg.frames, cfg.channels, cfg.height, cfg.width, generator=torch.Generator().manual_seed(2))
    bank = ErrorBank(ContextConfig(recycle=1.0))
    bank.add(torch.randn(2 * bank.cfg.buckets, cfg.chunk, cfg.channels, cfg.height, cfg.width),
             torch.linspace(0, 0.99, 2 * bank.cfg.buckets))   # an error in every bucket
    forward = model.forward_cached

    def run(with_bank):
        calls = []

        def recorded(x, sigma, text, cache, prompt=None):
            if not torch.all(sigma == 0):   # a denoising call (the re-cache runs at sigma 0)
                calls.append((x.clone(), sigma.clone(), None if cache.x is None else cache.x.clone()))
            return forward(x, sigma, text, cache, prompt=prompt)

        model.forward_cached = recorded
        loss = context_teacher_loss(model, x0, tokens(), 1.0, SLOWFAST, copy.deepcopy(bank) if with_bank else None,
                            torch.Generator().manual_seed(0))
        return loss, calls

    (plain, a), (recycled, b) = run(False), run(True)
    assert len(a) == len(b) == x0.shape[1] // cfg.chunk
    for (xa, sa, ma), (xb, sb, mb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(sa, sb)   # what is denoised (and so the target) is unchanged
    assert a[0][2] is None and b[0][2] is None
    assert all(ma.shape != mb.shape or not torch.allclose(ma, mb) for (_, _, ma), (_, _, mb) in zip(a[1:], b[1:]))
    assert torch.equal(a[1][2], x0[:, :cfg.chunk]) and not torch.equal(b[1][2], x0[:, :cfg.chunk])
    assert plain.item() != recycled.item()


def test_the_error_bank_keeps_the_models_own_errors_by_level():
    cfg = ContextConfig(buckets=4, bank=3)
    bank = ErrorBank(cfg)
    bank.add(torch.ones(5, 2, 1, 2, 2), torch.tensor([0.1, 0.1, 0.1, 0.1, 0.9]))
    assert [len(r) for r in bank.rings] == [3, 0, 0, 1]   # a ring keeps its last `bank` errors
    state = bank.state_dict()
    again = ErrorBank(cfg)
    again.load_state_dict(state)
    assert all(torch.equal(torch.stack(r), torch.stack(s)) for r, s in zip(bank.rings, again.rings) if r)


@torch.no_grad()
def test_a_reader_sees_the_students_memory_same_frames_same_positions():
    student, score = tiny(0), tiny(1)
    cfg, text = student.cfg, tokens()
    # full memory, the student as its own reader: re-encoding gives back exactly the student's own cache
    frames = torch.randn(2, 3 * cfg.chunk, cfg.channels, cfg.height, cfg.width)
    cache = KVCache(MemoryConfig("full"), cfg.depth)
    prefill(student, frames, text, cache)
    again = reencode(student, cache, text)
    assert again.frames == cache.frames and again.next_frame == cache.next_frame
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(again.k + again.v, cache.k + cache.v))
    # slow/fast memory of a rollout: every graded chunk's memory, read by the score (guided) and the critic
    _, views = context_rollout(student, text, 6 * cfg.frames, cfg.frames, DMDConfig(), SLOWFAST, 3,
                               torch.Generator().manual_seed(0))
    assert len(views) == cfg.frames // cfg.chunk and any(v.slow for v in views)
    for view in views:
        for reader, batch in ((score, prompts(text, True)), (student, text)):
            read = reencode(reader, view, batch)
            assert read.frames == view.frames and torch.equal(read.x[:2], view.x) and torch.equal(read.x[-2:], view.x)
            for n in (cfg.chunk, 2 * cfg.chunk):
                assert all(torch.equal(p, q) for p, q in zip(read.positions(n), view.positions(n)))
        # the sink frames were encoded with no history by both: the student reading itself gets its own keys
        own = reencode(student, view, text)
        sink = view.frames.index(SLOWFAST.sink - 1) + 1
        assert torch.allclose(own.k[-1][:, :sink], view.k[-1][:, :sink], atol=1e-5)


def test_contextual_dmd_gradient_is_nonzero_and_zero_where_critic_and_score_agree():
    student, score, critic = tiny(0), tiny(1), tiny(2)
    text = tokens()
    with torch.no_grad():
        x, views = context_rollout(student, text, 3 * student.cfg.frames, student.cfg.frames, DMDConfig(), SLOWFAST, 1,
                                   torch.Generator().manual_seed(0))
    x.requires_grad_(True)
    loss, grad = contextual_dmd_loss(x, views, text, score, critic, DMDConfig(), torch.Generator().manual_seed(0))
    loss.backward()
    assert grad.abs().max() > 1e-3 and torch.allclose(x.grad, grad / grad.numel(), atol=1e-9)
    _, same = contextual_dmd_loss(x, views, text, score, copy.deepcopy(score), DMDConfig(guidance=0.0),
                                  torch.Generator().manual_seed(0))
    assert same.abs().max() == 0


def test_contextual_critic_loss_falls_on_a_fixed_batch():
    student, critic = tiny(0), tiny(1)
    text = tokens()
    with torch.no_grad():
        x, views = context_rollout(student, text, 2 * student.cfg.frames, student.cfg.frames, DMDConfig(), SLOWFAST,
                                   3, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(critic.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = contextual_critic_loss(critic, x, views, text, DMDConfig(), torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_graded_chunks_carry_the_gradient_and_the_rollout_grows_by_the_curriculum():
    student = tiny(0)
    c = student.cfg
    x, views = context_rollout(student, tokens(), 3 * c.frames, c.frames, DMDConfig(), SLOWFAST, 0,
                               torch.Generator().manual_seed(0))
    assert x.shape[1] == c.frames and x.requires_grad and views[0].next_frame == 2 * c.frames
    ctx = ContextConfig(long=40, ramp=0.5)
    lengths = [rollout_length(ctx, c.frames, c.chunk, p / 10) for p in range(11)]
    assert lengths[0] == c.frames and lengths[5:] == [40] * 6 and lengths == sorted(lengths)
    assert all(n % c.chunk == 0 for n in lengths)
