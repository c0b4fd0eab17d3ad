"""Runs a user can trust: checksummed checkpoints that fall back, stale temp folders
cleaned, dtypes checked, and a training process killed while it checkpoints."""

import json
import math
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from jitrope import evaluate as E
from jitrope import sample as S
from jitrope import train as T
from jitrope import training as TR
from jitrope.checkpoint import (
    CheckpointError,
    UnverifiedCheckpointError,
    check_state_dict,
    clean_stale_temps,
    list_checkpoints,
    load_train_state,
    load_weights,
    newest_valid_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from jitrope.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")
BASE = ["model.pos_impl=torch", "train.progress=false", "train.tensorboard=false"]
QUIET = dict(log=lambda *a, **k: None)


def _cfg(out_dir, *extra):
    return load_config(TINY, BASE + [f"train.out_dir={out_dir}", *extra])


def _flip_data_bytes(f: Path, n: int = 8, seed: int = 0) -> None:
    """Flip bits in the tensor data of a safetensors file, past its JSON header: the file still
    parses, only a digest can tell."""
    raw = bytearray(f.read_bytes())
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    rng = random.Random(seed)
    for i in rng.sample(range(start, len(raw)), n):
        raw[i] ^= 0xFF
    f.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("run4")
    out = TR.train(_cfg(run, "train.steps=4", "train.ckpt_every=2", "train.log_every=2"), **QUIET)
    return run, out["loss"]


def _copy(run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def test_manifest_digests_every_file(run4):
    run, _ = run4
    for _, ck in list_checkpoints(run):
        m = json.loads((ck / "manifest.json").read_text())
        assert sorted(m["files"]) == ["state.pt", "weights.safetensors"]
        assert all(len(v["sha256"]) == 64 and v["bytes"] == (ck / k).stat().st_size for k, v in m["files"].items())


def test_bit_flip_falls_back_for_a_run_and_fails_for_an_explicit_step(run4, tmp_path, capsys):
    run = _copy(run4[0], tmp_path)
    bad = run / "checkpoints" / "step_00000004"
    _flip_data_bytes(bad / "weights.safetensors")
    # a run folder: the newest checkpoint that verifies, with a warning naming the skipped one
    w = load_weights(run)
    assert w["step"] == 2
    err = capsys.readouterr().err
    assert "skipping checkpoint step_00000004" in err and "sha256" in err and "weights.safetensors" in err
    # an explicit step folder or file that fails is an error naming the file
    for explicit in (bad, bad / "weights.safetensors"):
        with pytest.raises(CheckpointError, match=r"step_00000004/weights.safetensors: sha256 .* does not match"):
            load_weights(explicit)
    assert (
        S.main(["--ckpt", str(bad), "--out", str(tmp_path / "g.png"), "--steps", "1", "--n", "1", "--no-progress"]) == 2
    )
    assert "does not match the manifest" in capsys.readouterr().err
    out = tmp_path / "fallback.png"
    assert S.main(["--ckpt", str(run), "--out", str(out), "--steps", "1", "--n", "1", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert out.is_file() and "step 2" in captured.out and "skipping checkpoint step_00000004" in captured.err
    ev = tmp_path / "ev.json"
    assert (
        E.main(
            [
                "--ckpt",
                str(run),
                "--out",
                str(ev),
                "--max-images",
                "4",
                "--n-per-class",
                "1",
                "--n-cond",
                "2",
                "--steps",
                "1",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert json.loads(ev.read_text())["step"] == 2 and "skipping checkpoint step_00000004" in capsys.readouterr().err
    assert E.main(["--ckpt", str(bad), "--out", str(ev), "--steps", "1"]) == 2
    assert "does not match the manifest" in capsys.readouterr().err
    # --resume falls back too, and the resumed run finishes
    res = TR.train(_cfg(run, "train.steps=6", "train.ckpt_every=2", "train.log_every=2"), resume=True, **QUIET)
    assert res["step"] == 6 and "skipping checkpoint step_00000004" in capsys.readouterr().err
    assert load_weights(run)["step"] == 6


def test_damaged_state_is_refused_by_its_digest(run4, tmp_path, capsys):
    run = _copy(run4[0], tmp_path)
    st = run / "checkpoints" / "step_00000004" / "state.pt"
    raw = bytearray(st.read_bytes())
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(len(raw) // 2, len(raw) - 64, (1,), generator=g).item()
    raw[pos : pos + 32] = torch.randint(0, 256, (32,), generator=g, dtype=torch.uint8).numpy().tobytes()
    st.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"state.pt: sha256 .* does not match"):
        load_train_state(st.parent)
    assert newest_valid_checkpoint(run).name == "step_00000002"
    assert "skipping checkpoint step_00000004" in capsys.readouterr().err
    # weights alone still verify: sampling the run keeps using step 4
    assert resolve_checkpoint(run).parent.name == "step_00000004"


def test_no_checkpoint_verifies_is_an_error(run4, tmp_path):
    run = _copy(run4[0], tmp_path)
    for _, ck in list_checkpoints(run):
        (ck / "weights.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointError, match="no checkpoint of .* verifies"):
        TR.train(_cfg(run, "train.steps=6"), resume=True, **QUIET)


def test_checkpoint_without_manifest_fails_unless_allowed(run4, tmp_path, capsys):
    run = _copy(run4[0], tmp_path)
    ck = run / "checkpoints" / "step_00000004"
    (ck / "manifest.json").unlink()
    _flip_data_bytes(ck / "weights.safetensors")  # what a manifest would have caught
    for explicit in (ck, ck / "weights.safetensors"):
        with pytest.raises(
            UnverifiedCheckpointError,
            match=r"step_00000004/weights.safetensors cannot be verified: "
            r".*step_00000004 has no manifest.json .*pass --allow-unverified",
        ):
            load_weights(explicit)
    # a run folder falls back to the newest checkpoint that verifies, with a warning naming the one skipped
    assert load_weights(run)["step"] == 2
    assert "skipping checkpoint step_00000004: " in capsys.readouterr().err
    # the explicit flag loads it, with a warning
    assert load_weights(ck, allow_unverified=True)["step"] == 4
    assert resolve_checkpoint(run, allow_unverified=True) == ck / "weights.safetensors"
    assert f"{ck} has no manifest.json" in capsys.readouterr().err
    assert load_train_state(ck, allow_unverified=True)["step"] == 4
    with pytest.raises(UnverifiedCheckpointError):
        load_train_state(ck)
    # the CLIs: --resume without the flag resumes from step 2 and keeps step 4 (moved aside, not deleted)
    args = ["--config", TINY, *BASE, f"train.out_dir={run}", "train.steps=5", "train.ckpt_every=1", "--resume"]
    assert T.main(args) == 0
    err = capsys.readouterr().err
    assert "skipping checkpoint step_00000004" in err and "moved damaged checkpoint step_00000004 aside" in err
    assert (run / "checkpoints" / "corrupt-step_00000004" / "weights.safetensors").is_file()
    assert [s for s, _ in list_checkpoints(run)] == [4, 5]
    assert load_weights(run)["step"] == 5


def test_allow_unverified_resumes_an_old_checkpoint_and_leaves_it(run4, tmp_path, capsys):
    run = _copy(run4[0], tmp_path)
    for _, ck in list_checkpoints(run):
        (ck / "manifest.json").unlink()
    args = ["--config", TINY, *BASE, f"train.out_dir={run}", "train.steps=6", "train.ckpt_every=2", "--resume"]
    assert T.main(args) == 2
    lines = capsys.readouterr().err.splitlines()  # a warning per skipped checkpoint, then one error line
    assert lines[-1].startswith("error: no checkpoint of ") and "--allow-unverified" in lines[-1], lines
    assert all(line.startswith("warning: skipping checkpoint") for line in lines[:-1]), lines
    assert T.main(args + ["--allow-unverified"]) == 0
    assert "resumed from" in capsys.readouterr().out
    # keep_last counts only the checkpoints that verify (the new step 6) and deletes no unverified one
    assert [s for s, _ in list_checkpoints(run)] == [2, 4, 6]


def test_manifest_damage_is_a_checkpoint_error(run4, tmp_path, capsys):
    run = _copy(run4[0], tmp_path)
    ck = run / "checkpoints" / "step_00000004"
    m = json.loads((ck / "manifest.json").read_text())
    m["files"]["weights.safetensors"] = "deadbeef"
    (ck / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"the entry of weights.safetensors is 'deadbeef', not an object"):
        verify_checkpoint(ck)
    (ck.parent / "step_00000002" / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        load_weights(ck.parent / "step_00000002")
    # a file the manifest does not list is unverified
    m["files"] = {
        "weights.safetensors": json.loads((run4[0] / "checkpoints" / "step_00000004" / "manifest.json").read_text())[
            "files"
        ]["weights.safetensors"]
    }
    (ck / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UnverifiedCheckpointError, match=r"state.pt is not listed in .*manifest.json"):
        load_train_state(ck)


def test_newest_checkpoint_without_weights_is_skipped_with_a_warning(run4, tmp_path, capsys):
    run = _copy(run4[0], tmp_path)
    (run / "checkpoints" / "step_00000004" / "weights.safetensors").unlink()
    assert newest_valid_checkpoint(run).name == "step_00000002"
    err = capsys.readouterr().err
    assert "skipping checkpoint step_00000004" in err and "weights.safetensors is missing" in err
    assert load_weights(run)["step"] == 2 and "skipping checkpoint step_00000004" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="step_00000004/weights.safetensors is missing"):
        load_weights(run / "checkpoints" / "step_00000004")
    # a fresh start still refuses the folder: the newest step folder counts, complete or not
    with pytest.raises(CheckpointError, match="already holds checkpoints .newest step_00000004"):
        TR.train(_cfg(run, "train.steps=2"), **QUIET)


def test_finished_run_resumed_reports_its_last_loss(run4, tmp_path, capsys):
    run = _copy(run4[0], tmp_path)
    out = TR.train(_cfg(run, "train.steps=4", "train.ckpt_every=2", "train.log_every=2"), resume=True, **QUIET)
    assert out["step"] == 4 and out["loss"] == run4[1] and math.isfinite(out["loss"])
    assert (
        T.main(
            [
                "--config",
                TINY,
                *BASE,
                f"train.out_dir={run}",
                "train.steps=4",
                "train.ckpt_every=2",
                "train.log_every=2",
                "--resume",
            ]
        )
        == 0
    )
    o = capsys.readouterr().out
    assert f"loss {run4[1]:.4f}" in o and "nan" not in o and "already at step 4" in o


def test_checkpoint_dtypes_must_match_the_model(tmp_path):
    model = {"w": torch.randn(3, 2), "b": torch.randn(3)}
    save_checkpoint(tmp_path, 1, model={"w": torch.randint(0, 5, (3, 2), dtype=torch.int32), "b": model["b"]})
    w = load_weights(tmp_path)
    with pytest.raises(CheckpointError, match=r"dtype mismatch w: checkpoint torch.int32 vs model torch.float32"):
        check_state_dict(model, w["model"], where="X")
    check_state_dict({"b": model["b"].double()}, {"b": model["b"].double()}, where="X")


def test_stale_temp_folders_are_cleaned_at_the_next_start(run4, tmp_path):
    run = _copy(run4[0], tmp_path)
    ck = run / "checkpoints"
    for name in (".tmp-step_00000006-deadbeef", ".old-step_00000004-cafef00d"):
        (ck / name).mkdir()
        (ck / name / "weights.safetensors").write_bytes(b"half")
    logs = []
    TR.train(_cfg(run, "train.steps=5", "train.ckpt_every=2"), resume=True, log=logs.append)
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith(".")) == []
    assert any(".tmp-step_00000006-deadbeef" in m for m in logs)


def test_a_checkpoint_replacement_killed_between_its_renames_is_restored(run4, tmp_path, capsys):
    """Re-saving step N moves the verified step_N to .old-step_N-* and then the new one in; killed
    in between, the .old folder is the only copy of step N and the next start renames it back."""
    run = _copy(run4[0], tmp_path)
    ck = run / "checkpoints"
    os.rename(ck / "step_00000004", ck / ".old-step_00000004-cafef00d")
    (ck / ".tmp-step_00000004-deadbeef").mkdir()  # the new copy, never renamed into place
    assert clean_stale_temps(run) == [ck / ".tmp-step_00000004-deadbeef"]
    assert sorted(p.name for p in ck.iterdir()) == ["step_00000002", "step_00000004"]
    assert "restored step_00000004 from .old-step_00000004-cafef00d" in capsys.readouterr().err
    assert newest_valid_checkpoint(run) == ck / "step_00000004"


KILLED_RUN = """
import sys
from jitrope.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_while_checkpointing_leaves_a_loadable_run(tmp_path):
    """Kill a run that checkpoints every step at random moments; each time the newest complete
    checkpoint verifies and loads, and a resumed run finishes."""
    run = tmp_path / "run"
    env = dict(
        os.environ, PYTHONPATH=str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1"
    )
    # checkpoints every step and keep_last=1: most of the time goes to writing and pruning them
    args = [
        sys.executable,
        "-c",
        KILLED_RUN,
        "--config",
        TINY,
        *BASE,
        f"train.out_dir={run}",
        "train.steps=100000",
        "train.ckpt_every=1",
        "train.keep_last=1",
        "train.log_every=1000",
        "--resume",
    ]
    rng = random.Random(1234)
    t_end = time.monotonic() + 45
    kills = 0
    while kills < 4 and time.monotonic() < t_end:
        before = max((s for s, _ in list_checkpoints(run)), default=0)
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while max((s for s, _ in list_checkpoints(run)), default=0) <= before:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "no new checkpoint within 30 s"
                time.sleep(0.01)
            # wait for the next write to begin (its temp folder appears), then kill at a random
            # moment of it: while tensors, the state or the manifest are written, or at the rename
            while not any(p.name.startswith(".tmp-") for p in (run / "checkpoints").iterdir()):
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "no checkpoint write began within 30 s"
            time.sleep(rng.uniform(0.0, 0.02))
        finally:
            proc.send_signal(signal.SIGKILL)  # a no-op when the process has already ended
            proc.wait()
            proc.stderr.close()
        kills += 1
        newest = newest_valid_checkpoint(run)
        assert newest is not None
        w = load_weights(newest)
        assert load_train_state(newest)["step"] == w["step"]
    assert kills >= 2
    step = load_weights(run)["step"]
    out = TR.train(
        _cfg(run, f"train.steps={step + 2}", "train.ckpt_every=1", "train.keep_last=1"), resume=True, **QUIET
    )
    assert out["step"] == step + 2 and math.isfinite(out["loss"])
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


class _System:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_training_state_that_would_run_code_is_refused_naming_the_callable(tmp_path):
    marker = tmp_path / "ran"
    ck = save_checkpoint(tmp_path, 1, model={"w": torch.zeros(2)}, state={"step": 1, "x": _System(marker)})
    with pytest.raises(CheckpointError) as e:
        load_train_state(ck)
    assert str(e.value) == (
        f"{ck / 'state.pt'} holds an object of {os.system.__module__}.system: refused (the training state is "
        "tensors and primitives only, weights_only=True); it was not written by jitrope"
    )
    assert not marker.exists()
