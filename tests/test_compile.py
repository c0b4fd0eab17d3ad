"""torch.compile of the JiT model: one graph, no break, no recompile.

A training step (forward + the diffusion loss in one compiled function, then backward through the
AOT-compiled backward) is traced with ``fullgraph=True`` for every ``pos_embed`` value, with and
without the condition image, under both ``pos_impl`` values, and must give eager's loss and
gradients. ``aot_eager`` runs the same AOT autograd tracing as inductor without generating code, so
the battery is fast; one case goes through inductor end to end. Tiny configs, CPU.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import jitrope
from jitrope.diffusion import Diffusion
from jitrope.model import JiT, JiTConfig
from jitrope.packing import mark_dynamic, pack_images
from jitrope.posenc import POS_EMBEDS

IMPLS = [
    "torch",
    pytest.param(
        "fused",
        marks=pytest.mark.skipif(not jitrope.HAS_EXTENSION, reason=f"jitrope._C not loaded: {jitrope.EXTENSION_ERROR}"),
    ),
]


# every test here traces (and some compile with inductor) a model: seconds to a minute each
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_model(pos_embed: str, pos_impl: str, cond: bool) -> JiT:
    cfg = JiTConfig.preset("tiny", pos_embed=pos_embed, pos_impl=pos_impl, cond_img_size=8 if cond else None)
    torch.manual_seed(0)
    model = JiT(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the zero-initialised layers get weights, so every path carries gradient
        for lin in [b.adaLN_modulation[-1] for b in model.blocks] + [
            model.final_layer.linear,
            model.final_layer.adaLN_modulation[-1],
        ]:
            for p in (lin.weight, lin.bias):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    assert model.pos_impl == pos_impl
    return model


def batch(cfg: JiTConfig, seed: int, B: int = 3, img: int = None, cond_img: int = None):
    g = torch.Generator().manual_seed(seed)
    S = img or cfg.img_size
    x = torch.randn(B, 3, S, S, generator=g)
    y = torch.randint(0, cfg.num_classes + 1, (B,), generator=g)
    t = torch.rand(B, generator=g)
    noise = torch.randn(x.shape, generator=g)
    cond = cond_drop = None
    if cfg.cond_img_size is not None:
        c = cond_img or cfg.cond_img_size
        cond = torch.randn(B, 3, c, c, generator=g)
        cond_drop = torch.rand(B, generator=g) < 0.5
    return x, y, cond, cond_drop, t, noise


def grads(model: JiT):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def train_step(model: JiT, fn, args) -> tuple:
    model.zero_grad(set_to_none=True)
    loss = fn(*args)
    loss.backward()
    return loss.detach(), grads(model)


def check_against_eager(pos_embed, pos_impl, cond, backend, rtol, atol):
    model = make_model(pos_embed, pos_impl, cond)
    diffusion = Diffusion()

    def loss_fn(x, y, cond, cond_drop, t, noise):
        return diffusion.loss(model, x, y, cond, cond_drop, t=t, noise=noise)

    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(loss_fn, backend=counter, fullgraph=True)
    for seed in (0, 1):  # the second step must reuse the graph: no recompile
        args = batch(model.cfg, seed)
        loss_e, grads_e = train_step(model, loss_fn, args)
        loss_c, grads_c = train_step(model, compiled, args)
        torch.testing.assert_close(loss_c, loss_e, rtol=rtol, atol=atol)
        for name, g in grads_e.items():
            assert g.abs().sum() > 0, name
            torch.testing.assert_close(grads_c[name], g, rtol=rtol, atol=atol, msg=name)
    assert counter.frame_count == 1


@pytest.mark.parametrize("cond", [False, True], ids=["nocond", "cond"])
@pytest.mark.parametrize("pos_impl", IMPLS)
@pytest.mark.parametrize("pos_embed", list(POS_EMBEDS))
def test_train_step_compiles_fullgraph(pos_embed, pos_impl, cond):
    check_against_eager(pos_embed, pos_impl, cond, "aot_eager", rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pos_impl", IMPLS)
@pytest.mark.parametrize("pos_embed", list(POS_EMBEDS))
def test_sampling_forward_at_another_size_compiles_fullgraph(pos_embed, pos_impl):
    # Another grid than the training one: the tables the encodings derive for it (cos/sin,
    # sin-cos, resized tables) are made inside the graph, never written to a cache while tracing.
    model = make_model(pos_embed, pos_impl, cond=True).eval()
    x, y, cond, cond_drop, t, _ = batch(model.cfg, 0, img=24, cond_img=12)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        for _ in range(2):
            out = compiled(x, t, y, cond=cond, cond_drop=cond_drop, pos_scaling="interpolate")
            torch.testing.assert_close(
                out, model(x, t, y, cond=cond, cond_drop=cond_drop, pos_scaling="interpolate"), rtol=1e-5, atol=1e-6
            )
    assert counter.frame_count == 1


# Size mixes of a packed batch (image, condition sizes): other sample counts, token counts, aspect ratios.
PACKED_MIXES = [
    [((16, 16), (8, 8)), ((8, 24), (4, 12)), ((24, 16), (12, 8))],
    [((16, 16), (8, 8)), ((16, 16), (8, 8)), ((8, 16), (8, 8)), ((24, 24), (12, 12))],
    [((8, 8), (4, 4)), ((32, 16), (16, 8))],
]


@pytest.mark.parametrize("pos_impl", IMPLS)
@pytest.mark.parametrize(
    "pos_embed, scaling", [("sincos2d+rope2d", "extrapolate"), ("rope2d_mixed", "yarn"), ("sincos2d+rope2d", "ntk")]
)
def test_packed_train_step_compiles_once_for_every_size_mix(pos_embed, scaling, pos_impl):
    """Issue 16 item 7: forward + loss of a packed batch in one graph (fullgraph), backward through it,
    and batches with other size mixes reuse it: T and S are marked dynamic, the model reads only the
    layout's tensors, and attention takes the block-diagonal mask path while tracing. Under ntk / yarn the
    per-sequence frequency tables are made in the graph from the layout's scales (every mix here has a
    grid with more tokens than training, so yarn's temperature is in every batch)."""
    model = make_model(pos_embed, pos_impl, cond=True)
    diffusion = Diffusion()

    def loss_fn(x, y, cond, cond_drop, t, noise, layout):
        return diffusion.loss(model.forward_tokens, x, y, cond, cond_drop, t=t, noise=noise, layout=layout)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss_fn, backend=counter, fullgraph=True)
    for seed, mix in enumerate(PACKED_MIXES):
        g = torch.Generator().manual_seed(seed)
        xs = [torch.randn(3, *hw, generator=g) for hw, _ in mix]
        conds = [torch.randn(3, *chw, generator=g) for _, chw in mix]
        S = len(mix)
        layout = model.packed_layout([hw for hw, _ in mix], [chw for _, chw in mix], pos_scaling=scaling)
        assert (layout.seqs.attn_factor is not None) == (scaling == "yarn")
        x, cond = pack_images(xs, 4), pack_images(conds, 4)
        y = torch.randint(0, 10, (S,), generator=g)
        t, noise = torch.rand(S, generator=g), torch.randn(x.shape, generator=g)
        cond_drop = torch.arange(S) % 2 == 1
        mark_dynamic(layout, x, cond, y, t, noise, cond_drop)
        args = (x, y, cond, cond_drop, t, noise, layout)
        loss_e, grads_e = train_step(model, loss_fn, args)
        loss_c, grads_c = train_step(model, compiled, args)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        for name, g_e in grads_e.items():
            torch.testing.assert_close(grads_c[name], g_e, rtol=1e-4, atol=1e-6, msg=name)
    assert counter.frame_count == 1, f"{counter.frame_count} compiles for {len(PACKED_MIXES)} size mixes"


