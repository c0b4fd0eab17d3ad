"""Many ranks: packed batches on every rank, train.parallel (ddp | fsdp), activation checkpointing and
gradient accumulation. The 2-rank cases run one torchrun job of gloo ranks on the CPU (tiny config,
a few steps) that trains several runs in turn; one process runs the references."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from jitrope import train as T
from jitrope import training as TR
from jitrope.checkpoint import load_weights, newest_valid_checkpoint
from jitrope.config import ConfigError, load_config
from jitrope.data import make_synthetic
from jitrope.diffusion import Diffusion
from jitrope.distributed import Parallel, loss_weights
from jitrope.model import JiT, JiTConfig

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")
BASE = ["model.pos_impl=torch", "train.progress=false", "train.tensorboard=false", "train.device=cpu"]
PACKED = ["data.sizes=[8x8,16x16,16x24,24x16,24x24]", "train.tokens_per_batch=400"]
quiet = dict(log=lambda *a, **k: None)


def _cfg(out_dir, *extra):
    return load_config(TINY, BASE + [f"train.out_dir={out_dir}", *extra])


def _weights(run_dir, step):
    return load_file(str(Path(run_dir) / "checkpoints" / f"step_{step:08d}" / "weights.safetensors"))


def _assert_close(a, b, rtol, what, atol=0.0):
    """Every tensor of ``a`` within ``rtol`` of ``b``, relative to the largest value of the tensor (plus
    ``atol``: weights that start at zero, as adaLN's, stay near it)."""
    assert a.keys() == b.keys(), what
    for k in a:
        scale = b[k].abs().max().item()
        err = (a[k].double() - b[k].double()).abs().max().item()
        assert err <= rtol * scale + atol, f"{what}: {k} differs by {err:.3g} (max |value| {scale:.3g})"


# The gradients of the next step, recorded where the trainer clips them, when RECORD["path"] is set: every
# rank gathers them (fsdp), rank 0 writes them there. Each process decides alone (a rank that skipped the
# gathering would leave the other waiting in it).
RECORD = {"path": None}


def _record_step0_grads(monkeypatch=None):
    clip = Parallel.clip_grad_norm_
    if getattr(clip, "records", False):
        return

    def spy(self, params, max_norm):
        path, RECORD["path"] = RECORD["path"], None
        if path:
            grads = {}
            for n, p in self.model.named_parameters():
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                grads[n] = g.detach().cpu().contiguous()
            if int(os.environ.get("RANK", "0")) == 0:
                save_file(grads, path)
        return clip(self, params, max_norm)

    spy.records = True
    if monkeypatch is not None:
        monkeypatch.setattr(Parallel, "clip_grad_norm_", spy)
    else:
        Parallel.clip_grad_norm_ = spy


# One torchrun job trains these runs in turn: [[overrides...], resume, grads file or "", cut, stop] each; cut
# [src, dst, step]: rank 0 first copies run folder src to dst without its checkpoint of that step (the
# other rank lists dst only after rank 0 joins it in train()). stop (optional) {"file": path, "sigterm":
# [rank, step]}: the run is expected to stop (TrainingStopped); rank 0 writes its exit code and line to the
# file; with "sigterm", that rank alone gets SIGTERM after that step.
# The job joins one process group for all its runs: a second init_process_group in the same torchrun
# job can find the first group's rendezvous keys and wait forever on its ports.
WORKER = """
import json, os, shutil, signal, sys
sys.path.insert(0, sys.argv[1])
import torch.distributed as dist
from test_distributed import RECORD, _record_step0_grads
from jitrope.config import load_config
from jitrope.runtime import Dist
from jitrope.training import TrainingStopped, _Run, train
dist.init_process_group("gloo")
Dist.close = lambda self: None
_record_step0_grads()
step_once = _Run.train_step
for overrides, resume, grads, cut, *stop in json.loads(open(sys.argv[2]).read()):
    stop = stop[0] if stop else None
    if cut and os.environ["RANK"] == "0":
        shutil.copytree(cut[0], cut[1])
        shutil.rmtree(os.path.join(cut[1], "checkpoints", "step_%08d" % cut[2]))
    RECORD["path"] = grads or None
    _Run.train_step = step_once
    if stop and stop.get("sigterm") and int(os.environ["RANK"]) == stop["sigterm"][0]:
        def step_then_sigterm(self, at=stop["sigterm"][1]):
            step_once(self)
            if self.step == at:
                os.kill(os.getpid(), signal.SIGTERM)
        _Run.train_step = step_then_sigterm
    try:
        train(load_config(sys.argv[3], overrides), resume=resume, log=lambda *a, **k: None)
    except TrainingStopped as e:
        if not stop:
            raise
        if os.environ["RANK"] == "0":
            open(stop["file"], "w").write(json.dumps([e.exit_code, str(e)]))
    else:
        assert not stop, "the run was expected to stop"
dist.destroy_process_group()
"""


def _torchrun(tmp_path, jobs, timeout=600):
    (tmp_path / "worker.py").write_text(WORKER)
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(tmp_path / "worker.py"), str(ROOT / "tests"), str(tmp_path / "jobs.json"), TINY]
    # its own session: a rank stuck past the timeout is killed with the launcher, not left behind
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the 2-rank job still ran after {timeout} s: {err[-2000:]}")
    assert proc.returncode == 0, out[-3000:] + err[-3000:]


