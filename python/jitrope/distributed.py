"""Training on many ranks: how the model's gradients meet (``train.parallel``: DDP or FSDP2), the
micro-batches of an optimizer step (``train.grad_accum_steps``), and the full state a checkpoint
holds whatever trained it.

- ``ddp``: every rank holds the whole model; DDP averages the gradients (all-reduce).
- ``fsdp``: :func:`torch.distributed.fsdp.fully_shard` on every block, then on the root (FSDP2, as
  torchtitan): parameters, gradients, the AdamW state and the EMAs are DTensors sharded over the
  ranks (dim 0), all-gathered block by block for the forward and backward and reduce-scattered
  after it. On CUDA with bf16 autocast the blocks compute with bf16 parameters and reduce in
  float32 (``MixedPrecisionPolicy``); the root (embedders, positional encoding, final layer) keeps
  float32 parameters, so timestep features and learned frequencies lose nothing, and autocast runs
  its matmuls in bf16 as under ddp. On the CPU everything is float32. With one process, fsdp runs
  over a one-rank group: nothing is sharded, the same code path runs.

A checkpoint is the same whatever trained it (:func:`full_state`, :func:`optimizer_state`): full
weights gathered to rank 0, and the optimizer's ``state_dict`` as one process would hold it
(parameters numbered in model order). Every parallel mode and every number of ranks loads it
(:func:`shard_like`, :func:`load_optimizer_state`).

The loss of a step is the mean over every pixel of every image of every rank and micro-batch (as
one process's packed loss): each micro-batch's mean loss is weighted by its share of the step's
pixels (:func:`loss_weights`), times the number of ranks, since DDP and FSDP average gradients.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP

__all__ = [
    "PARALLEL",
    "Parallel",
    "loss_weights",
    "full_state",
    "optimizer_state",
    "load_optimizer_state",
    "shard_like",
    "local_tensor",
    "any_rank",
    "local_bytes",
]

PARALLEL = ("ddp", "fsdp")


class _PackedForward(nn.Module):
    """``model.forward_tokens`` as a module's forward, so DDP (which hooks ``forward``) wraps the packed call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model.forward_tokens(*args, **kwargs)


class Parallel:
    """The model of one rank, wrapped for ``kind`` (``ddp`` or ``fsdp``) over ``world`` ranks.

    Build it before the EMA and the optimizer: under fsdp the model's parameters become sharded
    DTensors here, in place. Then :meth:`wrap` gives the callables of the training step,
    :meth:`sync` is the context of each micro-batch, :meth:`clip_grad_norm_` clips the step's gradients.
    """

    def __init__(self, model: nn.Module, kind: str, world: int, device: torch.device, *, amp: bool):
        if kind not in PARALLEL:
            raise ValueError(f"train.parallel must be one of {list(PARALLEL)}, got {kind!r}")
        self.model, self.kind, self.world, self.device = model, kind, world, device
        self.sharded = kind == "fsdp"
        self.ddp: Optional[DDP] = None
        self._own_group = False
        if self.sharded:
            if not dist.is_initialized():  # one process: FSDP2 over a group of one
                backend = "nccl" if device.type == "cuda" else "gloo"
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
                self._own_group = True
            _shard(model, bf16=amp and device.type == "cuda")

    def wrap(self, compile_mode: str, packed: bool) -> Tuple:
        """``(net, packed_net)``: the model's batched forward and its packed ``forward_tokens``, wrapped
        for the ranks (DDP) and compiled (``compile_mode``; under fsdp each block, see docs/training.md)."""
        model, compiled = self.model, compile_mode != "none"
        if self.sharded:
            if compiled:  # each block, in place (names unchanged); fixed-size batches: static shapes, one
                # graph per sequence length (before and after the in-context tokens join)
                for block in model.blocks:
                    block.compile(mode=compile_mode, dynamic=packed)
            return model, model.forward_tokens
        if self.world == 1:
            net, packed_net = model, model.forward_tokens
        else:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DDP(_PackedForward(model) if packed else model, device_ids=ids)
            net = packed_net = self.ddp
        if compiled:
            net = torch.compile(net, mode=compile_mode) if not packed else net
            # packed batches: compiled once for every size mix (mark_dynamic per step)
            packed_net = torch.compile(packed_net, mode=compile_mode) if packed else packed_net
        return net, packed_net

    def sync(self, last: bool):
        """The context of one micro-batch's forward and backward: gradients are reduced over the ranks
        only in the last micro-batch of a step (DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``)."""
        if self.sharded:
            self.model.set_requires_gradient_sync(last)
        elif self.ddp is not None and not last:
            return self.ddp.no_sync()
        return contextlib.nullcontext()

    def clip_grad_norm_(self, params: Sequence[Tensor], max_norm: float) -> Tensor:
        """``clip_grad_norm_`` over the ranks' gradients (the full norm under fsdp); the norm before clipping."""
        if not self.sharded:
            return nn.utils.clip_grad_norm_(params, max_norm)
        grads = [p.grad for p in params if p.grad is not None]
        total = nn.utils.get_total_norm(grads, 2.0)
        if isinstance(total, DTensor):  # the sum of the shards' squares, reduced over the ranks
            total = total.full_tensor()
        nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    def close(self) -> None:
        if self._own_group and dist.is_initialized():
            dist.destroy_process_group()


