"""JiT model and its positional encodings (docs/ops.md and docs/training.md).

Everything runs on tiny configs (16x16 images, 4x4 grid) on the CPU. Tests that compare
``pos_impl="fused"`` with ``pos_impl="torch"`` need the extension's kernels; they are skipped only
when the extension is not loaded at all (then "fused" would silently be the reference).
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from conftest import DEVICES

import jitrope
from jitrope import ops, posenc, reference
from jitrope.model import PRESETS, JiT, JiTConfig
from jitrope.posenc import POS_EMBEDS, SeqLayout, sincos_2d
from jitrope.rope import axial_freqs

ENCODINGS = list(POS_EMBEDS)
ROTARY = [e for e in ENCODINGS if "rope" in e]

needs_extension = pytest.mark.skipif(
    not jitrope.HAS_EXTENSION, reason=f"jitrope._C not loaded: {jitrope.EXTENSION_ERROR}"
)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(pos_embed: str, *, pos_impl: str = "torch", **kw) -> JiTConfig:
    return JiTConfig.preset("tiny", pos_embed=pos_embed, pos_impl=pos_impl, **kw)


def build(cfg: JiTConfig, seed: int = 0) -> JiT:
    torch.manual_seed(seed)
    return JiT(cfg)


def perturb_zero_init(model: JiT, seed: int = 1, std: float = 0.05) -> JiT:
    """Give the adaLN-Zero and final layers non-zero weights so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    layers = [b.adaLN_modulation[-1] for b in model.blocks]
    layers += [model.final_layer.adaLN_modulation[-1], model.final_layer.linear]
    with torch.no_grad():
        for lin in layers:
            for p in (lin.weight, lin.bias):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


def make_batch(cfg: JiTConfig, B: int = 3, seed: int = 0, *, img_hw=None, cond_hw=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    H, W = img_hw or (cfg.img_size, cfg.img_size)
    x = torch.randn(B, 3, H, W, generator=g, dtype=dtype)
    t = torch.rand(B, generator=g, dtype=dtype)
    y = torch.randint(0, cfg.num_classes, (B,), generator=g)
    y[-1] = cfg.num_classes  # one null label, as label dropout would produce
    cond = None
    if cfg.cond_img_size is not None:
        ch, cw = cond_hw or (cfg.cond_img_size, cfg.cond_img_size)
        cond = torch.randn(B, 3, ch, cw, generator=g, dtype=dtype)
    return x, t, y, cond


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("mode", ["none", "class", "class+cond"])
@pytest.mark.parametrize("pos_embed", ENCODINGS)
def test_forward_shapes(pos_embed, mode):
    cfg = tiny(pos_embed, cond_img_size=8 if mode == "class+cond" else None)
    model = perturb_zero_init(build(cfg))
    x, t, y, cond = make_batch(cfg)
    if mode == "none":
        y = None  # all null class: unconditional
    out = model(x, t, y, cond=cond)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    assert out.abs().sum() > 0
    if mode == "class+cond":
        out_drop = model(x, t, y, cond=cond, cond_drop=torch.tensor([True, False, True]))
        assert out_drop.shape == x.shape


@pytest.mark.parametrize("pos_embed", ENCODINGS)
def test_zero_init_output_is_exactly_zero(pos_embed):
    cfg = tiny(pos_embed, cond_img_size=8)
    model = build(cfg)
    x, t, y, cond = make_batch(cfg)
    out = model(x, t, y, cond=cond)
    assert torch.equal(out, torch.zeros_like(out))


# ----------------------------------------------------------------------------- sequence layout
@pytest.mark.parametrize("pos_embed", ["learned1d", "factorized2d", "sincos2d+rope2d"])
def test_sequence_is_context_plus_256_plus_64(pos_embed):
    # The problem statement's setting: 64x64 at patch 4 (256 tokens) + a 32x32 condition (64 tokens).
    cfg = JiTConfig(
        img_size=64,
        patch_size=4,
        hidden_size=32,
        depth=2,
        num_heads=2,
        bottleneck_dim=16,
        in_context_len=4,
        in_context_start=1,
        pos_embed=pos_embed,
        pos_impl="torch",
        cond_img_size=32,
    )
    model = build(cfg)
    layout = model.sequence_layout()
    assert (layout.n_image, layout.n_cond, layout.prefix) == (256, 64, 4)
    assert layout.n_tokens == 4 + 256 + 64
    assert layout.segments == {"context": (0, 4), "image": (4, 260), "cond": (260, 324)}

    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1])) for b in model.blocks]
    x, t, y, cond = make_batch(cfg, B=2)
    model(x, t, y, cond=cond)
    for h in hooks:
        h.remove()
    assert seen == [256 + 64, 4 + 256 + 64]  # in-context tokens join at block in_context_start


