"""ConstrainedEditTrainer on a model whose blocks FSDP2's `fully_shard` wrapped (one gloo rank on the CPU): the
trainer's own path — the projector rebound to the sharded parameters, the box kept on them, the edit gathered
and saved. accelerate's FSDP plugin needs a GPU; this wraps as it would, in either order:

- `before`: the model is wrapped by hand before the trainer is made;
- `prepared`: as accelerate's plugin in `train()`: the optimizer is made first, then `prepare(model, optimizer)`
  shards the model in place and hands the optimizer the new parameters.

    python tests/utils/fsdp_trainer.py OUT [before|prepared]
"""

import json
import os
import sys

import torch.distributed as dist
from datasets import Dataset
from torch.distributed.fsdp import fully_shard


sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from hf_memedit import ConstrainedEditTrainer, EditConfig, end_process_group  # noqa: E402
from hf_memedit.sharding import is_sharded  # noqa: E402
from tests.helpers import FACTS, TINY  # noqa: E402


def shard(model) -> None:
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)


def shard_when_prepared(trainer, model) -> None:
    """What accelerate's FSDP2 plugin does in `prepare(model, optimizer)`, after the Trainer made the optimizer."""
    prepare = trainer.accelerator.prepare

    def sharding_prepare(*objects, **kwargs):
        if len(objects) == 2 and objects[0] is model:
            names = {id(p): n for n, p in model.named_parameters()}
            shard(model)
            current = dict(model.named_parameters())
            for group in objects[1].param_groups:
                group["params"] = [current[names[id(p)]] for p in group["params"]]
        return prepare(*objects, **kwargs)

    trainer.accelerator.prepare = sharding_prepare


def main(out: str, order: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = [f["text"].replace("[Y]", f["object"]) for f in FACTS] * 10
    tokenizer.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")
    model = TINY["llama"](3, vocab=len(tokenizer))
    facts = [f for f in FACTS if not f["text"].startswith("[Y]")]
    args = EditConfig(
        output_dir=out,
        edit_blocks=["2"],
        norm="linf",
        delta=1e-2,
        max_steps=3,
        learning_rate=1e-2,
        per_device_train_batch_size=4,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        prefix_cache=False,
        use_cpu=True,
    )
    trainer = ConstrainedEditTrainer(model, args, train_dataset=Dataset.from_list(facts), processing_class=tokenizer)
    if order == "before":
        shard(model)
    else:
        shard_when_prepared(trainer, model)
    trainer.train()
    params = trainer.projector.params
    record = {
        "sharded": all(is_sharded(p) for p in params.values()),
        "same_objects": all(params[n] is p for n, p in model.named_parameters() if n in params),
        "projections": trainer.projector.num_projections,
        "distance": trainer.projector.distance(),
    }
    trainer.edit_model.save_pretrained(os.path.join(out, "edit"))
    record["saved"] = sorted(os.listdir(os.path.join(out, "edit")))
    record["changed"] = len(trainer.edit_model.changed_tensors())
    with open(os.path.join(out, "record.json"), "w") as handle:
        json.dump(record, handle)


if __name__ == "__main__":
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"), RANK="0", WORLD_SIZE="1"
    )
    dist.init_process_group("gloo", rank=0, world_size=1)
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "before")
    end_process_group()  # the trainer and its sharded model are released: Gloo's workers are joined before exit
