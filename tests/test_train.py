"""Training: exact resume, checkpoint safety, the CLI, and a 2-process gloo torchrun run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jitrope import train as T
from jitrope import training as TR
from jitrope.checkpoint import CheckpointError, list_checkpoints, load_weights, save_checkpoint
from jitrope.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")
# The tests run the reference ops: they check the training machinery, not the kernels.
BASE = ["model.pos_impl=torch", "train.progress=false", "train.tensorboard=false"]


def _cfg(out_dir, *extra):
    return load_config(TINY, BASE + [f"train.out_dir={out_dir}", *extra])


def _weights(run_dir, step):
    return load_file(str(Path(run_dir) / "checkpoints" / f"step_{step:08d}" / "weights.safetensors"))


def test_resume_is_bit_exact(tmp_path):
    quiet = dict(log=lambda *a, **k: None)
    TR.train(_cfg(tmp_path / "straight", "train.steps=20"), **quiet)
    TR.train(_cfg(tmp_path / "split", "train.steps=10"), **quiet)
    out = TR.train(_cfg(tmp_path / "split", "train.steps=20"), resume=True, **quiet)
    assert out["step"] == 20
    a, b = _weights(tmp_path / "straight", 20), _weights(tmp_path / "split", 20)
    assert a.keys() == b.keys() and any(k.startswith("ema1.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the run really trained: weights moved away from the zero-initialised final layer
    assert a["model.final_layer.linear.weight"].abs().sum() > 0
    sa = torch.load(tmp_path / "straight/checkpoints/step_00000020/state.pt", weights_only=True)
    sb = torch.load(tmp_path / "split/checkpoints/step_00000020/state.pt", weights_only=True)
    assert sa["data"] == sb["data"] and sa["step"] == 20
    assert [s for s, _ in list_checkpoints(tmp_path / "split")] == [10, 20]  # keep_last: 2


def test_metrics_jsonl_has_a_record_per_log_step_and_resume_drops_the_records_beyond_the_checkpoint(tmp_path):
    import json
    import shutil

    from jitrope.runlog import read_metrics, truncate_metrics

    quiet = dict(log=lambda *a, **k: None)
    extra = ("train.log_every=2", "train.ckpt_every=5")
    TR.train(_cfg(tmp_path / "straight", "train.steps=10", *extra), **quiet)
    straight = read_metrics(tmp_path / "straight")
    assert [r["step"] for r in straight] == [2, 4, 6, 8, 10]
    keys = {"step", "loss", "lr", "grad_norm", "images_per_s", "interval_steps", "wall_s", "cpu_s", "time", "startup"}
    assert all(set(r) == keys for r in straight)
    assert [r["startup"] for r in straight] == [True, False, False, False, False]
    assert all(r["images_per_s"] > 0 and r["interval_steps"] == 2 for r in straight)
    assert [r["lr"] for r in straight] == [TR.lr_at(_cfg(tmp_path), s - 1) for s in (2, 4, 6, 8, 10)]
    walls = [r["wall_s"] for r in straight]
    assert walls == sorted(walls) and walls[0] > 0
    # A crash after step 8: its checkpoint never written, a torn half line at the end of the file.
    run = tmp_path / "crashed"
    TR.train(_cfg(run, "train.steps=8", *extra), **quiet)
    shutil.rmtree(run / "checkpoints" / "step_00000008")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 0.5')
    assert [r["step"] for r in read_metrics(run)] == [2, 4, 6, 8]  # readers skip the torn line
    TR.train(_cfg(run, "train.steps=10", *extra), resume=True, **quiet)  # resumes from step 5
    resumed = read_metrics(run)
    assert [r["step"] for r in resumed] == [2, 4, 6, 8, 10]  # 6 and 8 once each: those of the second run
    assert [r["startup"] for r in resumed] == [True, False, True, False, False]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(x)["step"] for x in lines)
    # bit-exact resume: the same losses as the straight run (the interval 5..6 is one step, not two)
    for a, b in zip(straight, resumed):
        if b["step"] != 6:
            assert a["loss"] == b["loss"], a["step"]
    assert resumed[2]["interval_steps"] == 1
    assert resumed[2]["wall_s"] > resumed[1]["wall_s"]  # the clocks continue from the kept records
    assert resumed[2]["cpu_s"] > resumed[1]["cpu_s"]
    # truncation keeps whole records only, and leaves a consistent file untouched
    before = (run / "metrics.jsonl").stat().st_mtime_ns
    assert [r["step"] for r in truncate_metrics(run, 10)] == [2, 4, 6, 8, 10]
    assert (run / "metrics.jsonl").stat().st_mtime_ns == before
    assert [r["step"] for r in truncate_metrics(run / "metrics.jsonl", 7)] == [2, 4, 6]
    assert [r["step"] for r in read_metrics(run)] == [2, 4, 6]
    assert truncate_metrics(tmp_path / "none", 3) == []


class Evil:
    """Unpickling this would run code from the test module: weights_only refuses it."""


def test_existing_checkpoints_need_resume_and_a_matching_config(tmp_path, capsys):
    quiet = dict(log=lambda *a, **k: None)
    TR.train(_cfg(tmp_path, "train.steps=4", "train.ckpt_every=2"), **quiet)
    assert (tmp_path / "config.yaml").is_file()
    with pytest.raises(CheckpointError, match="--resume"):
        TR.train(_cfg(tmp_path, "train.steps=6"), **quiet)
    with pytest.raises(CheckpointError, match=r"model.pos_embed: checkpoint 'rope2d' vs now 'factorized2d'"):
        TR.train(_cfg(tmp_path, "train.steps=6", "model.pos_embed=factorized2d"), resume=True, **quiet)
    with pytest.raises(CheckpointError, match="train.batch_size"):
        TR.train(_cfg(tmp_path, "train.steps=6", "train.batch_size=8"), resume=True, **quiet)
    # a truncated newest checkpoint is skipped with a warning naming it; the run resumes from the one before
    f = tmp_path / "checkpoints" / "step_00000004" / "weights.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    out = TR.train(_cfg(tmp_path, "train.steps=6"), resume=True, **quiet)
    assert out["step"] == 6
    err = capsys.readouterr().err
    assert "skipping checkpoint step_00000004" in err and f"{f}: 1000 bytes" in err
    # and the next checkpoint moved it aside, kept, rather than letting it shadow the good ones
    assert "moved damaged checkpoint step_00000004 aside" in err
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 6]
    assert (tmp_path / "checkpoints" / "corrupt-step_00000004" / "weights.safetensors").stat().st_size == 1000
    # a state.pt holding code is refused by weights_only loading (checked here past the digest:
    # a checkpoint of an older version has no manifest, loaded with --allow-unverified)
    ck = tmp_path / "checkpoints" / "step_00000006"
    (ck / "manifest.json").unlink()
    torch.save({"step": 6, "evil": Evil()}, ck / "state.pt")
    with pytest.raises(CheckpointError, match=r"state.pt holds an object of \S*test_train.Evil: refused"):
        TR.train(_cfg(tmp_path, "train.steps=8"), resume=True, allow_unverified=True, **quiet)
    assert "weights.safetensors cannot be verified: " in capsys.readouterr().err


def test_resume_lets_runtime_settings_differ_and_refuses_what_changes_the_training(tmp_path):
    quiet = dict(log=lambda *a, **k: None)
    TR.train(_cfg(tmp_path, "train.steps=2", "train.ckpt_every=2", f"data.root={tmp_path / 'a'}"), **quiet)
    # the data moved and is not to be downloaded again, other kernels compute the same thing: fine
    said = []
    moved = ["data.download=false", f"data.root={tmp_path / 'b'}", "model.packed_attn=mask", "model.pos_impl=fused"]
    out = TR.train(_cfg(tmp_path, "train.steps=4", *moved), resume=True, log=said.append)
    assert out["step"] == 4
    changed = [x for x in said if "changed runtime settings" in x]
    assert len(changed) == 1, said
    for key in ("data.download: checkpoint True vs now False", "data.root: ", "model.packed_attn", "model.pos_impl"):
        assert key in changed[0], changed[0]
    # what is trained may not change, and the error names every key that did
    for extra, named in [
        (["model.depth=3"], ["model.depth: checkpoint 2 vs now 3"]),  # resolved: the preset's depth is 2
        (
            ["data.num_images=300", "data.hflip=true"],
            ["data.hflip: checkpoint False", "data.num_images: checkpoint 256"],
        ),
        (["data.root=/elsewhere", "diffusion.P_mean=-0.5"], ["diffusion.P_mean"]),
    ]:
        with pytest.raises(CheckpointError, match="another config") as e:
            TR.train(_cfg(tmp_path, "train.steps=6", *extra), resume=True, **quiet)
        assert all(k in str(e.value) for k in named) and "data.root" not in str(e.value), str(e.value)


def test_resume_compares_resolved_values_not_keys_as_typed(tmp_path, capsys):
    """A key spelt out with the value the run already had (the preset's, or the default) is no change."""
    run = tmp_path / "run"
    args = ["--config", TINY, *BASE, f"train.out_dir={run}", "train.ckpt_every=2"]
    assert T.main(args + ["train.steps=2"]) == 0
    same = ["model.pos_scaling=extrapolate", "model.depth=2", "model.preset=tiny", "data.hflip=false"]
    assert T.main(args + ["train.steps=4", *same, "--resume"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert T.main(args + ["train.steps=6", "model.pos_scaling=ntk", "--resume"]) == 2
    assert capsys.readouterr().err.endswith(": model.pos_scaling: checkpoint 'extrapolate' vs now 'ntk'\n")


def test_checkpoint_writes_are_atomic_and_mismatches_named(tmp_path, monkeypatch):
    sd = {"w": torch.ones(2, 2), "tied": None}
    sd["tied"] = sd["w"]  # shared storage is written as two tensors
    save_checkpoint(tmp_path, 1, model=sd, config={"a": 1}, keep_last=2)
    import safetensors.torch as st

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(
        CheckpointError,
        match=r"cannot write checkpoint .*step_00000002 \(OSError: disk full\); "
        "nothing of it was kept",
    ):
        save_checkpoint(tmp_path, 2, model=sd)
    monkeypatch.undo()
    ck = tmp_path / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step_00000001"]  # no half-written step_2, no temp folder
    w = load_weights(tmp_path)
    assert w["step"] == 1 and torch.equal(w["model"]["tied"], sd["w"]) and w["config"] == {"a": 1}
    from jitrope.checkpoint import check_state_dict

    with pytest.raises(
        CheckpointError, match=r"missing b.*unexpected tied.*shape mismatch w: checkpoint \(2, 2\) vs model \(3,\)"
    ):
        check_state_dict({"w": torch.zeros(3), "b": torch.zeros(1)}, w["model"], where="X")
    (tmp_path / "other.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(CheckpointError, match="other.safetensors"):
        load_weights(tmp_path / "other.safetensors")
    for step in (2, 3, 4):
        save_checkpoint(tmp_path, step, model=sd, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]


def test_cli_help_print_config_and_errors(tmp_path, capsys):
    assert "dotted overrides" in T.build_parser().format_help()
    assert T.main(["--config", TINY, "--print-config", "model.pos_embed=sincos2d"]) == 0
    assert "pos_embed: sincos2d" in capsys.readouterr().out
    assert T.main(["--config", TINY, "train.nope=1"]) == 2
    assert "unknown config key(s): train.nope" in capsys.readouterr().err
    assert T.main(["--config", TINY, *BASE, "model.num_classes=3", f"train.out_dir={tmp_path}"]) == 2
    assert "model.num_classes=3 but data synthetic has 9 classes" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--print-config", "model.pos_embed=rope3d"], "model config: pos_embed must be one of"),
        (["model.pos_embed=rope3d"], "model config: pos_embed must be one of"),
        (["train.out_dir=/proc/x"], "train.out_dir /proc/x is not writable"),
        (["train.ckpt_every=0"], "train.ckpt_every must be >= 1, got 0"),
        (["train.log_every=0"], "train.log_every must be >= 1, got 0"),
        (["train.device=cuda:x"], "config key train.device: 'cuda:x' is not a device"),
        pytest.param(
            ["train.device=cuda"],
            "config key train.device: cuda: this machine has no usable CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present"),
        ),
    ],
)
def test_cli_errors_are_one_line_with_exit_2(tmp_path, capsys, args, message):
    if not any(a.startswith("train.out_dir") for a in args):
        args = args + [f"train.out_dir={tmp_path / 'run'}"]
    assert T.main(["--config", TINY, *BASE, "train.steps=2", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_console_entry_points_name_the_cli_mains():
    import importlib

    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert sorted(scripts) == ["jitrope-convert", "jitrope-evaluate", "jitrope-sample", "jitrope-train"]
    for target in scripts.values():
        module, _, func = target.partition(":")
        main = getattr(importlib.import_module(module), func)
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        assert e.value.code == 0
    assert not (ROOT / "scripts" / "train.py").exists() and not (ROOT / "scripts" / "sample.py").exists()


def test_lr_schedule_is_linear_warmup_then_constant():
    cfg = load_config(TINY, ["train.lr=null", "train.blr=5e-5", "train.batch_size=512", "train.warmup_steps=4"])
    lrs = [TR.lr_at(cfg, s) for s in range(6)]
    assert lrs == pytest.approx([2.5e-5, 5e-5, 7.5e-5, 1e-4, 1e-4, 1e-4])


WORKER = """
import os, sys
from safetensors.torch import save_file
from jitrope.config import load_config
from jitrope.training import train
out = train(load_config(sys.argv[1], sys.argv[3:]))
rank = int(os.environ["RANK"])
save_file({k: v.contiguous() for k, v in out["model"].state_dict().items()}, f"{sys.argv[2]}/rank{rank}.safetensors")
"""


@pytest.mark.slow
def test_two_process_gloo_torchrun_keeps_ranks_identical(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = dict(
        os.environ, PYTHONPATH=str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1"
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(worker),
        TINY,
        str(tmp_path),
        *BASE,
        f"train.out_dir={tmp_path / 'run'}",
        "train.steps=4",
        "train.ckpt_every=4",
        "train.device=cpu",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    assert r0["final_layer.linear.weight"].abs().sum() > 0
    # only rank 0 wrote, and what it wrote is what the ranks hold
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [4]
    w = load_weights(tmp_path / "run")["model"]
    assert all(torch.equal(w[k], r0[k]) for k in r0)


def _two_ranks(*overrides, timeout=180):
    """``python -m jitrope.train`` as ranks 0 and 1 of a gloo group, started by hand as a cluster
    scheduler starts them (no torchrun agent that would kill the rank left behind); ``[(exit
    status, stderr)]`` per rank, or a failure naming a rank that is still running at ``timeout``."""
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE="2",
        PYTHONWARNINGS="ignore::RuntimeWarning",  # a CPU-only build warns so on import: not the line tested
    )
    cmd = [sys.executable, "-m", "jitrope.train", "--config", TINY, *BASE, "train.device=cpu", *overrides]
    procs = [
        subprocess.Popen(
            cmd,
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    deadline, out = time.monotonic() + timeout, []
    try:
        for r, p in enumerate(procs):
            try:
                _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {r} still runs after {timeout} s: it waits for a rank that stopped")
            out.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("fails", ["checkpoint", "data"])
def test_when_rank_0_fails_every_rank_stops_with_one_error_line(tmp_path, fails):
    """Rank 0 alone writes checkpoints and fetches the data; when that fails the other rank must not
    wait for it at a barrier forever."""
    run = tmp_path / "run"
    if fails == "checkpoint":
        run.mkdir()
        (run / "checkpoints").write_text("a file where the checkpoint folder goes\n")
        extra = ["train.steps=2", "train.ckpt_every=2", "train.log_every=2"]
        said = ["cannot write checkpoint", "step_00000002", "no checkpoint was written yet"]
        what = "writing the checkpoint of step 2"
    else:  # the emoji data is missing and may not be downloaded: rank 0 fails to fetch it
        extra = [f"data.root={tmp_path / 'cache'}", "data.name=emoji", "data.download=false"]
        said = ["the emoji data for", "is missing"]
        what = "fetching the data"
    (code0, err0), (code1, err1) = _two_ranks(f"train.out_dir={run}", *extra)
    for code, err in ((code0, err0), (code1, err1)):
        lines = [x for x in err.splitlines() if x.strip()]
        assert code == 2 and "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(s in err0 for s in said), err0
    assert err1 == f"error: rank 1 stopped: rank 0 failed {what} (its error line says why)\n"
    assert not (run / "checkpoints").is_dir()


def _fused_cpu_kernels():
    import jitrope

    return jitrope.HAS_EXTENSION and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"jitrope::{op}", "CPU") for op in ("rope2d", "pos2d_add")
    )


@pytest.mark.skipif(not _fused_cpu_kernels(), reason="the extension's CPU kernels are not built")
@pytest.mark.parametrize("pos_embed", ["rope2d", "factorized2d"])
def test_fused_and_torch_ops_train_alike(tmp_path, pos_embed):
    losses = {}
    for impl in ("fused", "torch"):
        cfg = load_config(
            TINY,
            BASE
            + [
                f"model.pos_impl={impl}",
                f"model.pos_embed={pos_embed}",
                "train.steps=3",
                "train.log_every=3",
                f"train.out_dir={tmp_path / impl}",
            ],
        )
        out = TR.train(cfg, log=lambda *a, **k: None)
        assert out["model"].pos_impl == impl
        losses[impl] = out["loss"]
    assert losses["fused"] == pytest.approx(losses["torch"], rel=1e-4)


@pytest.mark.slow
def test_compile_mode_default_trains_like_eager(tmp_path):
    """train.compile_mode wraps the model in torch.compile(mode=...) (inductor on the CPU: ~40 s here)."""
    losses = {}
    for mode in ("none", "default"):
        cfg = load_config(
            TINY,
            BASE
            + [f"train.compile_mode={mode}", "train.steps=2", "train.log_every=2", f"train.out_dir={tmp_path / mode}"],
        )
        out = TR.train(cfg, log=lambda *a, **k: None)
        assert out["step"] == 2
        losses[mode] = out["loss"]
    assert losses["default"] == pytest.approx(losses["none"], rel=1e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compile_mode_reduce_overhead_trains_on_the_gpu(tmp_path):
    """CUDA graphs (reduce-overhead) around the model with the fused ops: same loss as eager."""
    losses = {}
    for mode in ("none", "reduce-overhead"):
        cfg = load_config(
            TINY,
            [
                "model.pos_impl=fused",
                "train.progress=false",
                "train.tensorboard=false",
                "train.device=cuda",
                "train.amp=none",
                f"train.compile_mode={mode}",
                "train.steps=3",
                "train.log_every=3",
                f"train.out_dir={tmp_path / mode}",
            ],
        )
        out = TR.train(cfg, log=lambda *a, **k: None)
        assert out["step"] == 3
        losses[mode] = out["loss"]
    assert losses["reduce-overhead"] == pytest.approx(losses["none"], rel=1e-3)