def test_rope_coords_of_each_segment():
    cfg = JiTConfig(
        img_size=64,
        patch_size=4,
        hidden_size=32,
        depth=2,
        num_heads=2,
        bottleneck_dim=16,
        in_context_len=4,
        in_context_start=1,
        pos_embed="rope2d",
        pos_impl="torch",
        cond_img_size=32,
    )
    model = build(cfg)
    layout = model.sequence_layout()
    coords = layout.coords(layout.prefix)
    assert coords.shape == (324, 2) and coords.dtype == torch.float32
    assert torch.equal(coords[:4], torch.zeros(4, 2))  # in-context: identity rotation
    img = coords[4:260]
    assert torch.equal(img[17], torch.tensor([1.0, 1.0]))  # token 17 sits under token 1
    assert torch.equal(img[-1], torch.tensor([15.0, 15.0]))
    cond = coords[260:]  # 8x8 grid over the 16x16 image grid: centres at 2i + 0.5
    assert torch.equal(cond[0], torch.tensor([0.5, 0.5]))
    assert torch.equal(cond[9], torch.tensor([2.5, 2.5]))
    assert torch.equal(cond[-1], torch.tensor([14.5, 14.5]))
    assert layout.coords(0).shape == (320, 2)
    rope = model.pos.rotary
    torch.testing.assert_close(rope.coords, coords, rtol=0, atol=0)  # the training sequence's buffer
    assert build(dataclasses.replace(cfg, pos_embed="factorized2d")).pos.rotary is None


# ----------------------------------------------------------------------------- fused == torch
def _pair(pos_embed: str, dtype: torch.dtype):
    cfg_t = tiny(pos_embed, cond_img_size=8)
    ref = perturb_zero_init(build(cfg_t)).to(dtype)
    fused = JiT(dataclasses.replace(cfg_t, pos_impl="fused")).to(dtype)
    fused.load_state_dict(ref.state_dict())
    assert fused.pos_impl == "fused"
    return ref, fused


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pos_embed", ENCODINGS)
def test_fused_matches_torch_forward_and_grads(device, pos_embed):
    ref, fused = (m.to(device) for m in _pair(pos_embed, torch.float64))
    x, t, y, cond = (a.to(device) for a in make_batch(ref.cfg, dtype=torch.float64))
    drop = torch.tensor([False, True, False], device=device)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    outs = [m(xi, t, y, cond=cond, cond_drop=drop) for m, xi in zip((ref, fused), xs)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-12)
    w = torch.randn_like(outs[0])
    for o in outs:
        (o * w).sum().backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-9, atol=1e-12)
    for (name, p_ref), p_fused in zip(ref.named_parameters(), fused.parameters()):
        assert p_fused.grad is not None, name
        torch.testing.assert_close(p_fused.grad, p_ref.grad, rtol=1e-9, atol=1e-12, msg=name)


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pos_embed", ["factorized2d", "rope2d", "rope2d_mixed"])
def test_fused_matches_torch_float32(device, pos_embed):
    ref, fused = (m.to(device) for m in _pair(pos_embed, torch.float32))
    x, t, y, cond = (a.to(device) for a in make_batch(ref.cfg))
    torch.testing.assert_close(fused(x, t, y, cond=cond), ref(x, t, y, cond=cond), rtol=1e-4, atol=1e-5)


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pos_embed", ["factorized2d", "rope2d", "sincos2d+rope2d"])
def test_bf16_autocast_train_steps_fused_track_torch(device, pos_embed):
    """A few AdamW steps under bf16 autocast (as on a GPU): the fused and torch models stay close."""
    ref, fused = (m.to(device) for m in _pair(pos_embed, torch.float32))
    x, t, y, cond = (a.to(device) for a in make_batch(ref.cfg, B=4))
    losses = {}
    for name, m in (("torch", ref), ("fused", fused)):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        losses[name] = []
        for _ in range(3):
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                loss = (m(x, t, y, cond=cond).float() - x).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses[k])).all() for k in losses)
    torch.testing.assert_close(torch.tensor(losses["fused"]), torch.tensor(losses["torch"]), rtol=2e-2, atol=1e-3)


