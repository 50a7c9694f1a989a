"""FSDP2 (`fully_shard`) parameters: the few operations the projection and the edit need on sharded tensors.

Under FSDP2 each trainable parameter is a `DTensor` whose rank-local shard is a slice of the whole
tensor. The L∞ box is element-wise, so it is applied shard by shard; the L2 norm is global, so the
shards' squared sums are all-reduced once (over the mesh dimensions the tensor is sharded along:
replicas are not counted twice). Everything here is the identity for plain tensors.

`end_process_group` ends a distributed run (DDP or FSDP2) so that the process exits cleanly.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (a view: writing to it writes the parameter), else the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective under FSDP2: every rank must call it), else the tensor."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` (the same whole tensor on every rank) laid out as `param`: sharded the same way, on its device."""
    full = full.to(device=local(param).device, dtype=param.dtype)
    if isinstance(param, DTensor):
        return distribute_tensor(full, param.device_mesh, param.placements)
    return full


def all_reduce_(value: torch.Tensor, params: Iterable[torch.Tensor], op: dist.ReduceOp.RedOpType) -> torch.Tensor:
    """Reduce `value`, computed from the local shards of `params`, over the ranks those shards are split over."""
    sharded = next((p for p in params if isinstance(p, DTensor)), None)
    if sharded is None:
        return value
    mesh = sharded.device_mesh
    for dim, placement in enumerate(sharded.placements):
        if placement.is_shard():
            dist.all_reduce(value, op=op, group=mesh.get_group(dim))
    return value


GLOO_WORKER = "pt_gloo_runloop"  # the name torch gives the threads that run Gloo's collectives


def gloo_workers() -> int:
    """How many Gloo worker threads this process runs (Linux, where threads are named in /proc; else 0)."""
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return 0
    count = 0
    for task in os.listdir(tasks):
        try:
            with open(os.path.join(tasks, task, "comm")) as handle:
                count += handle.read().strip() == GLOO_WORKER
        except OSError:  # the thread ended while we looked
            pass
    return count


def end_process_group() -> None:
    """End this process's process group and join its worker threads while the interpreter is whole.

    Gloo runs collectives on worker threads that are joined only when the C++ process group is destroyed,
    that is when the last object holding it is freed (a DDP wrapper, an FSDP2 module, its DTensors, an
    optimizer over them, often inside reference cycles); `destroy_process_group` alone only unregisters it.
    A worker that frees a finished collective's tensors after the interpreter began to finalise cannot take
    the GIL and the process aborts after a successful run ("terminate called without an active exception").
    So: call this once the run's trainers and models are released; it empties torch's DTensor caches (they keep
    every device mesh, and so its group, for the life of the process), collects the cycles, destroys the group,
    and raises if a worker survived (something still holds a sharded model), instead of a random abort at exit.
    """
    if not dist.is_available() or not dist.is_initialized():
        return
    _clear_dtensor_caches()
    gc.collect()
    dist.destroy_process_group()
    gc.collect()  # the group's last Python references can sit in cycles only destroy_process_group broke
    if (alive := gloo_workers()) > 0:
        raise RuntimeError(
            f"the process group ended but {alive} Gloo worker thread(s) still run: a model, optimizer or tensor of "
            "the distributed run is still referenced. Release them (del trainer, model) before end_process_group()."
        )


def _clear_dtensor_caches() -> None:
    """Empty the caches through which torch's DTensor keeps device meshes (and their process groups) alive: the
    redistribution planners, their transforms, the mesh topologies and the sharding propagation of ops."""
    if "torch.distributed.tensor" not in sys.modules:  # nothing was sharded
        return
    from torch.distributed.tensor import DTensor, _collective_utils, _redistribute

    propagator = DTensor._op_dispatcher.sharding_propagator
    for cache in (
        getattr(_redistribute, "_planner_cache", None),
        getattr(_redistribute, "_gen_transform_infos", None),
        getattr(getattr(_collective_utils, "MeshTopoInfo", None), "build_from_mesh", None),
        getattr(propagator, "propagate_op_sharding", None),
        getattr(type(propagator), "_propagate_tensor_meta_cached", None),
    ):
        clear = getattr(cache, "clear", None) or getattr(cache, "cache_clear", None)
        if clear is not None:
            clear()
    native = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)  # the C++ dispatch fast path's copy
    if native is not None:
        native()
