"""Which facts a model gets right: every object token must be the argmax at its position."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .architectures import model_kind
from .collators import FactCollator


@torch.no_grad()
def fact_predictions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    facts: Sequence[Mapping],
    batch_size: int = 64,
    show_progress: bool = False,
) -> tuple[list[bool], list[list[int]]]:
    """Per fact: whether every object token is predicted (greedy, teacher-forced), and the predicted ids.

    Masked LM: argmax over the full vocabulary at each mask. Causal LM: the argmax at the position
    before each object token, which is greedy decoding when all earlier object tokens are right.
    """
    if not facts:
        raise ValueError("No facts to evaluate: the split is empty.")
    kind = model_kind(model)
    collator = FactCollator(tokenizer, kind)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(facts)), key=lambda i: len(facts[i][collator.text_key]))
    correct: list[bool] = [False] * len(facts)
    predicted: list[list[int]] = [[] for _ in facts]
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc="evaluating facts", disable=not show_progress):
        index = order[start : start + batch_size]
        batch = collator([facts[i] for i in index])
        labels = batch.pop("labels").to(device)
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        if kind == "causal":
            logits, labels = logits[:, :-1], labels[:, 1:]
        guesses = logits.argmax(-1)
        for row, fact_index in enumerate(index):
            mask = labels[row] != -100
            ids = guesses[row][mask]
            correct[fact_index] = bool(torch.equal(ids, labels[row][mask]))
            predicted[fact_index] = ids.tolist()
    model.train(was_training)
    return correct, predicted
