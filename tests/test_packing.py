"""Packed batches (docs/packing.md): the layout, block-diagonal attention, the model and the
diffusion loss / sampler on images of different sizes in one token stream.

The model tests run the tiny preset (patch 4, 4 in-context tokens from block 1) on the CPU. A packed
batch must give what the batched path gives: for S images of one size the batched forward (float32,
1e-6), for mixed sizes a loop over single images; perturbing one image must leave every other
image's output bit-identical.
"""

from __future__ import annotations

import math

import pytest
import torch

import jitrope
from jitrope.attention import VARLEN_IMPLS, block_diagonal_mask, resolve_varlen_impl, varlen_attention
from jitrope.diffusion import Diffusion
from jitrope.model import JiT, JiTConfig
from jitrope.packing import (
    PackedLayout,
    check_cu_seqlens,
    pack_images,
    patchify,
    unpack_images,
    unpatchify,
)
from jitrope.posenc import POS_EMBEDS
from jitrope.rope import sequence_coords

ENCODINGS = list(POS_EMBEDS)

needs_extension = pytest.mark.skipif(
    not jitrope.HAS_EXTENSION, reason=f"jitrope._C not loaded: {jitrope.EXTENSION_ERROR}"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# every encoding with pos_impl torch and fused (factorized2d's packed fused path is jitrope::pos2d_add_indexed)
ENC_IMPL = [pytest.param(e, "torch", id=f"{e}-torch") for e in ENCODINGS] + [
    pytest.param(e, "fused", id=f"{e}-fused", marks=needs_extension) for e in ENCODINGS
]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(pos_embed, pos_impl="torch", cond=True, **kw) -> JiT:
    cfg = JiTConfig.preset("tiny", pos_embed=pos_embed, pos_impl=pos_impl, cond_img_size=8 if cond else None, **kw)
    torch.manual_seed(0)
    model = JiT(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the zero-initialised layers get weights, so every path carries signal
        for lin in [b.adaLN_modulation[-1] for b in model.blocks] + [
            model.final_layer.linear,
            model.final_layer.adaLN_modulation[-1],
        ]:
            for p in (lin.weight, lin.bias):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


# Mixed sizes, non-square, with the training size among them; condition sizes differ too, one is missing
# (null condition) and one is dropped by cond_drop.
MIXED = [(16, 16), (8, 24), (24, 16), (12, 20), (16, 16)]
MIXED_COND = [(8, 8), (8, 12), None, (12, 8), (4, 8)]
MIXED_DROP = [False, True, False, False, False]


def mixed_batch(seed=0, sizes=MIXED, cond_sizes=MIXED_COND, cond=True):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(3, h, w, generator=g) for h, w in sizes]
    S = len(xs)
    t = torch.rand(S, generator=g)
    y = torch.randint(0, 10, (S,), generator=g)  # 9 is the null class
    conds = drop = None
    if cond:
        conds = [None if c is None else torch.randn(3, *c, generator=g) for c in cond_sizes]
        drop = torch.tensor(MIXED_DROP[:S])
    return xs, t, y, conds, drop


def single(model, xs, t, y, conds, drop, s, **kw):
    """Sample s through the batched forward on its own."""
    c = None if conds is None or conds[s] is None else conds[s][None]
    d = None if c is None else drop[s : s + 1]
    return model(xs[s][None], t[s : s + 1], y[s : s + 1], cond=c, cond_drop=d, **kw)[0]


def packed_and_loop_grads(model, xs, t, y, conds, drop, **kw):
    """Parameter gradients of one random projection of the outputs, through the packed forward and through
    a loop of :func:`single` (same projection): ``(packed, loop)``, name -> gradient."""
    g = torch.Generator().manual_seed(5)
    ws = [torch.randn(x.shape, generator=g) for x in xs]

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    outs = model.forward_packed(xs, t, y, conds, cond_drop=drop, **kw)
    g_packed = grads(sum((o * w).sum() for o, w in zip(outs, ws)))
    g_loop = grads(sum((single(model, xs, t, y, conds, drop, s, **kw) * ws[s]).sum() for s in range(len(xs))))
    return g_packed, g_loop


# ----------------------------------------------------------------------------- layout
def test_layout_of_each_sample_is_its_sequence():
    grids, cond_grids, L = [(4, 4), (2, 6), (5, 3)], [(2, 2), None, (3, 1)], 3
    lay = PackedLayout.build(
        grids,
        cond_grids,
        context_len=L,
        train_grid=(4, 4),
        train_cond_grid=(2, 2),
        max_grid=(8, 8),
        max_cond_grid=(4, 4),
    )
    lens = [L + 16 + 4, L + 12, L + 15 + 3]
    assert lay.seqs.cu_seqlens.dtype == torch.int32
    assert lay.seqs.cu_seqlens.tolist() == [0, lens[0], lens[0] + lens[1], sum(lens)]
    assert lay.seqs.max_seqlen == max(lens) and lay.n_tokens == sum(lens)
    assert lay.seqs_in.cu_seqlens.tolist() == [0, 20, 32, 50] and lay.seqs_in.max_seqlen == 20
    check_cu_seqlens(lay.seqs.cu_seqlens, lay.n_tokens)
    for s, (grid, cg) in enumerate(zip(grids, cond_grids)):
        a, b = lay.seqs.cu_seqlens[s : s + 2].tolist()
        torch.testing.assert_close(lay.seqs.coords[a:b], sequence_coords(grid, prefix=L, cond_grid=cg), rtol=0, atol=0)
        assert (lay.seqs.seq_id[a:b] == s).all()
        a_in, b_in = lay.seqs_in.cu_seqlens[s : s + 2].tolist()
        torch.testing.assert_close(lay.seqs_in.coords[a_in:b_in], sequence_coords(grid, cond_grid=cg), rtol=0, atol=0)
    # Image tokens: where the full stream has them, their sample, their count.
    assert lay.image_tokens.tolist() == [16, 12, 15]
    assert lay.image_index.tolist() == (list(range(3, 19)) + list(range(26, 38)) + list(range(41, 56)))
    assert lay.image_seq_id.tolist() == [0] * 16 + [1] * 12 + [2] * 15
    assert lay.cond_seq_id.tolist() == [0] * 4 + [2] * 3
    # The gathers are permutations of their sources.
    assert sorted(lay.in_gather.tolist()) == list(range(43 + 7))
    assert sorted(lay.ctx_gather.tolist()) == list(range(3 * L + 50))
    # rows / cols: image (i, j); condition rows after the image table (max 8); learned1d slots.
    assert lay.rows[:16].tolist() == [i for i in range(4) for _ in range(4)]
    assert lay.cols[16:20].tolist() == [8, 9, 8, 9] and lay.rows[16:20].tolist() == [8, 8, 9, 9]
    assert lay.slots[16:20].tolist() == [16, 17, 18, 19]
    assert lay.rows[20:32].tolist() == [0] * 6 + [1] * 6 and lay.cols[20:32].tolist() == list(range(6)) * 2


def test_layout_interpolation_tables():
    lay = PackedLayout.build(
        [(4, 4), (6, 2), (6, 2), (2, 2)], scaling="interpolate", train_grid=(4, 4), max_grid=(8, 8)
    )
    assert lay.image_tables == ((6, 2), (2, 2))
    # Sample 1 reads the first resampled table (after the full 8-row table), sample 3 the second.
    assert lay.rows[16:28].tolist() == [8 + i for i in range(6) for _ in range(2)]
    assert lay.rows[40:44].tolist() == [14, 14, 15, 15] and lay.cols[40:44].tolist() == [10, 11, 10, 11]
    assert lay.slots[16:20].tolist() == [16, 17, 18, 19] and lay.slots[40:44].tolist() == [28, 29, 30, 31]
    # Coordinates laid onto the training grid: a 6x2 grid's columns at the centres of 4 columns.
    torch.testing.assert_close(lay.seqs.coords[16:18], torch.tensor([[-1 / 6, 0.5], [-1 / 6, 2.5]]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(img_grids=[]), "img_grids is empty"),
        (dict(img_grids=[(4, 0)]), r"img_grids\[0\]"),
        (dict(img_grids=[(4, 4), (3,)]), r"img_grids\[1\]"),
        (dict(img_grids=[(4, 4)], cond_grids=[(2, 2), (2, 2)]), "cond_grids must have one entry per image"),
        (dict(img_grids=[(4, 4)], cond_grids=[(2, -2)]), r"cond_grids\[0\]"),
        (dict(img_grids=[(4, 4)], context_len=-1), "context_len"),
        (dict(img_grids=[(4, 4)], scaling="stretch"), r"scaling \(pos_scaling\) of a packed batch must be one of"),
    ],
)
def test_layout_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PackedLayout.build(**kwargs)