@pytest.mark.parametrize("pos_impl", IMPLS)
@pytest.mark.parametrize("pos_embed, scaling", [("rope2d_mixed", "ntk"), ("sincos2d+rope2d", "yarn")])
def test_frequency_scaling_at_another_size_compiles_fullgraph(pos_embed, scaling, pos_impl):
    # ntk / yarn: the scaled frequencies are made in the graph, and yarn's temperature reaches SDPA as scale=.
    model = make_model(pos_embed, pos_impl, cond=True).eval()
    x, y, cond, cond_drop, t, _ = batch(model.cfg, 0, img=24, cond_img=12)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        for _ in range(2):
            out = compiled(x, t, y, cond=cond, cond_drop=cond_drop, pos_scaling=scaling)
            torch.testing.assert_close(
                out, model(x, t, y, cond=cond, cond_drop=cond_drop, pos_scaling=scaling), rtol=1e-5, atol=1e-6
            )
    assert counter.frame_count == 1


@pytest.mark.slow
def test_train_step_inductor():
    # The paper's encoding with a condition image, through inductor's generated code (30-40 s here
    # with a cold inductor cache, a few seconds with a warm one).
    impl = "fused" if jitrope.HAS_EXTENSION else "torch"
    check_against_eager("sincos2d+rope2d", impl, True, "inductor", rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(
    not (torch.cuda.is_available() and jitrope.has_cuda_kernels()),
    reason="needs a CUDA device and the extension's CUDA kernels",
)
@pytest.mark.parametrize("pos_impl", ["torch", "fused"])
def test_reduce_overhead_trains_on_cuda(pos_impl):
    """CUDA graphs (mode="reduce-overhead") through a few AdamW steps under bf16 autocast: the ops are
    graph-safe (no host sync, no allocation outside the caching allocator) and training tracks eager."""
    diffusion = Diffusion()
    losses = {}
    for mode in ("eager", "reduce-overhead"):
        torch._dynamo.reset()
        model = make_model("sincos2d+rope2d", pos_impl, cond=True).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def loss_fn(x, y, cond, cond_drop, t, noise):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return diffusion.loss(model, x, y, cond, cond_drop, t=t, noise=noise)

        fn = loss_fn if mode == "eager" else torch.compile(loss_fn, mode=mode, fullgraph=True)
        losses[mode] = []
        for step in range(5):
            args = [a.cuda() for a in batch(model.cfg, step % 2, B=4)]
            if mode != "eager":
                torch.compiler.cudagraph_mark_step_begin()
            loss = fn(*args)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[mode].append(loss.item())
    assert all(torch.isfinite(torch.tensor(v)).all() for v in losses.values())
    torch.testing.assert_close(
        torch.tensor(losses["reduce-overhead"]), torch.tensor(losses["eager"]), rtol=3e-2, atol=1e-3
    )
