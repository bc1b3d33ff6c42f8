"""The frame tables behind every mask, and FlexAttention == SDPA on the same table."""

import pytest
import torch

from attention import attend, block_mask, frame_mask, token_mask


def test_teacher_forcing_table_by_hand():
    # 4 frames in chunks of 2: [clean c0 c0 c1 c1 | noisy n0 n0 n1 n1]
    t = frame_mask("teacher_forcing", 4, 2).int()
    expected = torch.tensor([
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],   # noisy chunk 0 sees only itself
        [0, 0, 0, 0, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 0, 1, 1],   # noisy chunk 1: clean chunk 0 + itself, never clean chunk 1
        [1, 1, 0, 0, 0, 0, 1, 1],
    ])
    assert torch.equal(t, expected)


def test_block_causal_window_table():
    t = frame_mask("block_causal", 8, 2, window=3)
    # frame 6 (chunk 3) sees frames 3, 4, 5 of history and its own chunk 6, 7
    assert t[6].nonzero().flatten().tolist() == [3, 4, 5, 6, 7]
    assert frame_mask("block_causal", 8, 2)[6].nonzero().flatten().tolist() == list(range(8))
    assert frame_mask("bidirectional", 4, 2).all()


@pytest.mark.parametrize("layout,frames", [("block_causal", 6), ("teacher_forcing", 4)])
def test_flex_attention_matches_sdpa(layout, frames):
    torch.manual_seed(0)
    L = 5   # tokens per frame not a multiple of Flex's block size
    table = frame_mask(layout, frames, 2)
    n = table.shape[0] * L
    q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
    dense = attend(q, k, v, token_mask(table, L))
    flex = attend(q, k, v, block_mask(table, L, "cpu"))
    assert (dense - flex).abs().max() < 1e-5