class _Counting:
    """Records how the model calls a position op (shapes, dtypes), then runs the reference."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append(
            (
                [a.shape if torch.is_tensor(a) else a for a in args],
                [a.dtype for a in args if torch.is_tensor(a)],
                kwargs,
            )
        )
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("pos_embed", ["rope2d_mixed", "sincos2d+rope2d", "factorized2d"])
@pytest.mark.parametrize("autocast", [False, True])
def test_ops_are_called_once_per_layer_with_explicit_casts(monkeypatch, pos_embed, autocast):
    rope, p2d = _Counting(reference.qk_norm_rope_ref), _Counting(reference.pos2d_add_ref)
    monkeypatch.setattr(posenc, "HAS_EXTENSION", True)
    monkeypatch.setattr(ops, "qk_norm_rope", rope)
    monkeypatch.setattr(ops, "pos2d_add", p2d)
    cfg = tiny(pos_embed, pos_impl="fused", cond_img_size=8)
    model = perturb_zero_init(build(cfg))
    x, t, y, cond = make_batch(cfg, B=2)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x, t, y, cond=cond)
    out.float().sum().backward()
    act = torch.bfloat16 if autocast else torch.float32
    L, H, D = cfg.in_context_len, cfg.num_heads, cfg.head_dim
    # one qk_norm_rope call per attention layer, q and k together; every encoding normalises
    # through it, and only the rotary ones pass coords and freqs
    assert len(rope.calls) == cfg.depth
    for i, (shapes, dtypes, _) in enumerate(rope.calls):
        n = 16 + 4 + (L if i >= cfg.in_context_start else 0)
        assert shapes[0] == (2, 2, H, n, D)
        assert shapes[1] == (2, D)
        if "rope" in pos_embed:
            assert dtypes == [act, torch.float32, torch.float32, torch.float32]  # weight, coords, freqs float32
        else:
            assert dtypes == [act, torch.float32] and shapes[2:] == [None, None]
    if pos_embed == "factorized2d":
        assert len(p2d.calls) == 2  # image grid, then the condition grid at its token offset
        (s0, d0, k0), (s1, d1, k1) = p2d.calls
        assert s0[3] == (4, 4) and k0 == {} and s1[3] == (2, 2) and k1 == {"token_offset": 16}
        assert d0 == d1 == [act, act, act]  # tables cast to x's dtype
    else:
        assert not p2d.calls


def _qkv_view(B=3, H=2, N=7, D=8, dtype=torch.float32, seed=0):
    """The strided q/k view of a fused qkv projection, ``[2, B, H, N, D]`` (not contiguous)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, N, 3 * H * D, generator=g, dtype=torch.float64).to(dtype)
    return qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)[:2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_head", [False, True])
def test_qk_norm_rope_tables_is_norm_then_rope2d_ref(dtype, per_head):
    qk = _qkv_view(dtype=dtype)
    assert not qk.is_contiguous()
    H, N, D = qk.shape[-3:]
    g = torch.Generator().manual_seed(1)
    weight = 1 + 0.3 * torch.randn(2, D, generator=g)
    coords = torch.rand(N, 2, generator=g) * 6 - 1
    freqs = torch.randn(H, 2, D // 2, generator=g) if per_head else axial_freqs(D)
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def norm(x, w, to):  # docs/ops.md's norm, statistics in `to`
        h = x.to(to)
        return w.to(to).view(2, 1, 1, 1, D) * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))

    cos_sin = posenc.rope_cos_sin(coords, freqs, acc)
    out = posenc.qk_norm_rope_tables(qk, weight, cos_sin, 1e-6)
    assert out.dtype == dtype and out.shape == qk.shape and out.is_contiguous()
    # Same arithmetic as the reference rotation in the same precision: equal bit for bit.
    expect = reference.rope2d_ref(norm(qk, weight, acc), coords, freqs).to(dtype)
    assert torch.equal(out, expect)
    # And against float64 within the output dtype's rounding.
    exact = reference.rope2d_ref(norm(qk, weight.double(), torch.float64), coords.double(), freqs.double())
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(out.double(), exact, rtol=tol, atol=tol)
    no_rot = posenc.qk_norm_rope_tables(qk, weight, None, 1e-6)
    assert torch.equal(no_rot, norm(qk, weight, acc).to(dtype))
    empty = posenc.qk_norm_rope_tables(_qkv_view(B=0, dtype=dtype), weight, cos_sin, 1e-6)
    assert empty.shape == (2, 0, H, N, D)


