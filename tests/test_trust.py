"""No data loss: no checkpoint with nan weights, keep_last prunes only what verifies, one
trainer per out_dir, ~ in out_dir, and one line instead of a traceback for a full disk or Ctrl-C."""

import errno
import importlib
import json
import os
import random
import re
import shlex
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from jitrope import sample as S
from jitrope import train as T
from jitrope import training as TR
from jitrope.checkpoint import list_checkpoints, load_weights, newest_valid_checkpoint, save_checkpoint
from jitrope.fileio import LockedError, exclusive_lock

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")
BASE = ["--config", TINY, "model.pos_impl=torch", "train.progress=false", "train.tensorboard=false"]


def _error_line(err: str) -> str:
    """The one line a stopped run prints (warnings may come before it); never a traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1, err
    return lines[0]


def _flip(f: Path, n: int = 8) -> None:
    raw = bytearray(f.read_bytes())
    start = 8 + struct.unpack("<Q", raw[:8])[0]  # past the safetensors header: only a digest can tell
    for i in random.Random(0).sample(range(start, len(raw)), n):
        raw[i] ^= 0xFF
    f.write_bytes(bytes(raw))


def _all_finite(ck: Path) -> bool:
    return all(torch.isfinite(v).all() for v in load_file(str(ck / "weights.safetensors")).values())


@pytest.mark.parametrize("log_every", [5, 1])  # caught by the weights at a checkpoint / by the loss at a log step
def test_diverged_training_writes_no_nan_checkpoint_and_keeps_the_good_ones(tmp_path, capsys, log_every):
    run = tmp_path / "d"
    assert T.main(BASE + ["train.steps=10", "train.ckpt_every=2", f"train.out_dir={run}"]) == 0
    capsys.readouterr()
    args = BASE + [
        "train.steps=20",
        "train.ckpt_every=1",
        "train.lr=1e30",
        f"train.out_dir={run}",
        f"train.log_every={log_every}",
        "--resume",
    ]
    assert T.main(args) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith("error: the training diverged") and "lower train.lr" in line, line
    # the step that went bad is named: right after the last checkpoint (one per step here)
    m = re.search(r"are not finite \(nan or inf\) after step (\d+)|the training diverged after step (\d+): ", line)
    assert m, line
    kept = newest_valid_checkpoint(run)
    assert int(m.group(1) or m.group(2)) == int(kept.name[len("step_") :]) + 1, line
    assert f"the last checkpoint kept is {kept};" in line and line.endswith(" --resume"), line
    # nothing non-finite was written, and the newest checkpoint is the one named
    cks = list_checkpoints(run)
    assert len(cks) == 2 and all(_all_finite(p) for _, p in cks) and cks[-1][1] == kept


def test_a_diverged_run_keeps_a_checkpoint_that_samples_finite_images(tmp_path, capsys):
    """The weights of lr=1e30 are huge but finite (about 1e30): they used to pass the finite check,
    be written, prune the last good checkpoint with keep_last=1, and sample nothing but nan."""
    run = tmp_path / "r"
    assert T.main(BASE + ["train.steps=10", "train.ckpt_every=2", "train.keep_last=1", f"train.out_dir={run}"]) == 0
    capsys.readouterr()
    args = ["train.steps=20", "train.ckpt_every=1", "train.keep_last=1", "train.lr=1e30", f"train.out_dir={run}"]
    assert T.main(BASE + args + ["--resume"]) == 2
    line = _error_line(capsys.readouterr().err)
    good = run / "checkpoints" / "step_00000010"
    assert line.startswith(
        "error: the training diverged after step 11: the model weights and EMA 0 (the one sampled) give a loss of "
        "nan on the probe batch, "
    ), line
    assert f"so no checkpoint was written for it; the last checkpoint kept is {good};" in line, line
    assert [p for _, p in list_checkpoints(run)] == [good]
    assert S.main(["--ckpt", str(run), "--out", str(tmp_path / "s.png"), "--n", "2", "--steps", "2"]) == 0
    singles = sorted((tmp_path / "s").glob("*.png"))
    assert len(singles) == 18 and all(np.asarray(Image.open(f)).max() > 0 for f in singles)  # none black


def test_a_sample_grid_that_comes_out_nan_stops_the_run_instead_of_saving_a_black_grid(tmp_path, capsys):
    run = tmp_path / "r"
    assert T.main(BASE + ["train.steps=2", "train.ckpt_every=2", f"train.out_dir={run}"]) == 0
    capsys.readouterr()
    args = ["train.steps=6", "train.ckpt_every=100", "train.sample_every=1", "train.lr=1e30", f"train.out_dir={run}"]
    assert T.main(BASE + args + ["--resume"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith("error: the training diverged: the sample grid of step 3 came out nan or inf; ")
    assert f"the last checkpoint kept is {run / 'checkpoints' / 'step_00000002'};" in line, line
    assert not (run / "samples" / "step_00000003.png").exists()


def test_a_nan_checkpoint_of_an_older_version_is_not_resumed(tmp_path, capsys):
    run = tmp_path / "run"
    assert T.main(BASE + ["train.steps=2", "train.ckpt_every=2", f"train.out_dir={run}"]) == 0
    ck = run / "checkpoints" / "step_00000002"
    w = load_weights(ck)
    w["model"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in w["model"].items()}
    # re-written with a valid manifest, as a version without the finite check would have
    save_checkpoint(
        run,
        2,
        model=w["model"],
        emas=w["emas"],
        ema_decays=w["ema_decays"],
        state=torch.load(ck / "state.pt", weights_only=True),
        config=w["config"],
        class_names=w["class_names"],
        model_config=w["model_config"],
    )
    assert T.main(BASE + ["train.steps=4", "train.ckpt_every=2", f"train.out_dir={run}", "--resume"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert line == (
        f"error: {ck}: its model weights are not finite (nan or inf); rename it (e.g. to "
        "corrupt-step_00000002) to resume from the checkpoint before it"
    ), line


def test_keep_last_prunes_only_checkpoints_that_verify(tmp_path, capsys):
    sd = {"w": torch.randn(4, 3)}
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model=sd, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    _flip(tmp_path / "checkpoints" / "step_00000003" / "weights.safetensors")
    save_checkpoint(tmp_path, 4, model=sd, keep_last=2)
    # the damaged 3 is neither counted nor deleted: moved aside; 4 and 2 verify and are kept
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4]
    aside = tmp_path / "checkpoints" / "corrupt-step_00000003"
    assert (aside / "weights.safetensors").is_file()
    assert "moved damaged checkpoint step_00000003 aside to" in capsys.readouterr().err
    # a second damaged step 3 gets its own name; nothing is overwritten
    save_checkpoint(tmp_path, 3, model=sd, keep_last=0)
    _flip(tmp_path / "checkpoints" / "step_00000003" / "weights.safetensors")
    save_checkpoint(tmp_path, 5, model=sd, keep_last=1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5]
    assert (tmp_path / "checkpoints" / "corrupt-step_00000003-2").is_dir() and aside.is_dir()
    # keep_last=0 keeps all, but a damaged newer checkpoint that would shadow the new one is moved aside
    save_checkpoint(tmp_path, 9, model=sd, keep_last=0)
    _flip(tmp_path / "checkpoints" / "step_00000009" / "weights.safetensors")
    save_checkpoint(tmp_path, 6, model=sd, keep_last=0)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 6]
    assert (tmp_path / "checkpoints" / "corrupt-step_00000009").is_dir()


def test_resume_past_a_damaged_newer_checkpoint_keeps_what_it_writes(tmp_path, capsys):
    """The issue's case: keep_last used to delete the checkpoint just written and keep the damaged
    newer one, leaving nothing loadable."""
    run = tmp_path / "run"
    assert T.main(BASE + ["train.steps=6", "train.ckpt_every=2", f"train.out_dir={run}"]) == 0
    _flip(run / "checkpoints" / "step_00000006" / "weights.safetensors")
    assert (
        T.main(BASE + ["train.steps=5", "train.ckpt_every=1", "train.keep_last=1", f"train.out_dir={run}", "--resume"])
        == 0
    )
    err = capsys.readouterr().err
    assert "skipping checkpoint step_00000006" in err and "moved damaged checkpoint step_00000006 aside" in err
    assert [s for s, _ in list_checkpoints(run)] == [5] and load_weights(run)["step"] == 5
    assert (run / "checkpoints" / "corrupt-step_00000006" / "weights.safetensors").is_file()


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _safetensor_error(*a, **k):
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _torch_save_full(*a, **k):
    raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 1024 vs 960")


@pytest.mark.parametrize(
    "target,fake",
    [
        ("safetensors.torch.save_file", _enospc),
        ("safetensors.torch.save_file", _safetensor_error),
        ("torch.save", _torch_save_full),
    ],
)
def test_full_disk_while_checkpointing_is_one_line_and_keeps_the_older_checkpoints(
    tmp_path, capsys, monkeypatch, target, fake
):
    run = tmp_path / "run"
    module, name = target.rsplit(".", 1)
    mod = importlib.import_module(module)
    real = getattr(mod, name)
    calls = []

    def writer(*a, **k):  # the first checkpoint is written, the second finds the disk full
        calls.append(1)
        return real(*a, **k) if len(calls) == 1 else fake(*a, **k)

    monkeypatch.setattr(mod, name, writer)
    assert T.main(BASE + ["train.steps=4", "train.ckpt_every=2", f"train.out_dir={run}"]) == 2
    monkeypatch.undo()
    line = _error_line(capsys.readouterr().err)
    ck = run / "checkpoints"
    assert line.startswith(f"error: cannot write checkpoint {ck / 'step_00000004'} (")
    assert "nothing of it was kept" in line
    assert f"the last checkpoint kept is {ck / 'step_00000002'};" in line and line.endswith("--resume"), line
    assert sorted(p.name for p in ck.iterdir()) == ["step_00000002"]  # no temp folder left, step 2 intact
    assert T.main(BASE + ["train.steps=4", "train.ckpt_every=2", f"train.out_dir={run}", "--resume"]) == 0
    assert load_weights(run)["step"] == 4


def test_out_dir_with_a_tilde_is_the_home_folder(tmp_path, monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    assert T.main(BASE + ["train.steps=2", "train.ckpt_every=2", "train.out_dir=~/r"]) == 0
    assert (home / "r" / "checkpoints" / "step_00000002" / "manifest.json").is_file()
    assert (home / "r" / "config.yaml").is_file() and list(cwd.iterdir()) == []


def test_a_lock_that_is_a_link_or_someone_elses_file_is_never_written(tmp_path, capsys):
    """The lock used to open .lock following links and truncate it: a link to a file emptied that file."""
    precious = tmp_path / "precious.txt"
    precious.write_text("a day of notes\n")
    run = tmp_path / "run"
    run.mkdir()
    lock = run / ".lock"
    lock.symlink_to(precious)
    assert T.main(BASE + [f"train.out_dir={run}", "train.steps=2"]) == 2
    assert _error_line(capsys.readouterr().err) == (
        f"error: {lock} is not a lock file (it is a symbolic link); nothing was written to it: move it "
        f"away to use train.out_dir {run}"
    )
    assert precious.read_text() == "a day of notes\n" and lock.is_symlink()
    lock.unlink()
    for why, make in [
        ("it holds something other than a pid", lambda: lock.write_text("my own notes\n")),
        ("it has 1 other hard link(s)", lambda: os.link(precious, lock)),
        ("it is a folder", lambda: lock.mkdir()),
    ]:
        make()
        with pytest.raises(LockedError, match=re.escape(f"{lock} is not a lock file ({why})")):
            with exclusive_lock(run, "train.out_dir"):
                pass
        assert precious.read_text() == "a day of notes\n"
        lock.rmdir() if lock.is_dir() else lock.unlink()
    assert not list(run.iterdir())  # nothing of the refused runs


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_one_line(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / ".lock"
    lock.write_text(f"{dead.pid}\n")  # what a killed trainer leaves
    said = []
    with exclusive_lock(tmp_path, "train.out_dir", log=said.append) as path:
        assert path == lock and lock.read_text() == f"{os.getpid()}\n"
        with pytest.raises(LockedError, match=f"is in use by another process \\(pid {os.getpid()},"):
            with exclusive_lock(tmp_path, "train.out_dir"):  # held: a second holder is refused
                pass
    assert said == [f"took over the stale lock {lock} of pid {dead.pid} (no longer running)"]
    assert not lock.exists()  # a lock let go leaves nothing behind, so only a killed holder's is stale
    with exclusive_lock(tmp_path, "train.out_dir", log=said.append):
        pass
    assert len(said) == 1


# A shell that starts a job in the background (`cmd &` in a script) ignores SIGINT in it, and a child
# inherits that, so pytest started that way would give trainer A an ignored Ctrl-C: A restores
# Python's own handler, as a trainer started in a terminal has it.
RUNNER = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from jitrope.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # ~20 s on a busy machine: a second Python process that imports torch
def test_a_second_trainer_is_refused_and_ctrl_c_stops_with_the_resume_command(tmp_path, capsys):
    """Trainer A (a subprocess) holds the run; B (this process) is refused before it touches the
    folder. Then Ctrl-C stops A with one line naming the last checkpoint and the command that
    continues, which does continue."""
    run = tmp_path / "run"
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore::RuntimeWarning",
    )  # no extension-missing warning
    args = BASE + [f"train.out_dir={run}", "train.steps=100000", "train.ckpt_every=2", "train.log_every=1000"]
    a = subprocess.Popen(
        [sys.executable, "-c", RUNNER, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not list_checkpoints(run):
            assert a.poll() is None, a.stderr.read()
            assert time.monotonic() < deadline, "trainer A wrote no checkpoint within 60 s"
            time.sleep(0.05)
        assert (run / ".lock").read_text().strip() == str(a.pid)
        # what a second start must not touch: A's temp folder (a stand-in, A's own come and go) and config
        stand_in = run / "checkpoints" / ".tmp-step_99999999-0badf00d"
        stand_in.mkdir()
        config = (run / "config.yaml").read_bytes()
        assert T.main(BASE + [f"train.out_dir={run}", "train.steps=3", "train.lr=1e-4", "--resume"]) == 2
        line = _error_line(capsys.readouterr().err)
        assert line == (
            f"error: train.out_dir {run} is in use by another process (pid {a.pid}, holding "
            f"{run / '.lock'}); wait for it to end or choose another train.out_dir"
        ), line
        assert stand_in.is_dir() and (run / "config.yaml").read_bytes() == config and a.poll() is None
        stand_in.rmdir()
        a.send_signal(signal.SIGINT)
        _, err = a.communicate(timeout=120)
    finally:
        if a.poll() is None:
            a.kill()
            a.communicate()
    assert a.returncode == 130, err
    line = _error_line(err)
    kept = newest_valid_checkpoint(run)
    assert line.startswith("interrupted at step ") and f"the last checkpoint kept is {kept};" in line, line
    command = line.split("continue with: ", 1)[1]
    assert command.startswith("python -m jitrope.train --config ") and command.endswith(" --resume")
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    # the lock went with A; the printed command continues the run (a few more steps here)
    step = load_weights(run)["step"]
    resumed = [a for a in shlex.split(command)[3:] if not a.startswith("train.steps=")] + [f"train.steps={step + 1}"]
    assert T.main(resumed) == 0
    assert load_weights(run)["step"] == step + 1
    assert json.loads((run / "checkpoints" / f"step_{step + 1:08d}" / "manifest.json").read_text())["step"] == step + 1


def test_sigterm_in_the_steps_writes_that_step_and_before_them_stops_at_once(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    real = TR._Run.train_step

    def step_then_sigterm(self):
        real(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(TR._Run, "train_step", step_then_sigterm)
    args = BASE + [f"train.out_dir={run}", "train.steps=50", "train.ckpt_every=10"]
    assert T.main(args) == 143
    ck = run / "checkpoints" / "step_00000003"
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"preempted (SIGTERM) at step 3, its checkpoint written; the last checkpoint kept is {ck};")
    assert [p for _, p in list_checkpoints(run)] == [ck] and load_weights(run)["step"] == 3
    monkeypatch.setattr(TR._Run, "start", lambda self: os.kill(os.getpid(), signal.SIGTERM))  # setting up: no step
    assert T.main(args + ["--resume"]) == 143
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"terminated (SIGTERM) at step 3; the last checkpoint kept is {ck}; continue with: ")
    assert signal.getsignal(signal.SIGTERM) is before  # put back


@pytest.mark.slow  # ~20 s on a busy machine: a second Python process that imports torch
def test_sigterm_is_preemption_a_checkpoint_of_that_step_the_resume_command_and_143(tmp_path):
    """What SLURM and Kubernetes send before they take the machine back: it used to end the trainer
    at once, with no message and only the last periodic checkpoint."""
    run = tmp_path / "run"
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore::RuntimeWarning",
    )
    # no periodic checkpoint will come: the one written is the one SIGTERM asked for
    args = BASE + [f"train.out_dir={run}", "train.steps=100000", "train.ckpt_every=100000", "train.log_every=1"]
    a = subprocess.Popen(
        [sys.executable, "-m", "jitrope.train", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        metrics = run / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):  # it is taking steps
            assert a.poll() is None, a.stderr.read()
            assert time.monotonic() < deadline, "the trainer took no step within 60 s"
            time.sleep(0.05)
        a.send_signal(signal.SIGTERM)
        _, err = a.communicate(timeout=120)
    finally:
        if a.poll() is None:
            a.kill()
            a.communicate()
    err = err.decode()
    assert a.returncode == 143, err
    line = _error_line(err)
    kept = newest_valid_checkpoint(run)
    step = load_weights(run)["step"]
    assert kept.name == f"step_{step:08d}" and step >= 2, line
    assert line.startswith(f"preempted (SIGTERM) at step {step}, its checkpoint written; ")
    assert f"the last checkpoint kept is {kept};" in line, line
    command = line.split("continue with: ", 1)[1]
    assert command.startswith("python -m jitrope.train --config ") and command.endswith(" --resume")
    assert not (run / ".lock").exists() and not [p for p in (run / "checkpoints").iterdir() if p.name[0] == "."]
    resumed = [a for a in shlex.split(command)[3:] if not a.startswith("train.steps=")] + [f"train.steps={step + 1}"]
    assert T.main(resumed) == 0
    assert load_weights(run)["step"] == step + 1