@pytest.mark.parametrize(
    "cu, total, match",
    [
        (torch.tensor([0, 3, 5]), 5, "int32"),
        (torch.tensor([0], dtype=torch.int32), 0, "at least one sequence"),
        (torch.tensor([1, 3, 5], dtype=torch.int32), 5, "start at 0"),
        (torch.tensor([0, 3, 3, 5], dtype=torch.int32), 5, "strictly increasing"),
        (torch.tensor([0, 4, 2], dtype=torch.int32), 2, "strictly increasing"),
        (torch.tensor([0, 3, 5], dtype=torch.int32), 6, "end at the token count T = 6"),
    ],
)
def test_cu_seqlens_errors(cu, total, match):
    with pytest.raises(ValueError, match=match):
        check_cu_seqlens(cu, total)


def test_layout_moves_to_a_device_and_repeats():
    lay = PackedLayout.build([(2, 3), (1, 1)], context_len=2)
    moved = lay.to("cpu")
    assert torch.equal(moved.ctx_gather, lay.ctx_gather) and torch.equal(moved.seqs_in.coords, lay.seqs_in.coords)
    flat = PackedLayout.build([(2, 3), (1, 1)]).to("cpu")  # no in-context tokens: one stream
    assert flat.seqs_in is flat.seqs and lay.seqs_in is not lay.seqs
    two = lay.repeat(2)
    assert two.img_grids == lay.img_grids * 2 and lay.repeat(2) is two
    assert two.image_seq_id.tolist() == [0] * 6 + [1] + [2] * 6 + [3]