class _CountCalls:
    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __call__(self, *args, **kwargs):
        self.n += 1
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("pos_embed", ["rope2d", "sincos2d+rope2d", "rope2d_mixed"])
def test_torch_path_keeps_rope_tables(monkeypatch, pos_embed):
    """cos/sin are made once per grid (buffers at the training size), per layer and forward while
    RoPE-Mixed's frequencies train, and again only when the grid or the frequencies change."""
    cfg = tiny(pos_embed, cond_img_size=8)
    model = perturb_zero_init(build(cfg))
    made = _CountCalls(posenc.rope_cos_sin)
    monkeypatch.setattr(posenc, "rope_cos_sin", made)
    x, t, y, cond = make_batch(cfg)
    mixed = pos_embed == "rope2d_mixed"

    model(x, t, y, cond=cond).sum().backward()  # training: tables that need gradients are made per call
    assert made.n == (cfg.depth if mixed else 0)
    if mixed:
        assert model.pos.rotary.freqs.grad.abs().sum() > 0
    made.n = 0
    with torch.no_grad():
        a = model(x, t, y, cond=cond)
        n_first = made.n
        b = model(x, t, y, cond=cond)
    assert n_first == (cfg.depth if mixed else 0) and made.n == n_first  # kept across no-grad calls
    assert torch.equal(a, b)
    if mixed:
        with torch.no_grad():
            model.pos.rotary.freqs.mul_(1.5)  # an optimizer step: the tables follow
            c = model(x, t, y, cond=cond)
        assert made.n == 2 * n_first and not torch.equal(c, a)

    made.n = 0
    xb, tb, yb, cb = make_batch(cfg, img_hw=(24, 24), cond_hw=(12, 12))
    with torch.no_grad():
        model(xb, tb, yb, cond=cb)
        n_big = made.n
        model(xb, tb, yb, cond=cb)
    # One table per layer (mixed) or per sequence length (with and without in-context tokens).
    assert n_big == (cfg.depth if mixed else 2) and made.n == n_big


@pytest.mark.parametrize("pos_embed", ["sincos2d+rope2d", "factorized2d"])
def test_tables_kept_under_inference_mode_do_not_reach_autograd(pos_embed):
    # Sampling under inference_mode, then training at the same size: a table kept from the first
    # call would be an inference tensor, which autograd refuses to save.
    cfg = tiny(pos_embed, cond_img_size=8)
    model = perturb_zero_init(build(cfg))
    for p in model.pos.parameters():
        p.requires_grad_(False)  # frozen tables are kept across calls even with grad enabled
    x, t, y, cond = make_batch(cfg, img_hw=(24, 24), cond_hw=(12, 12))
    with torch.inference_mode():
        ref = model(x, t, y, cond=cond)
    xg = x.clone().requires_grad_(True)
    out = model(xg, t, y, cond=cond)
    out.sum().backward()
    assert xg.grad is not None
    torch.testing.assert_close(out.detach(), ref)


def test_torch_path_keeps_summed_factorized_tables(monkeypatch):
    cfg = tiny("factorized2d", cond_img_size=8)
    model = perturb_zero_init(build(cfg))
    part = model.pos.parts["factorized2d"]
    summed = _CountCalls(part._summed)
    monkeypatch.setattr(part, "_summed", summed)
    h = torch.randn(3, 16 + 4, cfg.hidden_size)
    layout = model.sequence_layout()
    # The reference op, segment by segment: bit for bit.
    ref = reference.pos2d_add_ref(h, part.pos_h, part.pos_w, (4, 4))
    ref = reference.pos2d_add_ref(ref, part.cond_pos_h, part.cond_pos_w, (2, 2), token_offset=16)
    assert torch.equal(model.pos.add(h, layout), ref)
    assert torch.equal(model.pos.add(h, layout), ref)
    assert summed.n == 2  # the tables train: made in every call
    with torch.no_grad():
        model.pos.add(h, layout)
        model.pos.add(h, layout)
        assert summed.n == 3
        part.cond_pos_w.add_(1.0)
        changed = model.pos.add(h, layout)
        assert summed.n == 4
        torch.testing.assert_close(changed[:, 16:], ref[:, 16:] + 1.0)
        assert torch.equal(changed[:, :16], ref[:, :16])