def _shard(model: nn.Module, bf16: bool) -> None:
    """``fully_shard`` on every block, then on the root (which keeps float32 parameters)."""
    block_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    root_mp = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in model.blocks:
        fully_shard(block, mp_policy=block_mp if bf16 else MixedPrecisionPolicy())
    # the root's parameters are needed again at once by the backward: kept gathered until then
    fully_shard(model, mp_policy=root_mp if bf16 else MixedPrecisionPolicy(), reshard_after_forward=False)
    register_fsdp_forward_method(model, "forward_tokens")
    # forward_tokens returns a view of its last layer's output; the loss only reads it (out of place),
    # so the pre-backward hook FSDP2 warns about is never dropped
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPJiT\) returned a view tensor")


def loss_weights(pixels: Sequence[Sequence[int]], world: int) -> List[List[float]]:
    """The weight of each of this rank's micro-batch mean losses, from ``pixels[m][r]`` (the pixels of
    micro-batch m of rank r, for every rank): ``world * pixels[m][rank] / total``, so that the gradient
    averaged over the ranks is that of the mean over every pixel of the step. Indexed ``[m][r]``."""
    total = sum(sum(row) for row in pixels)
    return [[world * n / total for n in row] for row in pixels]


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor; any other tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def local_bytes(tensors) -> int:
    """Bytes of this rank's shards of ``tensors``."""
    return sum(local_tensor(t).numel() * local_tensor(t).element_size() for t in tensors)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def any_rank(flags: Sequence[bool]) -> List[bool]:
    """Each flag true on any rank (one all-reduce; without a process group the flags themselves)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(flags)
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=backend_device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def full_state(sd: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """A state dict with full tensors: DTensors are all-gathered (every rank must call it) one at a time and
    kept on rank 0 only, on the CPU (the other ranks get ``{}``). A state dict without DTensors is returned
    as it is."""
    if not any(isinstance(v, DTensor) for v in sd.values()):
        return sd
    main, out = _rank() == 0, {}
    for k, v in sd.items():
        full = v.full_tensor() if isinstance(v, DTensor) else v
        if main:
            out[k] = full.detach().cpu()
        del full
    return out


def shard_like(full: Dict[str, Tensor], like: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """``full`` (full tensors, e.g. a checkpoint's) on ``like``'s devices, and sharded as ``like``'s DTensors
    (every rank holds ``full``, so no communication)."""
    out = {}
    for k, v in full.items():
        ref = like.get(k)
        if isinstance(ref, DTensor):
            out[k] = distribute_tensor(v.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None)
        else:
            out[k] = v.to(ref.device) if isinstance(ref, Tensor) else v
    return out


def _sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimizer's ``state_dict`` as one process holds it (parameters numbered in model order, full
    tensors). Under fsdp every rank must call it; rank 0 gets the gathered state (on the CPU), the others ``{}``."""
    if not _sharded(model):
        return opt.state_dict()
    osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not osd:
        return {}
    ids: Dict[str, int] = {}
    groups = []
    for g in osd["param_groups"]:
        groups.append({**g, "params": [ids.setdefault(n, len(ids)) for n in g["params"]]})
    return {"state": {ids[n]: s for n, s in osd["state"].items()}, "param_groups": groups}


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, sd: dict) -> None:
    """Load an :func:`optimizer_state` (written by any parallel mode and number of ranks) into ``opt``;
    under fsdp each rank keeps its shards."""
    if not _sharded(model):
        opt.load_state_dict(sd)
        return
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for g in opt.param_groups for p in g["params"]]
    if len(sd["param_groups"]) != len(opt.param_groups) or len(names) != sum(
        len(g["params"]) for g in sd["param_groups"]
    ):
        raise ValueError("the optimizer state has another number of parameters or parameter groups")
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
    fqn = {"state": {names[int(i)]: s for i, s in sd["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, opt, fqn, options=StateDictOptions(full_state_dict=True))