def _train_here(out_dir, *extra, resume=False, grads=None, monkeypatch=None):
    if grads is not None:
        _record_step0_grads(monkeypatch)
        RECORD["path"] = str(grads)
    return TR.train(_cfg(out_dir, *extra), resume=resume, **quiet)


# ------------------------------------------------------------------------------------------------ 2 ranks
@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """The 2-rank runs, in one torchrun job: ddp and fsdp (4 steps), fsdp resumed from a copy cut at step 2,
    a ddp folder continued under fsdp, packed batches under ddp and fsdp (step 0's gradients recorded)."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    steps = ["train.steps=4", "train.ckpt_every=2", "train.log_every=2"]
    r = {k: tmp / k for k in ("ddp", "fsdp", "fsdp_cut", "ddp_then_fsdp", "packed_ddp", "packed_fsdp")}
    fsdp = ["train.parallel=fsdp"]
    jobs = [
        [BASE + steps + [f"train.out_dir={r['ddp']}"], False, "", None],
        [BASE + steps + fsdp + [f"train.out_dir={r['fsdp']}"], False, "", None],
        [BASE + steps + fsdp + [f"train.out_dir={r['fsdp_cut']}"], True, "", [str(r["fsdp"]), str(r["fsdp_cut"]), 4]],
        [BASE + steps + ["train.steps=2", f"train.out_dir={r['ddp_then_fsdp']}"], False, "", None],
        [BASE + steps + fsdp + [f"train.out_dir={r['ddp_then_fsdp']}"], True, "", None],
    ]
    for par in ("ddp", "fsdp"):
        out, grads = r[f"packed_{par}"], str(tmp / f"g_{par}")
        jobs.append([BASE + PACKED + steps + [f"train.out_dir={out}", f"train.parallel={par}"], False, grads, None])
    # fsdp preempted on rank 1 alone after step 3, then resumed to step 4
    r["preempted"] = tmp / "preempted"
    run = BASE + steps + fsdp + [f"train.out_dir={r['preempted']}"]
    jobs.append([run, False, "", None, {"file": str(tmp / "stop_preempted"), "sigterm": [1, 3]}])
    jobs.append([run, True, "", None])
    # fsdp's folder without its last checkpoint, resumed with a learning rate that makes the weights unusable
    r["diverged"] = tmp / "diverged"
    bad = ["train.steps=8", "train.ckpt_every=1", "train.lr=1e30", f"train.out_dir={r['diverged']}"]
    cut = [str(r["fsdp"]), str(r["diverged"]), 4]
    jobs.append([BASE + fsdp + bad, True, "", cut, {"file": str(tmp / "stop_diverged")}])
    _torchrun(tmp, jobs)
    return tmp, r


@pytest.mark.slow
def test_fsdp_trains_as_ddp(two_rank_runs):
    _, r = two_rank_runs
    _assert_close(_weights(r["fsdp"], 4), _weights(r["ddp"], 4), 1e-5, "fsdp vs ddp after 4 steps", atol=1e-8)
    # the run folder is the one every reader knows: full weights, EMAs, manifest
    w = load_weights(r["fsdp"])
    assert w["step"] == 4 and len(w["emas"]) == 2 and set(w["model"]) == set(load_weights(r["ddp"])["model"])


@pytest.mark.slow
def test_fsdp_resume_is_bit_exact(two_rank_runs):
    _, r = two_rank_runs
    a, b = _weights(r["fsdp"], 4), _weights(r["fsdp_cut"], 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(r["fsdp"] / "checkpoints/step_00000004/state.pt", weights_only=True)
    sb = torch.load(r["fsdp_cut"] / "checkpoints/step_00000004/state.pt", weights_only=True)
    assert sa["data"] == sb["data"]
    for i, st in sa["optimizer"]["state"].items():
        assert all(torch.equal(v, sb["optimizer"]["state"][i][k]) for k, v in st.items())


@pytest.mark.slow
def test_packed_two_ranks_equal_one_process(two_rank_runs, tmp_path, monkeypatch):
    """One process running both ranks' packed batches (its 2 micro-batches are the ranks' parts) with the
    same loss: the gradients of step 0 and the weights after 4 steps match both 2-rank runs."""
    tmp, r = two_rank_runs
    steps = ["train.steps=4", "train.ckpt_every=2", "train.log_every=2", "train.grad_accum_steps=2"]
    _train_here(tmp_path / "one", *PACKED, *steps, grads=tmp_path / "g_one", monkeypatch=monkeypatch)
    g1 = load_file(str(tmp_path / "g_one"))
    assert any(v.abs().sum() > 0 for v in g1.values())
    for par in ("ddp", "fsdp"):
        _assert_close(load_file(str(tmp / f"g_{par}")), g1, 1e-6, f"step 0 gradients, 2 ranks {par} vs 1 process")
        _assert_close(_weights(r[f"packed_{par}"], 4), _weights(tmp_path / "one", 4), 1e-5, f"packed {par}", atol=1e-8)
    m = [json.loads(x) for x in (r["packed_fsdp"] / "metrics.jsonl").read_text().splitlines()]
    o = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [x["loss"] for x in m] == pytest.approx([x["loss"] for x in o], rel=1e-6)


@pytest.mark.slow
def test_checkpoints_move_between_ddp_fsdp_and_one_process(two_rank_runs, tmp_path):
    tmp, r = two_rank_runs
    # ddp for 2 steps, then fsdp to 4: as ddp all along
    _assert_close(_weights(r["ddp_then_fsdp"], 4), _weights(r["ddp"], 4), 1e-5, "ddp then fsdp", atol=1e-8)
    # fsdp's folder, continued by one process (the fixed-size batch is the same for any number of ranks)
    one = tmp_path / "one"
    shutil.copytree(r["fsdp"], one)
    shutil.rmtree(one / "checkpoints" / "step_00000004")
    out = TR.train(_cfg(one, "train.steps=4", "train.ckpt_every=2"), resume=True, **quiet)
    assert out["step"] == 4
    _assert_close(_weights(one, 4), _weights(r["fsdp"], 4), 1e-5, "fsdp then one process", atol=1e-8)


@pytest.mark.slow
def test_sigterm_on_one_fsdp_rank_checkpoints_that_step_on_every_rank_and_resumes_bit_exact(two_rank_runs):
    """The preemption flag is agreed by every rank each step: rank 1 alone got SIGTERM after step 3, and
    both ranks took part in that step's checkpoint (fsdp gathers the shards), then stopped with 143."""
    tmp, r = two_rank_runs
    code, line = json.loads((tmp / "stop_preempted").read_text())
    ck = r["preempted"] / "checkpoints" / "step_00000003"
    assert code == 143 and line.startswith("preempted (SIGTERM) at step 3, its checkpoint written; "), line
    assert f"the last checkpoint kept is {ck};" in line, line
    a, b = _weights(r["preempted"], 4), _weights(r["fsdp"], 4)  # resumed from step 3 to 4: as if never stopped
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_unusable_fsdp_weights_are_refused_by_every_rank_and_keep_the_last_good_checkpoint(two_rank_runs):
    """Under fsdp the probe runs on the weights gathered to rank 0, and every rank takes its verdict."""
    tmp, r = two_rank_runs
    code, line = json.loads((tmp / "stop_diverged").read_text())
    assert code == 2 and line.startswith("the training diverged"), line
    assert "on the probe batch, so no checkpoint was written for it" in line and "lower train.lr" in line, line
    kept = newest_valid_checkpoint(r["diverged"])
    m = re.search(r"after step (\d+)", line)
    assert m and int(m.group(1)) == int(kept.name[len("step_") :]) + 1, line
    assert all(torch.isfinite(v).all() and v.abs().max() < 1e6 for v in load_weights(kept)["model"].values())