def test_rope_tables_follow_device_and_dtype_casts():
    model = build(tiny("sincos2d+rope2d", cond_img_size=8))
    rope, D = model.pos.rotary, model.cfg.head_dim
    assert rope.cos.dtype == rope.freqs.dtype == torch.float32 and rope.cos.shape == (1, 4 + 16 + 4, D // 2)
    model.to(torch.bfloat16)  # a model cast wholesale keeps float32 angles (docs/ops.md)
    assert rope.cos.dtype == rope.freqs.dtype == rope.coords.dtype == torch.float32
    model.to(torch.float64)
    assert rope.cos.dtype == rope.freqs.dtype == torch.float64
    torch.testing.assert_close(rope.freqs, axial_freqs(D, dtype=torch.float64), rtol=0, atol=0)
    exact = posenc.rope_cos_sin(
        model.sequence_layout().coords(4).double(), axial_freqs(D, dtype=torch.float64), torch.float64
    )
    torch.testing.assert_close(rope.cos, exact[0], rtol=0, atol=0)
    model.to(torch.float32)
    x, t, y, cond = make_batch(model.cfg)
    assert model(x, t, y, cond=cond).dtype == torch.float32
    assert "cos" not in model.state_dict() and not any("coords" in k for k in model.state_dict())


def test_qk_of_the_wrong_length_is_refused():
    model = build(tiny("rope2d"))
    layout = model.sequence_layout()
    qk = _qkv_view(B=2, H=2, N=layout.n_tokens - 1, D=32)
    with pytest.raises(ValueError, match="does not fit the sequence layout"):
        model.pos.qk_norm_rope(qk, model.blocks[0].attn.qk_norm.weight, 0, layout)


def test_fused_without_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(posenc, "HAS_EXTENSION", False)
    monkeypatch.setattr(posenc, "_warned_fallback", False)
    with pytest.warns(RuntimeWarning, match="pos_impl='torch'"):
        model = JiT(tiny("rope2d", pos_impl="fused"))
    assert model.pos_impl == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        JiT(tiny("factorized2d", pos_impl="fused"))


# ----------------------------------------------------------------------------- init, params, grads
def test_jit_b16_parameter_count_matches_paper():
    # Li & He 2025, Table: JiT-B/16 131M, JiT-L/16 459M, JiT-H/16 953M (meta device: no memory).
    for name, millions in (("JiT-B/16", 131), ("JiT-L/16", 459), ("JiT-H/16", 953)):
        with torch.device("meta"):
            model = JiT(JiTConfig.preset(name, pos_impl="torch"))
        n = sum(p.numel() for p in model.parameters()) / 1e6
        assert abs(n - millions) < 1.0, (name, n)


def test_paper_details():
    cfg = JiTConfig.preset("JiT-B/16", pos_impl="torch")
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.bottleneck_dim) == (12, 768, 12, 128)
    assert (cfg.in_context_len, cfg.in_context_start, cfg.pos_embed) == (32, 4, "sincos2d+rope2d")
    assert cfg.mlp_hidden == 2048
    assert JiTConfig.preset("JiT-H/16").proj_dropout == 0.2
    model = build(tiny("rope2d", depth=8, attn_dropout=0.1, proj_dropout=0.2))
    drops = [(b.attn.attn_drop, b.attn.proj_drop.p, b.mlp.ffn_dropout.p) for b in model.blocks]
    assert drops == [(0.0, 0.0, 0.0)] * 2 + [(0.1, 0.2, 0.2)] * 4 + [(0.0, 0.0, 0.0)] * 2
    assert model.y_embedder.embedding_table.num_embeddings == model.cfg.num_classes + 1
    assert model.blocks[0].attn.qkv.bias is not None
    assert model.blocks[0].norm1.eps == 1e-6 and model.x_embedder.proj1.bias is None