def test_patchify_is_the_model_token_order():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(3, 8, 12, generator=g)
    tok = patchify(img, 4)
    assert tok.shape == (6, 48)
    assert torch.equal(unpatchify(tok, (2, 3), 4), img)
    model = make_model("rope2d", cond=False)
    assert torch.equal(model.unpatchify(tok[None], (2, 3))[0], img)
    # The patch embedding on tokens is the convolution's.
    torch.testing.assert_close(
        model.x_embedder.forward_tokens(tok), model.x_embedder(img[None])[0], rtol=1e-6, atol=1e-6
    )
    imgs = [img, torch.randn(3, 4, 4, generator=g)]
    lay = PackedLayout.build([(2, 3), (1, 1)])
    back = unpack_images(pack_images(imgs, 4), lay, 4)
    assert all(torch.equal(a, b) for a, b in zip(back, imgs))


def test_pack_images_errors():
    with pytest.raises(ValueError, match="xs is empty"):
        pack_images([], 4, name="xs")
    with pytest.raises(ValueError, match=r"xs\[1\]: size 6x8 is not a positive multiple of the patch size 4"):
        pack_images([torch.zeros(3, 4, 4), torch.zeros(3, 6, 8)], 4, name="xs")
    with pytest.raises(ValueError, match=r"xs\[1\] must be a \[C=3, H, W\]"):
        pack_images([torch.zeros(3, 4, 4), torch.zeros(1, 4, 4)], 4, name="xs")


# ----------------------------------------------------------------------------- attention
LENGTHS = [5, 1, 17, 8, 12]


