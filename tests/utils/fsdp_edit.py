"""Projected Adam on a tiny Llama whose blocks FSDP2's `fully_shard` split over the ranks (gloo on the CPU).

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 tests/utils/fsdp_edit.py OUT NORM DELTA shard
    python tests/utils/fsdp_edit.py OUT NORM DELTA whole          (the one-process reference)

Every rank trains on the same batch (so the averaged gradients equal one process's), the projector works on
the shards (`NormBallProjector.rebind`), and the whole edited tensors are written (rank 0) for comparison.
accelerate's own FSDP plugin needs a GPU, so this drives torch's `fully_shard` directly, as accelerate does.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard


sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from hf_memedit import BlockSelectorConfig, NormBallProjector, get_edit_model  # noqa: E402
from hf_memedit.sharding import end_process_group, is_sharded  # noqa: E402
from tests.helpers import TINY  # noqa: E402


def main(out: str, norm: str, delta: float, mode: str) -> None:
    shard = mode == "shard"
    rank = dist.get_rank() if shard else 0
    model = TINY["llama"](3, vocab=64).double()
    edit = get_edit_model(model, BlockSelectorConfig(blocks=["1", "2"]))
    projector = NormBallProjector(edit.trainable_parameters(), edit.theta0, norm, delta)
    if shard:
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        projector.rebind(dict(model.named_parameters()))
        assert all(is_sharded(p) for p in projector.params.values())
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(4):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        projector.project_()
        optimizer.zero_grad()
    distance = projector.distance()
    changed = {n: v.clone() for n, v in edit.changed_tensors().items()}  # whole tensors: a collective under FSDP2
    edit.save_pretrained(os.path.join(out, f"edit_{mode}"), is_main_process=rank == 0)
    edit.revert()
    reverted = all(
        torch.equal(value, edit.theta0[name])
        for name, value in {
            n: (p.full_tensor() if is_sharded(p) else p).detach() for n, p in edit.trainable_parameters().items()
        }.items()
    )
    if rank == 0:
        save_file(
            {name: value.contiguous() for name, value in changed.items()}, os.path.join(out, f"{mode}.safetensors")
        )
        record = {
            "distance": distance,
            "projections": projector.num_projections,
            "changed": len(changed),
            "reverted": reverted,
            "world_size": dist.get_world_size() if shard else 1,
        }
        with open(os.path.join(out, f"{mode}.json"), "w") as handle:
            json.dump(record, handle)


if __name__ == "__main__":
    if sys.argv[4] == "shard":
        dist.init_process_group("gloo")
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4])
    end_process_group()  # main's sharded model is released: its Gloo workers are joined before exit
