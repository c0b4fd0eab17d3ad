"""Training a JiT with the x-prediction / v-loss objective: :func:`train` runs (or continues) the run a
config describes (``python -m jitrope.train`` is its command line, :mod:`jitrope.train`).

Every random draw of step k (data order, t, noise, label / condition dropout, dropout inside the
model) comes from generators seeded with ``(train.seed, k)``, and a checkpoint holds the
optimizer, EMA and data-order state, so a resumed run continues bit for bit as if it had never
stopped. The global batch of a step is the same for any number of ranks; rank r takes every
N-th sample of it. Only rank 0 writes (checkpoints, config, ``metrics.jsonl``, TensorBoard, sample
grids). ``<out_dir>/metrics.jsonl`` holds one JSON record per logged step (:mod:`jitrope.runlog`:
loss, lr, grad norm, images/s, wall and CPU time); a resumed run first drops the records beyond
its checkpoint, so the file stays one consistent history after a crash.

Many ranks and micro-batches (:mod:`jitrope.distributed`): micro-batch m of ``train.grad_accum_steps``
takes the m-th slice of the global batch, and rank r every N-th sample of that. With packed mixed-size
batches (``data.sizes``) rank r packs its own ``train.tokens_per_batch`` for micro-batch m from the
generator of ``(seed, step, part m * N + r)``; every rank draws every part's sizes, so the ranks agree
on the step's data order and loss: the mean over every pixel of every image of the step, as one
process's. ``train.parallel`` (ddp or fsdp) and ``train.activation_checkpointing`` change how a step is
computed, not what.

Nothing a user has is lost: rank 0 holds an exclusive lock on ``train.out_dir`` for the whole run
(a second trainer on the same folder stops at once, naming the pid that holds it); a checkpoint
is written only when the weights, EMAs and optimizer state are finite and can be used (the raw
weights and the sampled EMA give a finite loss on a fixed probe batch, :mod:`jitrope.usable`), so it
never prunes the last one that can; ``keep_last`` deletes only checkpoints that verify. SIGTERM is
preemption (:mod:`jitrope.preempt`): the step finishes and a checkpoint of it is written. A run that
stops early (the loss or the weights diverged, a checkpoint could not be written, Ctrl-C, SIGTERM)
raises :class:`TrainingStopped`, which says in one line what happened, which checkpoint is the last
one kept and how to continue. When a step that only rank 0 takes fails
(preparing ``train.out_dir``, fetching the data, writing a checkpoint or a sample grid), the other
ranks learn it in place of a barrier and stop too (:class:`jitrope.runtime.RankFailed`), rather than
wait for it forever.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from tqdm import tqdm

from .checkpoint import (
    CheckpointError,
    check_state_dict,
    clean_stale_temps,
    latest_checkpoint,
    load_train_state,
    load_weights,
    newest_valid_checkpoint,
    resolved_configs,
    save_checkpoint,
)
from .config import Config, ConfigError
from .data import BatchMaker, DataError, IndexStream, MultiResMaker, TokenPacker, build_dataset, parse_sizes
from .diffusion import EMA, Diffusion
from .distributed import (
    Parallel,
    any_rank,
    full_state,
    load_optimizer_state,
    local_tensor,
    loss_weights,
    optimizer_state,
    shard_like,
)
from .fileio import check_writable_dir, exclusive_lock
from .grids import condition_rows, make_grid
from .model import JiT
from .packing import mark_dynamic, pack_images
from .preempt import EXIT_SIGTERM, Terminated, sigterm_as_preemption
from .runlog import MetricsLogger
from .runtime import Dist, rank_device, setup_device
from .sampling import NonFiniteSamples, generate
from .usable import unusable_state

__all__ = ["train", "lr_at", "step_generator", "TrainingStopped"]


class TrainingStopped(RuntimeError):
    """Training stopped before ``train.steps``: the weights or the loss stopped being finite (or no
    longer give a finite forward), a checkpoint could not be written, Ctrl-C, or SIGTERM.
    ``last_checkpoint`` is the newest checkpoint kept (None: none yet); ``exit_code`` is the CLI's
    (2, 130 for an interrupt, 143 for SIGTERM)."""

    def __init__(self, what: str, step: int, last_checkpoint: Optional[Path], hint: str = "", exit_code: int = 2):
        self.what, self.step, self.last_checkpoint = what, step, last_checkpoint
        self.hint, self.exit_code = hint, exit_code
        super().__init__(self.describe("--resume"))

    def describe(self, resume_command: str) -> str:
        """One line: what happened, what was kept, how to continue (with ``resume_command``)."""
        if self.last_checkpoint is not None:
            kept, go_on = f"the last checkpoint kept is {self.last_checkpoint}", f"continue with: {resume_command}"
        else:
            kept, go_on = "no checkpoint was written yet", "run it again to start over"
        return "; ".join(x for x in (self.what, kept, self.hint, go_on) if x)


def lr_at(cfg: Config, step: int) -> float:
    """Learning rate of update ``step`` (0-based): ``blr * batch / 256`` (or ``train.lr``), linear warmup."""
    t = cfg.train
    base = t.lr if t.lr is not None else t.blr * t.batch_size / 256
    if t.warmup_steps > 0:
        return base * min(1.0, (step + 1) / t.warmup_steps)
    return base


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """The CPU generator of ``stream`` at ``step`` (independent of ranks, resumes, batch layout)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 16 + stream)


