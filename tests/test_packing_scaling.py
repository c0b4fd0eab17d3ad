"""Every ``pos_scaling`` mode on packed mixed-size batches (docs/packing.md): ntk / yarn scale RoPE
frequencies per sequence (one table per sample, ``freqs_index`` per token), yarn tempers each sequence's
attention logits, tables interpolate under both. A packed batch must give what a loop of the batched path
on single images gives with the same ``pos_scaling``: sizes larger than the training grid (tiny: 16x16
pixels, a 4x4 grid), non-square, with condition images (one missing, one dropped) and in-context tokens.
"""

from __future__ import annotations

import pytest
import torch
from test_packing import make_model, mixed_batch, packed_and_loop_grads, single

import jitrope
from jitrope.packing import PackedLayout, mark_dynamic
from jitrope.rope import attn_logit_factor, scale_freqs, sequence_coords

needs_extension = pytest.mark.skipif(
    not jitrope.HAS_EXTENSION, reason=f"jitrope._C not loaded: {jitrope.EXTENSION_ERROR}"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
IMPLS = ["torch", pytest.param("fused", marks=needs_extension)]
ROTARY = ["rope2d", "rope2d_mixed", "sincos2d+rope2d"]
TABLES = ["learned1d", "sincos2d", "factorized2d"]
MODES = ["ntk", "yarn"]

# Larger than training on one axis or both (6x8 grid: rows 1.5, columns 2), smaller, non-square, the
# training size; condition grids differ too, sample 2 has none (null condition), sample 1 is dropped.
SIZES = [(16, 16), (8, 24), (24, 16), (12, 20), (24, 32)]
COND_SIZES = [(8, 8), (8, 12), None, (12, 8), (4, 8)]
LARGER = [1, 2, 3, 4]  # the samples with an axis longer than in training: their frequencies change
MORE_TOKENS = [2, 4]  # ... and with more tokens than in training (1: 2x6, 3: 3x5): yarn's temperature


pytestmark = pytest.mark.usefixtures("one_thread")


def batch(seed=0, dtype=torch.float32):
    xs, t, y, conds, drop = mixed_batch(seed, sizes=SIZES, cond_sizes=COND_SIZES)
    xs, conds = [x.to(dtype) for x in xs], [None if c is None else c.to(dtype) for c in conds]
    return xs, t.to(dtype), y, conds, drop


def assert_loop(model, mode, dtype=torch.float32, tol=1e-5, seed=0, **kw):
    xs, t, y, conds, drop = batch(seed, dtype)
    outs = model.forward_packed(xs, t, y, conds, cond_drop=drop, pos_scaling=mode)
    for s in range(len(xs)):
        ref = single(model, xs, t, y, conds, drop, s, pos_scaling=mode)
        assert outs[s].dtype == dtype
        torch.testing.assert_close(outs[s], ref, rtol=tol, atol=tol, msg=f"sample {s}")
    return outs


# ----------------------------------------------------------------------------- layout
def test_layout_carries_one_frequency_table_per_sequence():
    grids, cond_grids, L = [(4, 4), (6, 4), (2, 6), (8, 6)], [(2, 2), None, (1, 3), (4, 3)], 3
    kw = dict(context_len=L, train_grid=(4, 4), train_cond_grid=(2, 2), max_grid=(8, 8), max_cond_grid=(4, 4))
    scales = [(1.0, 1.0), (1.5, 1.0), (0.5, 1.5), (2.0, 1.5)]
    plain = PackedLayout.build(grids, cond_grids, **kw)
    for mode in MODES:
        lay = PackedLayout.build(grids, cond_grids, scaling=mode, **kw)
        for seqs, ref in ((lay.seqs, plain.seqs), (lay.seqs_in, plain.seqs_in)):  # with and without in-context
            # every token of a sequence (in-context, image, condition) uses its sample's table
            assert seqs.freqs_index is seqs.seq_id and seqs.freqs_index.dtype == torch.int64
            assert seqs.freq_mode == mode
            assert seqs.freq_scale.dtype == torch.float64 and seqs.freq_scale.tolist() == [list(s) for s in scales]
            # coordinates stay integer (RoPE turns by scaled frequencies instead)
            assert torch.equal(seqs.coords, ref.coords) and torch.equal(seqs.cu_seqlens, ref.cu_seqlens)
            if mode == "ntk":
                assert seqs.attn_factor is None
            else:
                want = torch.tensor([attn_logit_factor(s, "yarn") for s in scales], dtype=torch.float64)
                # the temperature follows the token ratio: 0.5 x 1.5 has fewer tokens than training, none
                assert want[0] == want[2] == 1.0 and want[1] > 1 and want[3] > 1
                assert seqs.attn_factor.dtype == torch.float64
                assert torch.equal(seqs.attn_factor, want[seqs.seq_id])
        # the tables interpolate, as in the batched path: resampled tables and coordinates on the training grid
        assert lay.table_scaling == "interpolate"
        itp = PackedLayout.build(grids, cond_grids, scaling="interpolate", **kw)
        assert lay.image_tables == itp.image_tables == ((6, 4), (2, 6), (8, 6))
        assert lay.cond_tables == itp.cond_tables == ((1, 3), (4, 3))
        for name in ("rows", "cols", "slots"):
            assert torch.equal(getattr(lay, name), getattr(itp, name)), name
        assert torch.equal(lay.table_coords, itp.seqs_in.coords)
        a, b = lay.seqs_in.cu_seqlens[1:3].tolist()
        torch.testing.assert_close(lay.table_coords[a:b], sequence_coords((6, 4), ref_grid=(4, 4)), rtol=0, atol=0)
        # moved and repeated (CFG) layouts keep all of it
        moved, two = lay.to("cpu"), lay.repeat(2)
        assert moved.seqs.freqs_index is moved.seqs.seq_id and torch.equal(moved.seqs.freq_scale, lay.seqs.freq_scale)
        assert two.seqs.freq_scale.tolist() == lay.seqs.freq_scale.tolist() * 2
        assert two.seqs.freq_mode == mode and (two.seqs.attn_factor is None) == (mode == "ntk")


@pytest.mark.parametrize("mode", ["extrapolate", "interpolate", "yarn"])
def test_layout_adds_nothing_where_no_frequency_or_logit_changes(mode):
    # extrapolate / interpolate: no frequency tables at all (the plain op, the plain attention);
    # yarn on grids no longer than in training: tables (of unscaled frequencies) but no temperature.
    lay = PackedLayout.build([(4, 4), (2, 4), (4, 3)], context_len=2, scaling=mode, train_grid=(4, 4))
    for seqs in (lay.seqs, lay.seqs_in):
        assert seqs.attn_factor is None
        assert (seqs.freqs_index is None) == (mode != "yarn")
        assert len(seqs.tensors()) == (3 if mode != "yarn" else 5)
    assert (lay.table_coords is lay.seqs_in.coords) == (mode != "yarn")


def test_mark_dynamic_marks_the_scaling_tensors():
    lay = PackedLayout.build([(4, 4), (6, 4)], context_len=2, scaling="yarn", train_grid=(4, 4))
    mark_dynamic(lay)
    for t in (lay.seqs.freq_scale, lay.seqs.attn_factor, lay.seqs_in.attn_factor, lay.table_coords):
        assert 0 in getattr(t, "_dynamo_weak_dynamic_indices", set())


def test_per_table_scales_are_the_scalar_formulas():
    # scale_freqs with a tensor of per-sequence scales: each table is the float call's, bit for bit
    rot = make_model("rope2d_mixed").pos.rotary
    f = rot.layer_freqs(1)  # [H, 2, D/2], learned, both axes mixed
    scales = torch.tensor([[1.0, 1.0], [1.5, 2.0], [0.5, 3.0], [2.25, 0.75]], dtype=torch.float64)
    for mode in ("ntk", "yarn", "interpolate", "extrapolate"):
        tables = scale_freqs(f, scales, mode, theta=rot.theta, head_dim=rot.head_dim, train_grid=(4, 4))
        assert tables.shape == (4, *f.shape) and tables.dtype == f.dtype
        for i, s_hw in enumerate(scales.tolist()):
            one = scale_freqs(f, tuple(s_hw), mode, theta=rot.theta, head_dim=rot.head_dim, train_grid=(4, 4))
            assert torch.equal(tables[i], one), (mode, i)
    with pytest.raises(ValueError, match=r"scale_hw must be \(s_h, s_w\) or a tensor \[F, 2\]"):
        scale_freqs(f, scales[:, :1], "ntk", theta=rot.theta, head_dim=rot.head_dim)
    with pytest.raises(ValueError, match=r"scale must be a float or a float tensor \[F\]"):
        scale_freqs(f, torch.ones(2, 2, dtype=torch.long), "ntk", theta=rot.theta, head_dim=rot.head_dim)


# ----------------------------------------------------------------------------- model
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pos_impl", IMPLS)
@pytest.mark.parametrize("pos_embed", ROTARY)
def test_packed_frequency_scaling_is_a_loop_over_single_images(pos_embed, pos_impl, mode):
    model = make_model(pos_embed, pos_impl, True)
    outs = assert_loop(model, mode)
    # the check has teeth: the larger samples are placed differently from extrapolation, the others not
    xs, t, y, conds, drop = batch()
    plain = model.forward_packed(xs, t, y, conds, cond_drop=drop, pos_scaling="extrapolate")
    for s in LARGER:
        assert not torch.allclose(outs[s], plain[s], rtol=1e-4, atol=1e-4), f"sample {s}"
    assert torch.equal(outs[0], plain[0])  # the training-size sample is the plain model's, bit for bit


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pos_impl", IMPLS)
@pytest.mark.parametrize("pos_embed", ROTARY)
def test_packed_frequency_scaling_in_float64(pos_embed, pos_impl, mode):
    model = make_model(pos_embed, pos_impl, True).to(torch.float64)
    assert_loop(model, mode, dtype=torch.float64, tol=1e-12, seed=3)


@pytest.mark.parametrize("attn_impl", ["sdpa", "fp32"])
@pytest.mark.parametrize("packed_attn", ["mask", "loop"])
def test_yarn_temperature_per_sequence_on_every_attention_path(packed_attn, attn_impl):
    # the block-diagonal mask (what a compiled step runs) and the loop give the batched path's numbers
    model = make_model("rope2d", "torch", True, packed_attn=packed_attn, attn_impl=attn_impl)
    outs = assert_loop(model, "yarn", seed=1)
    # without the temperature the larger samples would differ: the factor is really applied
    xs, t, y, conds, drop = batch(1)
    model.pos.packed_attn_factor = lambda seqs: None
    cold = model.forward_packed(xs, t, y, conds, cond_drop=drop, pos_scaling="yarn")
    for s in range(len(xs)):
        if s in MORE_TOKENS:
            assert not torch.allclose(outs[s], cold[s], rtol=1e-4, atol=1e-4), f"sample {s}"
        else:  # a factor of 1 multiplies the queries by 1: the same bits
            assert torch.equal(outs[s], cold[s]), f"sample {s}"


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("pos_impl", IMPLS)
def test_yarn_on_cuda_varlen_mask_and_loop_are_the_batched_path(pos_impl):
    # bf16 autocast on CUDA: flash varlen_attn, the block-diagonal mask and the loop read the same tempered
    # queries, and each sample is the batched forward of its image alone (SDPA with scale=)
    xs, t, y, conds, drop = batch(5)
    xs, conds = [x.cuda() for x in xs], [None if c is None else c.cuda() for c in conds]
    t, y, drop = t.cuda(), y.cuda(), drop.cuda()
    outs = {}
    for packed_attn in ("varlen", "mask", "loop"):
        model = make_model("rope2d_mixed", pos_impl, True, packed_attn=packed_attn).cuda()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            outs[packed_attn] = model.forward_packed(xs, t, y, conds, cond_drop=drop, pos_scaling="yarn")
            refs = [single(model, xs, t, y, conds, drop, s, pos_scaling="yarn") for s in range(len(xs))]
    for s, ref in enumerate(refs):
        for packed_attn, out in outs.items():
            torch.testing.assert_close(out[s], ref, rtol=3e-2, atol=3e-2, msg=f"{packed_attn}, sample {s}")
        torch.testing.assert_close(outs["varlen"][s], outs["loop"][s], rtol=3e-2, atol=3e-2, msg=f"sample {s}")


@pytest.mark.parametrize("pos_impl", IMPLS)
@pytest.mark.parametrize("pos_embed", ["rope2d", "rope2d_mixed"])
def test_yarn_and_ntk_on_grids_no_larger_than_training_are_the_plain_model(pos_embed, pos_impl):
    # no axis longer than in training: unscaled frequency tables and no multiply on the logits, same bits
    model = make_model(pos_embed, pos_impl, True)
    sizes, cond_sizes = [(16, 16), (8, 16), (12, 16)], [(8, 8), None, (4, 4)]
    xs, t, y, conds, drop = mixed_batch(2, sizes=sizes, cond_sizes=cond_sizes)
    plain = model.forward_packed(xs, t, y, conds, cond_drop=drop[:3])
    for mode in MODES:
        outs = model.forward_packed(xs, t, y, conds, cond_drop=drop[:3], pos_scaling=mode)
        for a, b in zip(outs, plain):
            assert torch.equal(a, b), mode


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pos_embed", TABLES)
def test_tables_interpolate_under_ntk_and_yarn_when_packed(pos_embed, mode):
    # as in the batched path (no rotary part: ntk and yarn are interpolation model-wide)
    model = make_model(pos_embed, "torch", True)
    outs = assert_loop(model, mode, seed=2)
    xs, t, y, conds, drop = batch(2)
    itp = model.forward_packed(xs, t, y, conds, cond_drop=drop, pos_scaling="interpolate")
    for a, b in zip(outs, itp):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pos_embed", TABLES)
@needs_extension
def test_tables_interpolate_under_ntk_and_yarn_when_packed_fused(pos_embed, mode):
    assert_loop(make_model(pos_embed, "fused", True), mode, seed=2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "pos_embed, pos_impl",
    [
        ("rope2d_mixed", "torch"),
        ("sincos2d+rope2d", "torch"),
        pytest.param("rope2d_mixed", "fused", marks=needs_extension),
        pytest.param("sincos2d+rope2d", "fused", marks=needs_extension),
    ],
)
def test_gradients_of_a_scaled_packed_batch_are_those_of_the_loop(pos_embed, pos_impl, mode):
    model = make_model(pos_embed, pos_impl, True)
    xs, t, y, conds, drop = batch(4)
    g_packed, g_loop = packed_and_loop_grads(model, xs, t, y, conds, drop, pos_scaling=mode)
    used = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(g_packed) == set(g_loop) == used
    for name, gl in g_loop.items():
        torch.testing.assert_close(g_packed[name], gl, rtol=1e-4, atol=1e-5, msg=name)
    if pos_embed == "rope2d_mixed":  # the learned frequencies are reached through the per-sequence tables
        assert g_packed["pos.parts.rope2d_mixed.freqs"].abs().sum() > 0
