"""StridedLayout index maps pinned on hand-worked geometries, and the masks built from its rule."""

import pytest
import torch

from ebft.core.layout import StridedLayout
from ebft.core.masks import additive_mask, dense_mask, step_mask, strided_mask

T_ = torch.tensor


def slow_allowed(layout: StridedLayout) -> torch.Tensor:
    """The strided attention rule (ebft/core/layout.py) written out with Python loops over rows."""
    T, C, s, G, n, NB = (layout.seq_len, layout.context_len, layout.stride, layout.gen_len,
                         layout.num_samples, layout.num_blocks)
    owner = {}
    for j in range(n):
        for k in range(NB):
            for g in range(G):
                owner[T + g * (n * NB) + j * NB + k] = (j, k, g)
    allowed = torch.zeros(layout.length, layout.length, dtype=torch.bool)
    for q in range(layout.length):
        for kv in range(layout.length):
            if q < T:
                allowed[q, kv] = kv <= q
            else:
                j, k, g = owner[q]
                if kv < C + k * s:
                    allowed[q, kv] = True
                elif kv in owner:
                    j2, k2, g2 = owner[kv]
                    allowed[q, kv] = (j2, k2) == (j, k) and g2 <= g
    return allowed


def test_paper_figure_9_geometry():
    # T=12, C=4, s=4, G=4, n=1: contexts x[0:4], x[0:8]; completions x[4:8], x[8:12].
    lay = StridedLayout(12, 4, 4, 4, 1)
    assert lay.num_blocks == 2 and lay.length == 20
    assert torch.equal(lay.token_index, T_([[[12, 14, 16, 18], [13, 15, 17, 19]]]))
    assert torch.equal(lay.score_index, T_([[[3, 12, 14, 16], [7, 13, 15, 17]]]))
    assert torch.equal(lay.position_ids, T_(list(range(12)) + [4, 8, 5, 9, 6, 10, 7, 11]))
    assert torch.equal(lay.context_end, T_([4, 8]))
    assert torch.equal(lay.gt_index, T_([[4, 5, 6, 7], [8, 9, 10, 11]]))
    assert torch.equal(lay.gt_feature_index("last_token"), T_([7, 11]))
    assert torch.equal(lay.gen_feature_index("last_token"), T_([[18, 19]]))
    assert torch.equal(lay.gt_feature_index("mean"), lay.gt_index)
    assert torch.equal(lay.gen_feature_index("mean"), lay.token_index)