def qkv_views(T, H=2, D=16, dtype=torch.float32, seed=0):
    """q, k, v as strided [T, H, D] views of one fused [T, 3, H, D] projection (not contiguous)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(T, 3, H, D, generator=g, dtype=dtype)
    return qkv[:, 0], qkv[:, 1], qkv[:, 2]


def cu_of(lengths):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu


def attention_ref(q, k, v, cu):
    """Per sequence, in float64."""
    out = []
    b = cu.tolist()
    for a, e in zip(b[:-1], b[1:]):
        qs, ks, vs = (x[a:e].double().transpose(0, 1) for x in (q, k, v))
        w = (qs @ ks.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
        out.append((w @ vs).transpose(0, 1))
    return torch.cat(out)


@pytest.mark.parametrize("fp32_logits", [False, True])
@pytest.mark.parametrize("impl", ["auto", "mask", "loop"])
def test_varlen_attention_matches_per_sequence_reference(impl, fp32_logits):
    cu = cu_of(LENGTHS)
    q, k, v = qkv_views(int(cu[-1]))
    out = varlen_attention(q, k, v, cu, max(LENGTHS), impl=impl, fp32_logits=fp32_logits)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), attention_ref(q, k, v, cu), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["mask", "loop"])
def test_varlen_attention_gradcheck(impl):
    cu = cu_of([3, 1, 4])
    q, k, v = (x.clone().requires_grad_() for x in qkv_views(8, H=2, D=4, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda a, b, c: varlen_attention(a, b, c, cu, 4, impl=impl), (q, k, v))


@pytest.mark.parametrize("impl", ["mask", "loop"])
def test_varlen_attention_perturbing_one_sequence_leaves_the_others_bit_identical(impl):
    cu = cu_of(LENGTHS)
    q, k, v = (x.clone() for x in qkv_views(int(cu[-1])))
    out = varlen_attention(q, k, v, cu, max(LENGTHS), impl=impl)
    a, b = cu[2].item(), cu[3].item()  # sequence 2
    for x in (q, k, v):
        x[a:b] += torch.randn(b - a, *x.shape[1:])
    out2 = varlen_attention(q, k, v, cu, max(LENGTHS), impl=impl)
    assert not torch.equal(out2[a:b], out[a:b])
    assert torch.equal(out2[:a], out[:a]) and torch.equal(out2[b:], out[b:])


def test_varlen_attention_auto_and_mask():
    q = torch.zeros(4, 1, 8)
    assert resolve_varlen_impl("auto", q) == "loop"  # eager CPU: measured faster (attention.py)
    assert resolve_varlen_impl("mask", q) == "mask"
    assert block_diagonal_mask(cu_of([2, 1]), 3).tolist() == [
        [True, True, False],
        [True, True, False],
        [False, False, True],
    ]
    assert set(VARLEN_IMPLS) == {"auto", "varlen", "mask", "loop"}


def test_varlen_attention_errors():
    cu = cu_of([2, 2])
    q, k, v = qkv_views(4)
    with pytest.raises(ValueError, match="impl must be one of"):
        varlen_attention(q, k, v, cu, 2, impl="flash")
    with pytest.raises(ValueError, match="cu_seqlens must be an int32"):
        varlen_attention(q, k, v, cu.long(), 2)
    with pytest.raises(ValueError, match=r"q, k, v must be \[T, H, D\]"):
        varlen_attention(q, k[:3], v, cu, 2)
    with pytest.raises(ValueError, match="impl='varlen'.*needs CUDA"):
        varlen_attention(q, k, v, cu, 2, impl="varlen")
    with pytest.raises(ValueError, match="cu_seqlens must end at the token count T = 4"):
        varlen_attention(q, k, v, cu_of([2, 1]), 2)
    with pytest.raises(ValueError, match="cu_seqlens must be strictly increasing"):
        varlen_attention(q, k, v, torch.tensor([0, 3, 2, 4], dtype=torch.int32), 2)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_attn_on_cuda_matches_the_loop(dtype):
    cu = cu_of(LENGTHS).cuda()
    q, k, v = (x.cuda() for x in qkv_views(int(cu[-1].item()), H=2, D=64, dtype=dtype))
    assert resolve_varlen_impl("auto", q) == "varlen"
    out = varlen_attention(q, k, v, cu, max(LENGTHS), impl="varlen")
    ref = attention_ref(q, k, v, cu.cpu())
    eager = varlen_attention(q, k, v, cu, max(LENGTHS), impl="loop")
    from conftest import assert_kernel_error_within_eager

    assert_kernel_error_within_eager("varlen_attn", out.cpu(), eager.cpu(), ref)


# ----------------------------------------------------------------------------- model
@pytest.mark.parametrize("cond", [False, True], ids=["nocond", "cond"])
@pytest.mark.parametrize("pos_embed, pos_impl", ENC_IMPL)
def test_packed_batch_of_one_size_is_the_batched_forward(pos_embed, pos_impl, cond):
    model = make_model(pos_embed, pos_impl, cond)
    g = torch.Generator().manual_seed(3)
    B = 4
    x, t = torch.randn(B, 3, 16, 16, generator=g), torch.rand(B, generator=g)
    y = torch.randint(0, 10, (B,), generator=g)
    c = torch.randn(B, 3, 8, 8, generator=g) if cond else None
    drop = torch.tensor([False, True, False, True]) if cond else None
    ref = model(x, t, y, cond=c, cond_drop=drop)
    outs = model.forward_packed(list(x), t, y, None if c is None else list(c), cond_drop=drop)
    torch.testing.assert_close(torch.stack(outs), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cond", [False, True], ids=["nocond", "cond"])
@pytest.mark.parametrize("pos_embed, pos_impl", ENC_IMPL)
def test_packed_mixed_sizes_are_a_loop_over_single_images(pos_embed, pos_impl, cond):
    # learned1d has slots for the training grid only: other sizes need interpolation (as in the batched path).
    scaling = "interpolate" if pos_embed == "learned1d" else "extrapolate"
    model = make_model(pos_embed, pos_impl, cond)
    xs, t, y, conds, drop = mixed_batch(cond=cond)
    outs = model.forward_packed(xs, t, y, conds, cond_drop=drop, pos_scaling=scaling)
    assert [o.shape for o in outs] == [x.shape for x in xs]
    for s in range(len(xs)):
        ref = single(model, xs, t, y, conds, drop, s, pos_scaling=scaling)
        torch.testing.assert_close(outs[s], ref, rtol=1e-5, atol=1e-6, msg=f"sample {s}")


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("pos_embed", ["sincos2d+rope2d", "factorized2d", "rope2d_mixed"])
def test_packed_mixed_sizes_in_other_dtypes(pos_embed, dtype, tol):
    model = make_model(pos_embed, "torch", True).to(dtype)
    xs, t, y, conds, drop = mixed_batch(seed=4)
    xs, conds, t = [x.to(dtype) for x in xs], [c if c is None else c.to(dtype) for c in conds], t.to(dtype)
    outs = model.forward_packed(xs, t, y, conds, cond_drop=drop)
    for s in range(len(xs)):
        ref = single(model, xs, t, y, conds, drop, s)
        assert outs[s].dtype == dtype
        torch.testing.assert_close(outs[s], ref, rtol=tol, atol=tol, msg=f"sample {s}")


@pytest.mark.parametrize("pos_embed", ENCODINGS)
def test_packed_interpolation_is_a_loop_over_single_images(pos_embed):
    model = make_model(pos_embed, "torch", True)
    xs, t, y, conds, drop = mixed_batch(seed=1)
    outs = model.forward_packed(xs, t, y, conds, cond_drop=drop, pos_scaling="interpolate")
    for s in range(len(xs)):
        ref = single(model, xs, t, y, conds, drop, s, pos_scaling="interpolate")
        torch.testing.assert_close(outs[s], ref, rtol=1e-5, atol=1e-6, msg=f"sample {s}")


@pytest.mark.parametrize("packed_attn", ["mask", "loop"])
@pytest.mark.parametrize(
    "pos_embed, pos_impl",
    [("sincos2d+rope2d", "torch"), ("factorized2d", "torch"), pytest.param("rope2d", "fused", marks=needs_extension)],
)
def test_perturbing_one_image_leaves_the_others_bit_identical(pos_embed, pos_impl, packed_attn):
    model = make_model(pos_embed, pos_impl, True, packed_attn=packed_attn)
    xs, t, y, conds, drop = mixed_batch()
    outs = model.forward_packed(xs, t, y, conds, cond_drop=drop)
    xs2, conds2 = list(xs), list(conds)
    xs2[3] = xs[3] + torch.randn(xs[3].shape)
    conds2[3] = conds[3] + 1.0
    outs2 = model.forward_packed(xs2, t, y, conds2, cond_drop=drop)
    assert not torch.equal(outs2[3], outs[3])
    for s in (0, 1, 2, 4):
        assert torch.equal(outs2[s], outs[s]), f"sample {s} changed"


@pytest.mark.parametrize(
    "pos_embed, pos_impl",
    [
        ("sincos2d+rope2d", "torch"),
        ("rope2d_mixed", "torch"),
        ("factorized2d", "torch"),
        ("learned1d", "torch"),
        pytest.param("sincos2d+rope2d", "fused", marks=needs_extension),
        pytest.param("rope2d_mixed", "fused", marks=needs_extension),
    ],
)
def test_gradients_of_a_packed_batch_are_those_of_the_loop(pos_embed, pos_impl):
    scaling = "interpolate" if pos_embed == "learned1d" else "extrapolate"
    model = make_model(pos_embed, pos_impl, True)
    xs, t, y, conds, drop = mixed_batch(seed=2)
    g_packed, g_loop = packed_and_loop_grads(model, xs, t, y, conds, drop, pos_scaling=scaling)
    assert set(g_packed) == set(g_loop)
    for name, gl in g_loop.items():
        torch.testing.assert_close(g_packed[name], gl, rtol=1e-4, atol=1e-5, msg=name)
    # Every parameter the model uses is reached (the null condition too: sample 1 is dropped, 2 has none).
    used = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(g_packed) == used
    assert all(g_packed[n].abs().sum() > 0 for n in used), [n for n in used if g_packed[n].abs().sum() == 0]


def test_forward_packed_errors_name_the_argument():
    model = make_model("rope2d", cond=True)
    x, t, y = torch.randn(3, 16, 16), torch.rand(2), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="xs must be a non-empty list"):
        model.forward_packed([], t, y)
    with pytest.raises(ValueError, match=r"xs\[1\] must be a \[3, H, W\] image"):
        model.forward_packed([x, torch.randn(1, 16, 16)], t, y)
    with pytest.raises(ValueError, match="sample 1: image size 16x18 is not a positive multiple of patch_size=4"):
        model.forward_packed([x, torch.randn(3, 16, 18)], t, y)
    with pytest.raises(ValueError, match="conds must have one entry"):
        model.forward_packed([x, x], t, y, [None])
    with pytest.raises(ValueError, match="sample 0: condition image size 6x8"):
        model.forward_packed([x, x], t, y, [torch.randn(3, 6, 8), None])
    with pytest.raises(ValueError, match="sample 1: the null condition has no integer grid"):
        model.forward_packed([x, torch.randn(3, 12, 12)], t, y)
    with pytest.raises(ValueError, match=r"t must be \[S=2\]"):
        model.forward_packed([x, x], torch.rand(3), y)
    with pytest.raises(ValueError, match=r"cond_drop must be a \[S=2\] bool"):
        model.forward_packed([x, x], t, y, [torch.randn(3, 8, 8)] * 2, cond_drop=torch.zeros(2))
    with pytest.raises(ValueError, match="model has no condition image"):
        make_model("rope2d", cond=False).forward_packed([x, x], t, y, [torch.randn(3, 8, 8)] * 2)
    with pytest.raises(ValueError, match="learned1d.*cannot extrapolate"):
        make_model("learned1d", cond=False).forward_packed([x, torch.randn(3, 8, 16)], t, y)
    with pytest.raises(ValueError, match="factorized2d.*image \\(sample 1\\) grid \\(10, 4\\) is larger"):
        make_model("factorized2d", cond=False).forward_packed([x, torch.randn(3, 40, 16)], t, y)
    with pytest.raises(ValueError, match="img_sizes is empty"):
        model.packed_layout([])
    lay = model.packed_layout([(16, 16)])
    with pytest.raises(ValueError, match=r"x must be pixel tokens \[T_img=16, 48\]"):
        model.forward_tokens(torch.zeros(15, 48), torch.rand(1), layout=lay)


# ----------------------------------------------------------------------------- diffusion on packed tokens
def test_packed_loss_of_one_size_is_the_batched_loss():
    model = make_model("sincos2d+rope2d", "torch", True)
    d = Diffusion()
    g = torch.Generator().manual_seed(4)
    B = 4
    x, c = torch.randn(B, 3, 16, 16, generator=g), torch.randn(B, 3, 8, 8, generator=g)
    y, t = torch.randint(0, 10, (B,), generator=g), torch.rand(B, generator=g)
    noise, drop = torch.randn(x.shape, generator=g), torch.tensor([True, False, False, True])
    ref = d.loss(model, x, y, c, drop, t=t, noise=noise)
    lay = model.packed_layout([(16, 16)] * B, [(8, 8)] * B)
    loss = d.loss(
        model.forward_tokens,
        pack_images(list(x), 4),
        y,
        pack_images(list(c), 4),
        drop,
        t=t,
        noise=pack_images(list(noise), 4),
        layout=lay,
    )
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)


def test_packed_loss_is_the_mean_over_every_pixel():
    d = Diffusion(noise_scale=1.5)
    sizes = [(8, 8), (4, 12), (12, 4)]
    lay = PackedLayout.build([(h // 4, w // 4) for h, w in sizes])
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, *s, generator=g) for s in sizes]
    ns = [torch.randn(3, *s, generator=g) for s in sizes]
    t = torch.tensor([0.2, 0.7, 0.97])
    seen = {}

    def net(z, t_, y, cond, cond_drop=None, layout=None):
        seen["t"], seen["layout"] = t_, layout
        return 0.5 * z  # any prediction that depends on z

    loss = d.loss(net, pack_images(xs, 4), torch.zeros(3, dtype=torch.long), t=t, noise=pack_images(ns, 4), layout=lay)
    assert seen["t"] is t and seen["layout"] is lay  # the network sees one t per sample
    sq, n = 0.0, 0
    for x, e, ts in zip(xs, ns, t.tolist()):
        z = ts * x + (1 - ts) * 1.5 * e
        err = (x - 0.5 * z) / max(1 - ts, 0.05)
        sq, n = sq + err.double().pow(2).sum(), n + x.numel()
    torch.testing.assert_close(loss.double(), sq / n, rtol=1e-6, atol=0)


@pytest.mark.parametrize("with_cond", [True, False], ids=["cond", "nullcond"])
@pytest.mark.parametrize("shift", ["none", "sqrt_tokens"])
@pytest.mark.parametrize("sampler, cfg", [("heun", 2.5), ("euler", 1.0)])
def test_packed_sampler_is_a_loop_over_single_images(sampler, cfg, shift, with_cond):
    model = make_model("rope2d", "torch", True).eval()
    d = Diffusion(shift=shift, shift_ref_tokens=16)
    sizes, csizes = [(16, 16), (8, 24), (24, 16)], [(8, 8), (4, 4), (12, 8)]
    g = torch.Generator().manual_seed(6)
    noise = [torch.randn(3, *s, generator=g) for s in sizes]
    conds = [torch.randn(3, *c, generator=g) for c in csizes] if with_cond else [None] * 3
    y = torch.tensor([1, 9, 4])
    lay = model.packed_layout(sizes, csizes if with_cond else None)
    cond_tok = pack_images(conds, 4) if with_cond else None
    z = d.sample(
        model.forward_tokens,
        y,
        cond_tok,
        noise=pack_images(noise, 4),
        steps=3,
        sampler=sampler,
        cfg=cfg,
        null_class=9,
        layout=lay,
    )
    outs = unpack_images(z, lay, 4)
    for s, size in enumerate(sizes):
        c = None if conds[s] is None else conds[s][None]
        ref = d.sample(
            model,
            y[s : s + 1],
            c,
            noise=noise[s][None],
            steps=3,
            sampler=sampler,
            cfg=cfg,
            null_class=9,
            n_tokens=(size[0] // 4) * (size[1] // 4),
        )[0]
        torch.testing.assert_close(outs[s], ref, rtol=1e-5, atol=1e-5, msg=f"sample {s}")