def part_generator(seed: int, step: int, part: int) -> torch.Generator:
    """The CPU generator of packed batch ``part`` (micro-batch m of rank r is part ``m * ranks + r``) at
    ``step``: part 0 is :func:`step_generator`'s stream 0, so one process draws what it always drew."""
    if part == 0:
        return step_generator(seed, step)
    digest = hashlib.blake2b(f"jitrope-part:{seed}:{step}:{part}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def _diff_keys(a: Dict[str, Any], b: Dict[str, Any], prefix: str) -> List[Tuple[str, str]]:
    """``(key, "prefix.key: checkpoint A vs now B")`` for every key whose values differ."""
    keys = sorted(set(a) | set(b))
    return [(k, f"{prefix}.{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}") for k in keys if a.get(k) != b.get(k)]


# Keys of where and how this machine computes, not of what is trained (fused and torch positional
# ops, and the packed attention kernels, compute the same thing): --resume lets them differ.
_RUNTIME_KEYS = {"data": ("root", "download"), "model": ("pos_impl", "packed_attn")}


class _Logger:
    """TensorBoard scalars and images on rank 0 (a warning, not an error, without tensorboard)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(run_dir / "tb"))
            except ImportError as e:
                warnings.warn(
                    f"TensorBoard logging is off: {e} (pip install tensorboard)", RuntimeWarning, stacklevel=2
                )

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def image(self, tag: str, step: int, img) -> None:
        if self.tb is not None:
            import numpy as np

            self.tb.add_image(tag, np.asarray(img), step, dataformats="HWC")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _sample_grid(
    model_cfg,
    ema_model,
    diffusion: Diffusion,
    cfg: Config,
    val_maker: Optional[BatchMaker],
    class_names: Sequence[str],
    device,
) -> Any:
    """One row per class (EMA weights, CFG from sample.*), plus condition rows when the model has a
    condition image: [condition | samples] for held-out images."""
    n = 8
    k = model_cfg.num_classes
    labels = torch.arange(k).repeat_interleave(n)
    rows, cond_rows = list(class_names), None
    if model_cfg.cond_img_size is not None and val_maker is not None:
        m = min(4, len(val_maker.ds))
        idx = torch.linspace(0, len(val_maker.ds) - 1, m).long()
        u = step_generator(cfg.train.seed, 0, 9)
        _, yv, cv = val_maker(idx, torch.rand(m, 2, generator=u))
        cond_rows = cv.cpu()
        labels = torch.cat([labels, yv.cpu().repeat_interleave(n)])
        # class rows get the null condition: the model's cond=None path is per batch, so the
        # condition rows are sampled separately below
    s = cfg.sample
    kw = dict(
        steps=cfg.train.sample_steps,
        sampler=s.sampler,
        cfg=s.cfg,
        cfg_interval=s.cfg_interval,
        seed=cfg.train.seed,
        batch_size=64,
        device=device,
    )
    x = generate(ema_model, diffusion, labels[: k * n], None, **kw)
    imgs = [x]
    if cond_rows is not None:
        lab = labels[k * n :]
        xc = generate(ema_model, diffusion, lab, cond_rows.repeat_interleave(n, dim=0), **kw)
        imgs.append(condition_rows(cond_rows, xc, n))
        rows += [f"cond | {class_names[int(lab[r * n])]}" for r in range(len(cond_rows))]
        # class rows have n images, condition rows n + 1: pad the class rows with a blank first cell
        blank = torch.ones(1, *x.shape[1:])
        imgs[0] = torch.cat([torch.cat([blank, x[i * n : (i + 1) * n]]) for i in range(k)])
        ncol = n + 1
    else:
        ncol = n
    scale = max(1, 64 // model_cfg.img_size)
    return make_grid(torch.cat(imgs), ncol, row_labels=rows, scale=scale)


def train(cfg: Config, *, resume: bool = False, allow_unverified: bool = False, log=print) -> Dict[str, Any]:
    """Run (or continue) the training that ``cfg`` describes: lock ``train.out_dir``, setup, resume,
    then the loop of :meth:`_Run.train_step` with logging, sample grids and checkpoints.

    ``allow_unverified``: resume from a checkpoint without a manifest (with a warning). A run that
    stops early raises :class:`TrainingStopped` (Ctrl-C included); another process holding
    ``train.out_dir`` raises a :class:`jitrope.fileio.LockedError`.
    Returns ``{"step", "loss" (mean of the last log interval), "run_dir", "model", "ema"}``.
    """
    t = cfg.train
    run_dir = Path(t.out_dir)
    device = rank_device(t.device, int(os.environ.get("LOCAL_RANK", "0")))
    D = Dist(device)
    setup_device(device, t.num_threads)
    say = log if D.main else (lambda *a, **k: None)
    run, ckpt_dir = None, None
    try:
        with contextlib.ExitStack() as held:
            preempt = held.enter_context(sigterm_as_preemption())  # SIGTERM: a checkpoint of the step, exit 143
            with D.together("preparing train.out_dir"):
                if D.main:
                    # checked before the data and the model, not at the first checkpoint; locked before anything
                    # in it is touched, so a second trainer on the folder changes nothing
                    check_writable_dir(run_dir, "train.out_dir")
                    held.enter_context(exclusive_lock(run_dir, "train.out_dir"))
                    # rank 0 holds the folder's lock, so no checkpoint is being written; the cleanup may
                    # rename a checkpoint back, so every rank lists the folder after it
                    for p in clean_stale_temps(run_dir):
                        say(f"removed {p}, left by an interrupted checkpoint write")
            ckpt_dir = _find_resume_point(run_dir, resume, allow_unverified, say)
            run = _Run(cfg, device, D, say, allow_unverified)
            if ckpt_dir is not None:
                run.step, run.last_loss = _restore(
                    ckpt_dir, cfg, run.model, run.ema, run.opt, run.stream, device, allow_unverified, say
                )
                run.last_ckpt = ckpt_dir
                say(f"resumed from {ckpt_dir} at step {run.step}")
                if run.step >= t.steps:
                    say(
                        f"the run is already at step {run.step} >= train.steps={t.steps}; raise train.steps to train on"
                    )
            run.start()
            run.loop(preempt)
            return {"step": run.step, "loss": run.last_loss, "run_dir": run.run_dir, "model": run.model, "ema": run.ema}
    except (KeyboardInterrupt, Terminated) as e:
        step, term = (run.step if run is not None else 0), isinstance(e, Terminated)
        raise TrainingStopped(
            f"{'terminated (SIGTERM)' if term else 'interrupted'} at step {step}",
            step,
            run.last_ckpt if run is not None else ckpt_dir,
            exit_code=EXIT_SIGTERM if term else 130,
        ) from None
    finally:
        if run is not None:
            run.close()
        D.close()


def _find_resume_point(run_dir: Path, resume: bool, allow_unverified: bool, say) -> Optional[Path]:
    """The checkpoint to continue from (None: a fresh start)."""
    newest = latest_checkpoint(run_dir)
    if newest is not None and not resume:
        raise CheckpointError(
            f"{run_dir} already holds checkpoints (newest {newest.name}); pass --resume to continue "
            "or choose another train.out_dir"
        )
    ckpt_dir = newest_valid_checkpoint(run_dir, allow_unverified=allow_unverified) if resume else None
    if resume and ckpt_dir is None:
        say(f"--resume: no checkpoint in {run_dir}, starting from scratch")
    return ckpt_dir


def _check_data_fits(cfg: Config, mcfg, ds, world: int) -> None:
    if mcfg.num_classes != ds.num_classes:
        raise ConfigError(f"model.num_classes={mcfg.num_classes} but data {cfg.data.name} has {ds.num_classes} classes")
    if mcfg.img_size != cfg.data.img_size:
        raise ConfigError(f"model.img_size={mcfg.img_size} but data.img_size={cfg.data.img_size}")
    if (mcfg.cond_img_size is None) != (cfg.data.cond == "none"):
        raise ConfigError(
            f"model.cond_img_size={mcfg.cond_img_size} and data.cond={cfg.data.cond} disagree: a condition "
            "image needs both (e.g. model.cond_img_size=16 data.cond=downsample) or neither"
        )
    B, A = cfg.train.batch_size, cfg.train.grad_accum_steps
    if not cfg.data.sizes and B % (world * A):  # packed batches: each rank packs its own budget
        raise ConfigError(
            f"train.batch_size={B} is not divisible by {world} rank(s) x train.grad_accum_steps={A} = "
            f"{world * A}: every micro-batch of every rank takes the same whole number of images"
        )


class _Run:
    """The state of one training run and its steps: data, model, EMA and optimizer (built in
    ``__init__``), then :meth:`start`, and :meth:`loop` over :meth:`train_step`, :meth:`log_step`,
    :meth:`sample_step` and :meth:`checkpoint_step`."""

    def __init__(self, cfg: Config, device: torch.device, D: Dist, say, allow_unverified: bool = False):
        self.cfg, self.t, self.device, self.D, self.say = cfg, cfg.train, device, D, say
        self.run_dir, self.logger, self.bar, self.metrics = Path(cfg.train.out_dir), None, None, None
        self.allow_unverified = allow_unverified
        self.last_ckpt: Optional[Path] = None  # the newest checkpoint kept (resumed from or written)
        self._build_data()
        torch.manual_seed(self.t.seed)
        self.model = JiT(self.mcfg).to(device)
        self.packer: Optional[TokenPacker] = None
        if cfg.data.sizes:
            self._build_packing()
        if self.mcfg.pos_impl == "fused" and self.model.pos_impl != "fused":
            say("warning: the fused ops are unavailable, training with pos_impl=torch (same numbers, slower)")
        self.model.activation_checkpointing = self.t.activation_checkpointing
        self.amp = self.t.amp == "bf16" or (self.t.amp == "auto" and device.type == "cuda")
        if self.t.parallel == "fsdp" and D.world == 1:
            say("train.parallel=fsdp on one process: FSDP2 over a group of one rank (nothing is sharded)")
        # before the EMA and the optimizer: under fsdp the parameters become sharded DTensors here
        self.par = Parallel(self.model, self.t.parallel, D.world, device, amp=self.amp)
        self.ema = EMA(self.model, self.t.ema_decays, warmup=self.t.ema_warmup)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr_at(cfg, 0), betas=(0.9, 0.95), weight_decay=0.0)
        self.stream = IndexStream(len(self.ds), self.t.seed, rank=D.rank, world=D.world)
        self.step, self.last_loss = 0, float("nan")

    def _build_data(self) -> None:
        """Rank 0 fetches (and caches) the data first; the others read the cache after it."""
        cfg, D = self.cfg, self.D
        with D.together("fetching the data"):
            if D.main:
                self._load_data()
        with D.together("reading the data"):  # a rank may fail on its own (a file of the cache it cannot read)
            if not D.main:
                self._load_data()
        self.mcfg = cfg.model_config()
        _check_data_fits(cfg, self.mcfg, self.ds, D.world)
        bm_kw = dict(cond=cfg.data.cond, cond_size=self.mcfg.cond_img_size, device=self.device)
        self.maker = BatchMaker(self.ds, hflip=cfg.data.hflip, **bm_kw)
        self.val_maker = BatchMaker(self.val, **bm_kw) if self.val is not None else None

    def _load_data(self) -> None:
        cfg, train_data = self.cfg, self.cfg.data
        if cfg.data.sizes:  # mixed sizes are resized from images at the largest side, not up from img_size
            side = max(max(hw) for hw in parse_sizes(cfg.data.sizes, "data.sizes"))
            if cfg.data.name == "emoji":
                side = max(side, 64)  # the emoji's own size: each size is then resized once, from the source
            train_data = dataclasses.replace(cfg.data, img_size=max(side, cfg.data.img_size))
        self.ds = build_dataset(train_data, "train", seed=self.t.seed, log=self.say)
        try:
            self.val = build_dataset(cfg.data, "val", seed=self.t.seed, log=self.say)
        except DataError:
            self.val = None

    def _build_packing(self) -> None:
        """The token-budget packer and the mixed-size batch maker of ``data.sizes`` (every rank builds its own)."""
        cfg, model = self.cfg, self.model
        sizes = parse_sizes(cfg.data.sizes, "data.sizes")
        cond_sizes, costs = None, []
        if self.mcfg.cond_img_size is not None:
            # each image's condition image at its own size, in the training ratio (the null condition's grid)
            cp = self.mcfg.cond_patch
            try:
                grids = [model._grids(hw, None, f"data.sizes {hw[0]}x{hw[1]}: ")[1] for hw in sizes]
            except ValueError as e:
                raise ConfigError(str(e)) from None
            cond_sizes = [(g[0] * cp, g[1] * cp) for g in grids]
        for k, hw in enumerate(sizes):
            try:
                lay = model.packed_layout([hw], None if cond_sizes is None else [cond_sizes[k]])
            except ValueError as e:
                raise ConfigError(f"data.sizes {hw[0]}x{hw[1]}: {e}") from None
            costs.append(lay.n_tokens)
        try:
            self.packer = TokenPacker(sizes, costs, self.t.tokens_per_batch)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.cond_sizes = cond_sizes
        p = self.mcfg.patch_size
        self.image_tokens = [(h // p) * (w // p) for h, w in sizes]  # the loss weight of each size: its pixels
        self.mr_maker = MultiResMaker(
            self.ds, sizes, cond=cfg.data.cond, cond_sizes=cond_sizes, hflip=cfg.data.hflip, device=self.device
        )

    def start(self) -> None:
        """Wrap the model (DDP, torch.compile), write the run's config and open the logs."""
        t, D, device = self.t, self.D, self.device
        # packed batches run forward_tokens; compiled once for every size mix (mark_dynamic per step)
        self.net, self.packed_net = self.par.wrap(t.compile_mode, packed=self.packer is not None)
        self.diffusion = Diffusion.from_config(self.cfg.diffusion)
        if D.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.cfg.save(self.run_dir / "config.yaml")
            self.logger = _Logger(self.run_dir, t.tensorboard)
            self.metrics = MetricsLogger(self.run_dir, resume_step=self.step)
        n_params = sum(p.numel() for p in self.model.parameters())
        self.say(
            f"{len(self.ds)} training images ({self.cfg.data.name}, {self.ds.num_classes} classes), "
            f"{len(self.val) if self.val is not None else 0} held out; JiT {n_params / 1e6:.2f}M params, "
            f"pos_embed={self.mcfg.pos_embed} ({self.model.pos_impl}), {D.world} rank(s) on {device}, "
            + (
                f"batch {t.batch_size}"
                if self.packer is None
                else f"packed batches of {t.tokens_per_batch} tokens over sizes {', '.join(self.cfg.data.sizes)}"
            )
            + f", lr {lr_at(self.cfg, t.warmup_steps):.2e}"
            + (f", {t.grad_accum_steps} micro-batches per step" if t.grad_accum_steps > 1 else "")
            + (", fsdp" if self.par.sharded else "")
            + (", activation checkpointing" if t.activation_checkpointing else "")
        )

    def loop(self, preempt) -> None:
        t, D = self.t, self.D
        self.bar = tqdm(
            total=t.steps,
            initial=self.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=(not D.main) or (not t.progress) or None,
        )
        self.loss_acc, self.n_acc = torch.zeros((), device=self.device), 0
        self.t_log, self.imgs_log = time.perf_counter(), 0
        self.t_start, self.cpu_start, self.first_log = self.t_log, time.process_time(), True
        self.grad_norm = torch.zeros(())
        self.waste_acc = 0.0  # padding waste of packed batches, summed over the log interval
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.model.train()
        preempt.steps_begin()
        while self.step < t.steps:
            self.train_step()
            if self.step % t.log_every == 0 or self.step == t.steps:
                self.log_step()
            if t.sample_every > 0 and (self.step % t.sample_every == 0 or self.step == t.steps):
                ema0 = full_state(self.ema.state_dict(0)) if self.par.sharded else None  # every rank gathers
                with D.together(f"writing the sample grid of step {self.step}"):
                    if D.main:
                        self.sample_step(ema0)
            stop = preempt.requested(D)  # SIGTERM on any rank (one all-reduce): every rank checkpoints this step
            if stop or self.step % t.ckpt_every == 0 or self.step == t.steps:
                self.checkpoint_step()
            if stop:
                raise TrainingStopped(
                    f"preempted (SIGTERM) at step {self.step}, its checkpoint written",
                    self.step,
                    self.last_ckpt,
                    exit_code=EXIT_SIGTERM,
                )
        self.bar.close()

    def train_step(self) -> None:
        """One optimizer update over ``train.grad_accum_steps`` micro-batches; every random draw comes from
        generators seeded with (seed, step). Each micro-batch's mean loss is weighted by its share of the
        step's pixels (times the ranks, whose gradients DDP / FSDP average): the step's loss is the mean
        over every pixel of every image, whatever the ranks and micro-batches."""
        t, D, step = self.t, self.D, self.step
        for gr in self.opt.param_groups:
            gr["lr"] = lr_at(self.cfg, step)
        micro = self._packed_batches(step) if self.packer is not None else self._batches(step)
        loss_sum = torch.zeros((), device=self.device)
        for m, (weight, args, kw) in enumerate(micro):
            with self.par.sync(last=m == t.grad_accum_steps - 1):
                # dropout in the model
                torch.manual_seed(step_generator(t.seed, step, 1).initial_seed() + D.rank + D.world * m)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                    loss = self.diffusion.loss(self.packed_net if "layout" in kw else self.net, *args, **kw)
                (loss * weight).backward()
            loss_sum += loss.detach() * weight
        self.grad_norm = self.par.clip_grad_norm_(self.params, t.grad_clip if t.grad_clip > 0 else float("inf"))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update()
        self.step += 1
        self.loss_acc += loss_sum
        self.n_acc += 1
        self.bar.update(1)

    def _batches(self, step: int):
        """The micro-batches of this rank at ``step``: ``(weight, loss args, loss kwargs)`` each. The global
        batch is drawn as one; micro-batch m is its m-th slice, of which rank r takes every N-th sample."""
        t, D, device, mcfg = self.t, self.D, self.device, self.mcfg
        B, A = t.batch_size, t.grad_accum_steps
        idx = self.stream.next_global(B)
        g = step_generator(t.seed, step)
        tt = self.diffusion.sample_t(B, generator=g)
        noise = torch.randn(B, mcfg.in_channels, mcfg.img_size, mcfg.img_size, generator=g)
        u = torch.rand(B, 4, generator=g)
        self.imgs_log += B
        for m in range(A):
            sel = slice(m * (B // A) + D.rank, (m + 1) * (B // A), D.world)
            x, y, cond = self.maker(idx[sel], u[sel, 2:])
            y = torch.where(u[sel, 0].to(device) < t.label_drop, torch.full_like(y, mcfg.num_classes), y)
            cond_drop = (u[sel, 1] < t.cond_drop).to(device) if cond is not None else None
            yield 1.0 / A, (x, y, cond, cond_drop), dict(t=tt[sel].to(device), noise=noise[sel].to(device))

    def _packed_batches(self, step: int):
        """This rank's packed micro-batches at ``step``, as :meth:`_batches`. Every rank draws the sizes of
        every part (micro-batch m of rank q is part ``m * N + q``, :func:`part_generator`): the parts take
        consecutive runs of the step's data order, and each loss is weighted by its part's pixels."""
        t, D = self.t, self.D
        W, A = D.world, t.grad_accum_steps
        gens = [[part_generator(t.seed, step, m * W + q) for q in range(W)] for m in range(A)]
        picks = [[self.packer.draw(g) for g in row] for row in gens]
        weights = loss_weights([[sum(self.image_tokens[k] for k in p) for p in row] for row in picks], W)
        counts = [len(p) for row in picks for p in row]
        idx = self.stream.next_global(sum(counts))
        self.imgs_log += sum(counts)
        self.waste_acc += sum(self.packer.waste(p) for row in picks for p in row) / len(counts)
        for m in range(A):
            start = sum(counts[: m * W + D.rank])
            part = picks[m][D.rank]
            batch = self._packed_batch(gens[m][D.rank], part, idx[start : start + len(part)])
            yield weights[m][D.rank], batch[:4], dict(t=batch[4], noise=batch[5], layout=batch[6])

    def _packed_batch(self, g: torch.Generator, picks: List[int], idx: Tensor):
        """The packed batch of images ``idx`` at the sizes ``picks`` (drawn from ``g``), filling
        ``train.tokens_per_batch``: ``(x, y, cond, cond_drop, t, noise, layout)`` with pixel tokens on the
        device. t, noise, labels / condition dropout, offsets and flips come from ``g``, after the sizes."""
        t, device, mcfg = self.t, self.device, self.mcfg
        S = len(picks)
        sizes = [self.packer.sizes[k] for k in picks]
        layout = self.model.packed_layout(
            sizes, None if self.cond_sizes is None else [self.cond_sizes[k] for k in picks]
        )
        tt = self.diffusion.sample_t(S, generator=g, n_tokens=layout.image_tokens)
        noise = torch.randn(layout.n_image, mcfg.patch_size**2 * mcfg.in_channels, generator=g)
        u = torch.rand(S, 5, generator=g)
        xs, y, conds = self.mr_maker(idx, picks, u[:, 2:])
        y = torch.where(u[:, 0].to(device) < t.label_drop, torch.full_like(y, mcfg.num_classes), y)
        cond_drop = (u[:, 1] < t.cond_drop).to(device) if conds is not None else None
        x = pack_images(xs, mcfg.patch_size).to(device)
        cond = None if conds is None else pack_images(conds, mcfg.cond_patch, name="conds").to(device)
        layout, tt, noise = layout.to(device), tt.to(device), noise.to(device)
        if t.compile_mode != "none":
            mark_dynamic(layout, x, cond, noise, tt, y, cond_drop)
        return x, y, cond, cond_drop, tt, noise, layout

    def _packing_scalars(self) -> Dict[str, float]:
        """The mean padding waste of the interval's packed batches (unused fraction of the token budget)."""
        if self.packer is None or self.n_acc == 0:
            return {}
        waste, self.waste_acc = self.waste_acc / self.n_acc, 0.0
        return {"train/padding_waste": waste}

    def log_step(self) -> None:
        """The mean loss of the interval (over ranks), throughput, TensorBoard scalars."""
        step, t = self.step, self.t
        mean_loss = float(self.D.mean(self.loss_acc / self.n_acc))
        if not math.isfinite(mean_loss):
            over = f" (the mean of steps {step - self.n_acc + 1}..{step})" if self.n_acc > 1 else ""
            raise TrainingStopped(
                f"the training diverged: the loss is {mean_loss} at step {step}{over}",
                step,
                self.last_ckpt,
                _DIVERGED_HINT,
            )
        now = time.perf_counter()
        ips = self.imgs_log / max(now - self.t_log, 1e-9)
        packing = self._packing_scalars()
        self.last_loss = mean_loss
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{ips:.0f}")
        if self.logger is not None:
            self.logger.scalars(
                step,
                {
                    "train/loss": mean_loss,
                    "train/lr": lr_at(self.cfg, step - 1),
                    "train/grad_norm": float(self.grad_norm),
                    "train/images_per_s": ips,
                    **packing,
                },
            )
        if self.metrics is not None:
            off = self.metrics.offsets
            self.metrics.log(
                {
                    "loss": mean_loss,
                    "lr": lr_at(self.cfg, step - 1),
                    "grad_norm": float(self.grad_norm),
                    "images_per_s": ips,
                    "interval_steps": self.n_acc,
                    "wall_s": round(off["wall_s"] + now - self.t_start, 3),
                    "cpu_s": round(off["cpu_s"] + time.process_time() - self.cpu_start, 3),
                    "time": round(time.time(), 3),
                    "startup": self.first_log,
                    **{k.split("/", 1)[1]: v for k, v in packing.items()},
                },
                step,
            )
            self.first_log = False
        if self.D.main and self.bar.disable:
            waste = f"  waste {packing['train/padding_waste']:.1%}" if packing else ""
            self.say(
                f"step {step}/{t.steps}  loss {mean_loss:.4f}  grad {float(self.grad_norm):.3f}  {ips:.1f} img/s"
                + waste
            )
        self.loss_acc.zero_()
        self.n_acc, self.t_log, self.imgs_log = 0, now, 0

    def sample_step(self, ema_state: Optional[Dict[str, Tensor]] = None) -> None:
        """The sample grid of EMA 0 (``ema_state``: its gathered weights, when the model is sharded)."""
        ema_model = self.ema.averaged_module(0) if ema_state is None else self._plain_model(ema_state)
        try:
            grid = _sample_grid(
                self.mcfg, ema_model, self.diffusion, self.cfg, self.val_maker, self.ds.class_names, self.device
            )
        except NonFiniteSamples:
            what = f"the training diverged: the sample grid of step {self.step} came out nan or inf"
            raise TrainingStopped(what, self.step, self.last_ckpt, _DIVERGED_HINT) from None
        (self.run_dir / "samples").mkdir(exist_ok=True)
        grid.save(self.run_dir / "samples" / f"step_{self.step:08d}.png")
        self.logger.image("samples/ema0", self.step, grid)

    def checkpoint_step(self) -> None:
        D = self.D
        # every rank holds the same weights, so every rank stops here alike
        bad = _non_finite(self.model, self.ema, self.opt)
        if bad:
            raise TrainingStopped(
                f"the training diverged: the {_join(bad)} are not finite (nan or inf) after "
                f"step {self.step}, so no checkpoint was written for it",
                self.step,
                self.last_ckpt,
                _DIVERGED_HINT,
            )
        full = self._full_state()  # every rank: fsdp gathers the shards to rank 0
        bad = self._unusable(full)
        if bad:  # finite but not usable (weights of 1e30): it must not prune the last checkpoint that is
            raise TrainingStopped(
                f"the training diverged after step {self.step}: {_join(bad)}, so no checkpoint was written for it",
                self.step,
                self.last_ckpt,
                _DIVERGED_HINT,
            )
        with D.together(f"writing the checkpoint of step {self.step}"):
            if D.main:
                try:
                    self.last_ckpt = self._save(full)
                except (CheckpointError, OSError) as e:  # OSError: pruning the old ones
                    raise TrainingStopped(
                        str(e), self.step, self.last_ckpt, "free some space or fix the folder"
                    ) from None

    def _unusable(self, full) -> List[str]:
        """:func:`jitrope.usable.unusable_state` of this step, decided by rank 0 and the same on every rank.
        Under fsdp the weights are sharded: rank 0 probes the full weights and EMA that ``full``
        (:meth:`_full_state`) gathered to it, in a plain model; under ddp the model every rank holds."""
        D, sampled = self.D, self.cfg.sample.ema
        train_loss = float(D.mean(self.loss_acc))  # every rank (an all-reduce)
        bad: List[str] = []
        with D.together(f"probing the weights of step {self.step}"):
            if D.main:
                i = None if sampled == "none" else int(sampled)
                if self.par.sharded:  # the gathered weights and EMA (on the CPU) stand in for the sharded ones
                    model = self._plain_model(full[0])
                    ema = None if i is None else {k: v.to(self.device) for k, v in full[1][i].items()}
                else:
                    model, ema = self.model, None if i is None else self.ema.parameters_dict(i)
                bad = unusable_state(model, ema, sampled, self.diffusion, train_loss)
        return D.broadcast(bad)

    def _plain_model(self, state: Dict[str, Tensor]) -> JiT:
        """A JiT of this run (not sharded, not compiled) holding ``state`` (full weights), in eval mode."""
        with torch.random.fork_rng(devices=[]):  # building a model draws its initial weights
            model = JiT(self.mcfg).to(self.device)
        model.load_state_dict(state)
        return model.eval()

    def _full_state(self) -> Tuple[Dict[str, Tensor], List[Dict[str, Tensor]], dict]:
        """``(model, EMAs, optimizer)`` state dicts with full tensors, as one process holds them; under fsdp
        every rank must call it (collectives), and rank 0 gets them (the others empty dicts)."""
        emas = [full_state(self.ema.state_dict(i)) for i in range(len(self.t.ema_decays))]
        return full_state(self.model.state_dict()), emas, optimizer_state(self.model, self.opt)

    def _save(self, full=None) -> Path:
        t, D = self.t, self.D
        model, emas, opt_state = self._full_state() if full is None else full
        return save_checkpoint(
            self.run_dir,
            self.step,
            model=model,
            emas=emas,
            ema_decays=t.ema_decays,
            state=_train_state(opt_state, self.stream, self.ema, self.step, self.device, D, self.last_loss),
            config=self.cfg.to_dict(),
            class_names=self.ds.class_names,
            model_config=self.mcfg.to_dict(),
            keep_last=t.keep_last,
            allow_unverified=self.allow_unverified,
        )

    def close(self) -> None:
        self.par.close()
        if self.bar is not None:
            self.bar.close()  # before an error line, so it does not land in the bar's line
        if self.logger is not None:
            self.logger.close()
        if self.metrics is not None:
            self.metrics.close()


_DIVERGED_HINT = "lower train.lr or train.blr, or raise train.warmup_steps"


def _join(names: Sequence[str]) -> str:
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def _non_finite(model, ema: EMA, opt) -> List[str]:
    """Which of the model weights, the EMA weights and the optimizer state hold a nan or inf, on any rank
    (every rank must call it: under fsdp each one sees its shards)."""
    groups = {
        "model weights": list(model.state_dict().values()),
        "EMA weights": [v for shadow in ema.shadows for v in shadow],
        "optimizer state": [v for st in opt.state.values() for v in st.values() if isinstance(v, Tensor)],
    }
    flags = [
        any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in map(local_tensor, ts))
        for ts in groups.values()
    ]
    return [name for name, bad in zip(groups, any_rank(flags)) if bad]


def _train_state(
    opt_state: dict, stream: IndexStream, ema: EMA, step: int, device, D: Dist, loss: float
) -> Dict[str, Any]:
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return {
        "step": step,
        "optimizer": opt_state,  # as one process holds it, whatever trained it (jitrope.distributed)
        "scheduler": {"kind": "linear_warmup_constant", "step": step},
        "data": stream.state_dict(),
        "ema_updates": ema.num_updates,
        "rng": rng,
        "world_size": D.world,
        "loss": loss,  # the last logged mean loss: what a resumed, already finished run reports
    }


def _restore(
    ckpt_dir: Path,
    cfg: Config,
    model,
    ema: EMA,
    opt,
    stream: IndexStream,
    device,
    allow_unverified: bool = False,
    say=print,
) -> Tuple[int, float]:
    w = load_weights(ckpt_dir, allow_unverified=allow_unverified)
    f = w["path"]
    saved, now = resolved_configs(w, cfg)  # a key spelt out with the value it had is no change
    diffs, runtime = [], []
    for sec in ("model", "data", "diffusion"):
        for k, line in _diff_keys(saved.get(sec, {}), now[sec], sec):
            (runtime if k in _RUNTIME_KEYS.get(sec, ()) else diffs).append(line)
    for k in ("seed", "batch_size", "ema_decays", "tokens_per_batch"):
        if saved.get("train", {}).get(k) != now["train"][k]:
            diffs.append(f"train.{k}: checkpoint {saved.get('train', {}).get(k)!r} vs now {now['train'][k]!r}")
    if diffs:
        raise CheckpointError(f"{f} was written by a run with another config: {'; '.join(diffs)}")
    if runtime:
        say(f"resuming with changed runtime settings (they do not change what is trained): {'; '.join(runtime)}")
    check_state_dict(model.state_dict(), w["model"], where=f"{f} [model]")
    if len(w["emas"]) != len(ema.decays):
        raise CheckpointError(f"{f} holds {len(w['emas'])} EMAs, the run has {len(ema.decays)} (train.ema_decays)")
    for i, e in enumerate(w["emas"]):
        check_state_dict(model.state_dict(), e, where=f"{f} [ema{i}]")
    model.load_state_dict(shard_like(w["model"], model.state_dict()))  # fsdp: each rank its shards
    for i, e in enumerate(w["emas"]):
        ema.load_parameters(i, shard_like(e, ema.parameters_dict(i)))
    st = load_train_state(ckpt_dir, allow_unverified=allow_unverified)
    try:
        load_optimizer_state(model, opt, st["optimizer"])
        stream.load_state_dict(st["data"])
        ema.num_updates = int(st["ema_updates"])
        torch.set_rng_state(st["rng"]["cpu"])
        if device.type == "cuda" and "cuda" in st["rng"]:
            torch.cuda.set_rng_state(st["rng"]["cuda"], device)
        step = int(st["step"])
        loss = float(st.get("loss", float("nan")))  # checkpoints of older versions do not hold it
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{Path(ckpt_dir) / 'state.pt'}: does not fit this run ({type(e).__name__}: {e})"
        ) from None
    if step != w["step"]:
        raise CheckpointError(f"{ckpt_dir}: weights are from step {w['step']} but state.pt from step {step}")
    bad = _non_finite(model, ema, opt)
    if bad:  # written by a version that did not check; training on from it would only spread the nan
        raise CheckpointError(
            f"{ckpt_dir}: its {_join(bad)} are not finite (nan or inf); rename it (e.g. to "
            f"corrupt-{Path(ckpt_dir).name}) to resume from the checkpoint before it"
        )
    return step, loss
