"""FSDP2 (`fully_shard`) parameters: the few operations the projection and the edit need on sharded tensors.

Under FSDP2 each trainable parameter is a `DTensor` whose rank-local shard is a slice of the whole
tensor. The L∞ box is element-wise, so it is applied shard by shard; the L2 norm is global, so the
shards' squared sums are all-reduced once (over the mesh dimensions the tensor is sharded along:
replicas are not counted twice). Everything here is the identity for plain tensors.
"""

from __future__ import annotations

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