# ------------------------------------------------------------------------------------------------ 1 process
def test_fsdp_on_one_process_shards_nothing_and_trains_as_plain(tmp_path):
    said = []
    TR.train(_cfg(tmp_path / "plain", "train.steps=3"), **quiet)
    TR.train(_cfg(tmp_path / "fsdp", "train.steps=3", "train.parallel=fsdp"), log=said.append)
    assert any("train.parallel=fsdp on one process: FSDP2 over a group of one rank" in s for s in said)
    _assert_close(_weights(tmp_path / "fsdp", 3), _weights(tmp_path / "plain", 3), 1e-6, "fsdp on one rank", atol=1e-8)
    # and a one-process fsdp folder resumes in a plain run
    out = TR.train(_cfg(tmp_path / "fsdp", "train.steps=4"), resume=True, **quiet)
    assert out["step"] == 4


@pytest.mark.parametrize("packed", [False, True])
def test_accumulation_equals_one_large_batch(tmp_path, monkeypatch, packed):
    """Fixed-size: batch 16 in 1, 2 or 4 micro-batches. Packed: the 2 micro-batches of a step as one packed
    batch of all their images, with the same loss (the mean over every pixel)."""
    extra = ["train.steps=1", "train.ckpt_every=1"] + (PACKED if packed else [])
    g = {}
    for a in (1, 2) if packed else (1, 2, 4):
        _train_here(
            tmp_path / f"a{a}", *extra, f"train.grad_accum_steps={a}", grads=tmp_path / f"g{a}", monkeypatch=monkeypatch
        )
        g[a] = load_file(str(tmp_path / f"g{a}"))
    if not packed:
        for a in (2, 4):
            _assert_close(g[a], g[1], 1e-5, f"{a} micro-batches vs one batch")
        return
    _assert_close(g[2], _one_pack_gradients(tmp_path, monkeypatch), 1e-5, "2 packed micro-batches vs one pack")