@pytest.mark.parametrize("pos_embed", ENCODINGS)
def test_gradients_reach_every_parameter(pos_embed):
    cfg = tiny(pos_embed, cond_img_size=8)
    model = perturb_zero_init(build(cfg))
    x, t, y, cond = make_batch(cfg, B=4)
    out = model(x, t, y, cond=cond, cond_drop=torch.tensor([False, True, False, False]))
    (out**2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_every_parameter_is_in_the_graph_without_dropped_conditions():
    # DDP (find_unused_parameters=False) fails on a parameter that no step's graph reaches.
    cfg = tiny("factorized2d", cond_img_size=8)
    model = perturb_zero_init(build(cfg))
    x, t, y, cond = make_batch(cfg)
    model(x, t, y, cond=cond).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("pos_embed", ENCODINGS)
def test_small_model_overfits_one_batch(pos_embed):
    # x-prediction MSE at fixed, low noise levels: the model must memorise 4 images.
    cfg = tiny(pos_embed, cond_img_size=8)
    model = build(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.interpolate(torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, size=16, mode="nearest")
    cond = torch.rand(4, 3, 8, 8, generator=g)
    t = torch.tensor([0.05, 0.1, 0.2, 0.3])
    z = t.view(-1, 1, 1, 1) * x + (1 - t.view(-1, 1, 1, 1)) * torch.randn(x.shape, generator=g)
    y = torch.tensor([0, 1, 2, cfg.num_classes])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(120):
        loss = ((model(z, t, y, cond=cond) - x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


# ----------------------------------------------------------------------------- conditioning
@pytest.mark.parametrize("null_cond", ["learned", "zeros"])
def test_cond_drop_selects_the_null_condition(null_cond):
    cfg = tiny("rope2d", cond_img_size=8, null_cond=null_cond)
    model = perturb_zero_init(build(cfg)).eval()
    x, t, y, cond = make_batch(cfg)
    with torch.no_grad():
        full = model(x, t, y, cond=cond)
        null = model(x, t, y)
        mixed = model(x, t, y, cond=cond, cond_drop=torch.tensor([True, False, True]))
        none_dropped = model(x, t, y, cond=cond, cond_drop=torch.zeros(3, dtype=torch.bool))
    torch.testing.assert_close(mixed[[0, 2]], null[[0, 2]])
    torch.testing.assert_close(mixed[1], full[1])
    torch.testing.assert_close(none_dropped, full)
    assert not torch.allclose(full, null)
    assert (model.null_cond is not None) == (null_cond == "learned")


@pytest.mark.parametrize("pos_embed", POS_EMBEDS)
@pytest.mark.parametrize("attn_impl", ["sdpa", "fp32"])
def test_absent_null_condition_is_the_unconditional_sequence(pos_embed, attn_impl):
    """null_cond='absent': no condition is no condition tokens (e.g. 256 instead of 320); a dropped condition
    is masked out of attention and gives, in float64, the numbers of the sequence without it."""
    cfg = tiny(pos_embed, pos_impl="fused", cond_img_size=8, null_cond="absent", attn_impl=attn_impl)
    model = perturb_zero_init(build(cfg)).double().eval()
    x, t, y, cond = (v.double() if v.is_floating_point() else v for v in make_batch(cfg))
    assert model.sequence_layout((16, 16)).n_cond == 0
    assert model.sequence_layout((16, 16), (8, 8)).n_cond == 4
    drop = torch.tensor([True, False, True])
    with torch.no_grad():
        mixed = model(x, t, y, cond=cond, cond_drop=drop)
        without = model(x, t, y)
        full = model(x, t, y, cond=cond)
        packed = model.forward_packed([x[0], x[1]], t[:2], y[:2], [None, cond[1]])
    torch.testing.assert_close(mixed[drop], without[drop], rtol=0, atol=1e-12)
    torch.testing.assert_close(mixed[1], full[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(packed[0], without[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(packed[1], full[1], rtol=0, atol=1e-12)
    assert not torch.allclose(full, without)
    assert model.null_cond is None


def test_absent_null_condition_gradients_skip_dropped_conditions():
    cfg = tiny("rope2d", cond_img_size=8, null_cond="absent")
    model = perturb_zero_init(build(cfg))
    x, t, y, cond = make_batch(cfg)
    model(x, t, y, cond=cond, cond_drop=torch.ones(3, dtype=torch.bool)).square().sum().backward()
    grads = [p.grad for p in model.cond_embedder.parameters()]
    assert all(gr is None or not gr.any() for gr in grads), "a masked condition must not get a gradient"


def test_null_class_and_unconditional_label():
    cfg = tiny("rope2d")
    model = perturb_zero_init(build(cfg))
    x, t, _, _ = make_batch(cfg)
    assert model.null_class == cfg.num_classes
    null = torch.full((3,), model.null_class)
    torch.testing.assert_close(model(x, t, None), model(x, t, null))
    torch.testing.assert_close(model(x, t[0], null), model(x, t[0].expand(3), null))


def test_condition_inputs_are_checked():
    with pytest.raises(ValueError, match="cond_img_size=None"):
        model = build(tiny("rope2d"))
        x, t, y, _ = make_batch(model.cfg)
        model(x, t, y, cond=torch.randn(3, 3, 8, 8))
    model = build(tiny("rope2d", cond_img_size=8))
    x, t, y, cond = make_batch(model.cfg)
    with pytest.raises(ValueError, match="cond_drop"):
        model(x, t, y, cond=cond, cond_drop=torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match="cond_patch_size"):
        model(x, t, y, cond=torch.randn(3, 3, 10, 10))


# ----------------------------------------------------------------------------- other grid sizes
def test_rope_extrapolates_or_interpolates():
    cfg = tiny("rope2d", cond_img_size=8)
    model = perturb_zero_init(build(cfg))
    ext = model.sequence_layout((32, 32), (16, 16))
    itp = model.sequence_layout((32, 32), (16, 16), scaling="interpolate")
    ce, ci = ext.coords(0), itp.coords(0)
    assert ce[:64].max() == 7 and torch.equal(ce[:64], ce[:64].round())  # integer beyond the training range
    assert ci[:64].min() == -0.25 and ci[:64].max() == 3.25  # laid onto the training 4x4 grid
    assert torch.equal(ce[64 + 5], torch.tensor([2.5, 2.5]))  # condition centres follow the image grid
    assert torch.equal(ci[64 + 5], torch.tensor([1.0, 1.0]))
    train = model.sequence_layout()
    torch.testing.assert_close(train.coords(4), train._replace(scaling="interpolate").coords(4), rtol=0, atol=0)
    x, t, y, cond = make_batch(cfg, img_hw=(32, 32), cond_hw=(16, 16))
    a, b = model(x, t, y, cond=cond), model(x, t, y, cond=cond, pos_scaling="interpolate")
    assert a.shape == b.shape == x.shape and not torch.allclose(a, b)
    x, t, y, _ = make_batch(cfg, img_hw=(16, 24))  # non-square; null condition grid follows (2, 3)
    assert model.sequence_layout((16, 24)).cond_grid == (2, 3)
    assert model(x, t, y).shape == x.shape


def test_factorized_up_to_table_size():
    cfg = tiny("factorized2d", cond_img_size=8)
    model = perturb_zero_init(build(cfg))
    assert model.pos.parts["factorized2d"].pos_h.shape == (8, 64)  # default: twice the training grid
    x, t, y, cond = make_batch(cfg, img_hw=(32, 32), cond_hw=(16, 16))
    assert model(x, t, y, cond=cond).shape == x.shape
    x, t, y, cond = make_batch(cfg, img_hw=(48, 48), cond_hw=(24, 24))
    with pytest.raises(ValueError, match="pos_max_grid"):
        model(x, t, y, cond=cond)
    assert model(x, t, y, cond=cond, pos_scaling="interpolate").shape == x.shape
    big = build(tiny("factorized2d", cond_img_size=8, pos_max_grid=[12, 12], pos_max_cond_grid=6))
    assert big.cfg.pos_max_grid == (12, 12) and big.cfg.pos_max_cond_grid == (6, 6)
    assert big(x, t, y, cond=cond).shape == x.shape


def test_sincos_any_size_and_matches_mae():
    def mae(dim, n):  # MAE's get_2d_sincos_pos_embed, transcribed
        def one(d, pos):
            omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
            out = pos.reshape(-1, 1).double() * omega
            return torch.cat((out.sin(), out.cos()), dim=1)

        gw, gh = torch.meshgrid(
            torch.arange(n, dtype=torch.float32), torch.arange(n, dtype=torch.float32), indexing="xy"
        )
        return torch.cat((one(dim // 2, gw), one(dim // 2, gh)), dim=1)

    layout = SeqLayout((4, 4), None, 0, (4, 4), None)
    torch.testing.assert_close(sincos_2d(layout.coords(), 64), mae(64, 4).float())
    cfg = tiny("sincos2d", cond_img_size=8)
    model = build(cfg)
    lay = model.sequence_layout((48, 40), (24, 20))
    h = torch.zeros(1, lay.n_image + lay.n_cond, 64)
    torch.testing.assert_close(model.pos.add(h, lay)[0], sincos_2d(lay.coords(), 64))
    x, t, y, cond = make_batch(cfg, img_hw=(48, 40), cond_hw=(24, 20))
    assert model(x, t, y, cond=cond).shape == x.shape


def test_learned1d_refuses_other_grids_unless_interpolating():
    cfg = tiny("learned1d", cond_img_size=8)
    model = perturb_zero_init(build(cfg))
    x, t, y, cond = make_batch(cfg, img_hw=(32, 32), cond_hw=(16, 16))
    with pytest.raises(ValueError, match="pos_scaling='interpolate'"):
        model(x, t, y, cond=cond)
    assert model(x, t, y, cond=cond, pos_scaling="interpolate").shape == x.shape
    x, t, y, cond = make_batch(cfg)
    torch.testing.assert_close(model(x, t, y, cond=cond), model(x, t, y, cond=cond, pos_scaling="interpolate"))


# ----------------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(pos_embed="rope3d"), "pos_embed"),
        (dict(hidden_size=65), "hidden_size"),
        (dict(hidden_size=72, num_heads=4, pos_embed="rope2d"), "head_dim"),
        (dict(hidden_size=72, num_heads=4, pos_embed="rope2d_mixed"), "head_dim"),
        (dict(hidden_size=66, num_heads=1, pos_embed="sincos2d"), "hidden_size"),
        (dict(img_size=18), "img_size"),
        (dict(in_context_start=2), "in_context_start"),
        (dict(pos_impl="cuda"), "pos_impl"),
        (dict(pos_scaling="stretch"), "pos_scaling"),
        (dict(attn_impl="flash"), "attn_impl"),
        (dict(null_cond="noise"), "null_cond"),
        (dict(cond_img_size=10), "cond_img_size"),
        (dict(pos_max_grid=(2, 8)), "pos_max_grid"),
        (dict(proj_dropout=1.5), "proj_dropout"),
        (dict(depth=0), "depth"),
        (dict(no_such_field=1), "no_such_field"),
    ],
)
def test_bad_config_raises_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        JiTConfig.preset("tiny", **overrides)


def test_config_round_trip_and_presets():
    with pytest.raises(ValueError, match="preset"):
        JiTConfig.preset("JiT-Z/1")
    JiTConfig.preset("tiny", hidden_size=72, num_heads=4, pos_embed="learned1d")  # no RoPE: head_dim 18 is fine
    cfg = tiny("factorized2d", cond_img_size=8, pos_max_grid=(8, 10))
    assert JiTConfig.from_dict(cfg.to_dict()) == cfg
    for name in PRESETS:
        c = JiTConfig.preset(name)
        assert c.img_size // c.patch_size == c.grid[0]
    s4 = JiTConfig.preset("JiT-S/4")
    assert s4.grid == (16, 16) and JiTConfig() == s4


# ----------------------------------------------------------------------------- attention, precision
def test_fp32_attention_matches_sdpa():
    cfg = tiny("rope2d", cond_img_size=8)
    a = perturb_zero_init(build(cfg))
    b = JiT(dataclasses.replace(cfg, attn_impl="fp32"))
    b.load_state_dict(a.state_dict())
    x, t, y, cond = make_batch(cfg)
    torch.testing.assert_close(b(x, t, y, cond=cond), a(x, t, y, cond=cond), rtol=1e-5, atol=1e-6)


def test_rope_mixed_init_is_a_rotation_of_axial():
    cfg = tiny("rope2d_mixed")
    model = build(cfg)
    freqs = model.pos.parts["rope2d_mixed"].freqs.detach()  # [depth, H, 2, D/2]
    assert freqs.shape == (cfg.depth, cfg.num_heads, 2, cfg.head_dim // 2)
    base = axial_freqs(cfg.head_dim)
    torch.testing.assert_close(freqs.norm(dim=2), (base[0] + base[1]).expand_as(freqs[:, :, 0]))
    q = cfg.head_dim // 4  # row pairs and column pairs of a head stay orthogonal
    dot = (freqs[..., :q] * freqs[..., q:]).sum(dim=2)
    torch.testing.assert_close(dot, torch.zeros_like(dot), rtol=0, atol=1e-6)
    assert model.pos.rotary.layer_freqs(1).shape == (cfg.num_heads, 2, cfg.head_dim // 2)