def test_small_case_positions_scores_and_mask():
    lay = StridedLayout(6, 2, 2, 2, 1)
    assert lay.num_blocks == 2
    assert torch.equal(lay.position_ids[6:], T_([2, 4, 3, 5]))
    # score rows of the generated rows 6, 7, 8, 9 in row order
    assert torch.equal(lay.score_index.flatten()[lay.token_index.flatten().argsort()], T_([1, 3, 6, 7]))
    expected = T_([[1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                   [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
                   [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
                   [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
                   [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
                   [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
                   [1, 1, 0, 0, 0, 0, 1, 0, 0, 0],   # (k=0, g=0): context x[0:2], itself
                   [1, 1, 1, 1, 0, 0, 0, 1, 0, 0],   # (k=1, g=0): context x[0:4], itself
                   [1, 1, 0, 0, 0, 0, 1, 0, 1, 0],   # (k=0, g=1)
                   [1, 1, 1, 1, 0, 0, 0, 1, 0, 1]]).bool()  # (k=1, g=1)
    assert torch.equal(lay.allowed(), expected)


def test_translation_geometry_overlapping_windows_two_samples():
    lay = StridedLayout(12, 4, 2, 4, 2)   # C=4, s=2, G=4: windows x[4:8], x[6:10], x[8:12] overlap
    assert lay.num_blocks == 3 and lay.length == 36
    assert torch.equal(lay.token_index, T_([[[12, 18, 24, 30], [13, 19, 25, 31], [14, 20, 26, 32]],
                                            [[15, 21, 27, 33], [16, 22, 28, 34], [17, 23, 29, 35]]]))
    assert torch.equal(lay.score_index, T_([[[3, 12, 18, 24], [5, 13, 19, 25], [7, 14, 20, 26]],
                                            [[3, 15, 21, 27], [5, 16, 22, 28], [7, 17, 23, 29]]]))
    assert torch.equal(lay.position_ids[12:], T_([4, 6, 8, 4, 6, 8, 5, 7, 9, 5, 7, 9,
                                                  6, 8, 10, 6, 8, 10, 7, 9, 11, 7, 9, 11]))
    assert torch.equal(lay.gt_index, T_([[4, 5, 6, 7], [6, 7, 8, 9], [8, 9, 10, 11]]))
    assert torch.equal(lay.gen_feature_index("last_token"), T_([[30, 31, 32], [33, 34, 35]]))


@pytest.mark.parametrize("geometry", [(12, 4, 4, 4, 1), (6, 2, 2, 2, 1), (12, 4, 2, 4, 2), (13, 3, 3, 2, 3),
                                      (9, 1, 1, 1, 2), (10, 5, 7, 5, 2)])
def test_allowed_matches_slow_rule(geometry):
    lay = StridedLayout(*geometry)
    full = lay.allowed()
    assert torch.equal(full, slow_allowed(lay))
    for g in range(lay.gen_len):
        rows = lay.step_rows(g)
        assert torch.equal(lay.allowed(rows, rows.stop), full[rows, : rows.stop])
    keys = torch.randperm(lay.length, generator=torch.Generator().manual_seed(0))[: lay.length // 2]
    assert torch.equal(lay.allowed(lay.step_rows(0), key_rows=keys), full[lay.step_rows(0)][:, keys])


def test_num_blocks_formula():
    for T, C, s, G in [(12, 4, 4, 4), (1024, 8, 8, 8), (1024, 4, 2, 4), (13, 3, 3, 2), (8, 4, 3, 4)]:
        lay = StridedLayout(T, C, s, G, 4)
        assert lay.num_blocks == (T - G - C) // s + 1
        assert int(lay.gt_index.max()) <= T - 1          # every ground-truth window fits in the chunk
        assert lay.length == T + 4 * lay.num_blocks * G
    assert StridedLayout(1024, 8, 8, 8, 4).num_blocks == 127


@pytest.mark.parametrize("args, word", [((7, 4, 4, 4, 1), "T=7"), ((12, 0, 4, 4, 1), "context_len C=0"),
                                        ((12, 4, 0, 4, 1), "stride s=0"), ((12, 4, 4, 0, 1), "gen_len G=0"),
                                        ((12, 4, 4, 4, 0), "num_samples n=0"), ((12.0, 4, 4, 4, 1), "seq_len T=12.0")])
def test_geometry_errors(args, word):
    with pytest.raises(ValueError, match=word):
        StridedLayout(*args)


def test_broadcast_and_rows_are_step_major():
    lay = StridedLayout(6, 2, 2, 2, 1)
    adv = T_([[[10.0, 20.0]]])                       # (batch=1, n=1, NB=2)
    grid = lay.broadcast_to_tokens(adv)
    assert torch.equal(grid, T_([[[[10.0, 10.0], [20.0, 20.0]]]]))
    assert torch.equal(lay.grid_to_rows(grid, fill=-1.0), T_([[-1.0] * 6 + [10.0, 20.0, 10.0, 20.0]]))

    lay = StridedLayout(12, 4, 2, 4, 2)
    values = torch.randn(3, 2, lay.num_blocks)
    rows = lay.grid_to_rows(lay.broadcast_to_tokens(values))
    for j in range(2):
        for k in range(lay.num_blocks):
            for g in range(4):
                assert rows[:, lay.token_index[j, k, g]].equal(values[:, j, k])
    assert rows[:, :12].eq(0).all()
    with pytest.raises(ValueError, match="n, NB"):
        lay.broadcast_to_tokens(torch.zeros(3, 2, 4))


def test_scatter_generated():
    lay = StridedLayout(6, 2, 2, 2, 1)
    chunk = torch.arange(100, 106).view(1, 6)
    gen = T_([[[[1, 2], [3, 4]]]])                   # (k=0: 1, 2), (k=1: 3, 4)
    assert torch.equal(lay.scatter_generated(chunk, gen), T_([[100, 101, 102, 103, 104, 105, 1, 3, 2, 4]]))
    lay = StridedLayout(12, 4, 2, 4, 2)
    chunk, gen = torch.randint(0, 50, (2, 12)), torch.randint(0, 50, (2, 2, 3, 4))
    row = lay.scatter_generated(chunk, gen)
    assert torch.equal(row[:, lay.token_index], gen) and torch.equal(row[:, :12], chunk)
    with pytest.raises(ValueError, match="chunk_ids"):
        lay.scatter_generated(chunk[:, :5], gen)


def test_to_device_is_cached():
    lay = StridedLayout(12, 4, 2, 4, 2)
    assert lay.to("cpu") is lay
    moved = lay.to("meta")
    assert moved is lay.to("meta") and moved.token_index.device.type == "meta"
    assert moved.row_limit.device.type == "meta" and lay.token_index.device.type == "cpu"


def test_unknown_pooling():
    with pytest.raises(ValueError, match="pooling='max'"):
        StridedLayout(12, 4, 4, 4, 1).gt_feature_index("max")


def test_masks_per_implementation():
    lay = StridedLayout(13, 3, 3, 2, 3)
    allowed = lay.allowed()
    sdpa = strided_mask(lay, "sdpa")
    assert sdpa.dtype == torch.bool and sdpa.shape == (1, 1, lay.length, lay.length)
    assert torch.equal(sdpa[0, 0], allowed) and torch.equal(dense_mask(lay)[0, 0], allowed)
    eager = strided_mask(lay, "eager", torch.bfloat16)
    assert eager.dtype == torch.bfloat16
    assert eager[0, 0][allowed].eq(0).all() and eager[0, 0][~allowed].eq(torch.finfo(torch.bfloat16).min).all()
    assert torch.equal(additive_mask(allowed, torch.float32) == 0, allowed)
    rows = lay.step_rows(1)
    step = step_mask(lay, 1, "sdpa")
    assert step.shape == (1, 1, 3 * lay.num_blocks, rows.stop)
    assert torch.equal(step[0, 0], allowed[rows, : rows.stop])
    assert torch.equal(step_mask(lay, 1, "eager")[0, 0] == 0, allowed[rows, : rows.stop])
    with pytest.raises(ValueError, match="flash_attention_2"):
        strided_mask(lay, "flash_attention_2")
    with pytest.raises(ValueError, match="step=2"):
        lay.step_rows(2)


def test_flex_block_mask_rule():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    lay = StridedLayout(13, 3, 3, 2, 3)
    bm = strided_mask(lay, "flex_attention")
    assert isinstance(bm, flex.BlockMask)
    q, kv = torch.arange(lay.length)[:, None], torch.arange(lay.length)[None, :]
    assert torch.equal(bm.mask_mod(0, 0, q, kv), lay.allowed())
    rows = lay.step_rows(1)
    bm = step_mask(lay, 1, "flex_attention")
    q = torch.arange(rows.stop - rows.start)[:, None]
    assert torch.equal(bm.mask_mod(0, 0, q, torch.arange(rows.stop)[None, :]), lay.allowed(rows, rows.stop))