def _one_pack_gradients(tmp_path, monkeypatch):
    """The gradients of one packed batch holding both micro-batches of step 0 (recorded from a run)."""
    parts = []
    real = TR._Run._packed_batch

    def keep(self, g, picks, idx):
        out = real(self, g, picks, idx)
        parts.append(([self.packer.sizes[k] for k in picks], [self.cond_sizes[k] for k in picks], out))
        return out

    monkeypatch.setattr(TR._Run, "_packed_batch", keep)
    cfg = _cfg(tmp_path / "rec", "train.steps=1", "train.grad_accum_steps=2", *PACKED)
    TR.train(cfg, **quiet)
    torch.manual_seed(cfg.train.seed)
    model = JiT(cfg.model_config())
    sizes = parts[0][0] + parts[1][0]
    layout = model.packed_layout(sizes, parts[0][1] + parts[1][1])
    x, y, cond, drop, t, noise = (torch.cat([p[2][i] for p in parts[:2]]) for i in range(6))
    Diffusion.from_config(cfg.diffusion).loss(
        model.forward_tokens, x, y, cond, drop, t=t, noise=noise, layout=layout
    ).backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("packed", [False, True])
def test_activation_checkpointing_gives_bit_identical_gradients(packed):
    cfg = JiTConfig.preset("tiny", pos_impl="torch", cond_img_size=8, attn_dropout=0.3, proj_dropout=0.3, depth=4)
    torch.manual_seed(0)
    model = JiT(cfg)
    with torch.no_grad():  # off the zero-initialised gates and final layer, so every block has gradients
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    diffusion = Diffusion()
    g = torch.Generator().manual_seed(1)
    if packed:
        sizes, csizes = [(16, 16), (8, 16), (24, 24)], [(8, 8), (4, 8), (12, 12)]
        layout = model.packed_layout(sizes, csizes)
        x = torch.randn(layout.n_image, 48, generator=g)
        cond = torch.randn(layout.cond_seq_id.shape[0], 48, generator=g)
        args = (x, torch.tensor([1, 2, 9]), cond, torch.tensor([False, True, False]))
        kw = dict(t=torch.rand(3, generator=g), noise=torch.randn(x.shape, generator=g), layout=layout)
        net = model.forward_tokens
    else:
        x = torch.randn(4, 3, 16, 16, generator=g)
        args = (x, torch.tensor([0, 3, 9, 1]), torch.randn(4, 3, 8, 8, generator=g), torch.tensor([0, 1, 0, 0]).bool())
        kw = dict(t=torch.rand(4, generator=g), noise=torch.randn(x.shape, generator=g))
        net = model
    grads = []
    for on in (False, True):
        model.activation_checkpointing = on
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)  # dropout
        diffusion.loss(net, *args, **kw).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    assert grads[0]["blocks.1.attn.qkv.weight"].abs().sum() > 0


def test_loss_weights_make_the_mean_over_every_pixel():
    # rank 0 packed 300 pixels, rank 1 100: each rank's mean loss is weighted 2 * n / 400, then averaged
    assert loss_weights([[300, 100]], 2) == [[1.5, 0.5]]
    assert loss_weights([[10], [30]], 1) == [[0.25], [0.75]]  # one rank, two micro-batches
    assert TR.part_generator(3, 7, 0).initial_seed() == TR.step_generator(3, 7).initial_seed()
    seeds = {TR.part_generator(0, s, p).initial_seed() for s in range(4) for p in range(8)}
    assert len(seeds) == 32


@pytest.mark.parametrize(
    "args,message",
    [
        (["train.parallel=zero3"], "config key train.parallel: 'zero3' is not one of ['ddp', 'fsdp']"),
        (["train.grad_accum_steps=0"], "config key train.grad_accum_steps must be >= 1, got 0"),
        (["train.grad_accum_steps=3"], "train.grad_accum_steps=3 does not divide train.batch_size=16"),
    ],
)
def test_bad_parallel_settings_are_one_error_line(tmp_path, capsys, args, message):
    assert T.main(["--config", TINY, *BASE, f"train.out_dir={tmp_path / 'run'}", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_a_batch_not_divisible_by_ranks_times_micro_batches_is_refused(tmp_path):
    cfg = _cfg(tmp_path, "train.grad_accum_steps=4")  # 16 = 4 x 4: fine on one rank
    with pytest.raises(
        ConfigError, match=r"train.batch_size=16 is not divisible by 3 rank\(s\) x train.grad_accum_steps=4 = 12"
    ):
        TR._check_data_fits(cfg, cfg.model_config(), make_synthetic(20, 16), 3)
