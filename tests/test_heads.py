"""Object-position-only logits (fast_paths.heads): the same logits and gradients as the full forward."""

import contextlib

import pytest
import torch

from hf_memedit import ARCHITECTURES, evaluate_facts
from hf_memedit.architectures import block_list, model_kind
from hf_memedit.collators import FactCollator

from .helpers import FACTS, TINY, assert_agree_up_to_reordering


@pytest.mark.parametrize("arch", sorted(TINY))
def test_object_position_logits_equal_full_logits(arch, bert_tokenizer):
    """The table's LM head, run on the object positions only, gives the full forward's logits there,
    and the same gradients, with the last block's row-wise stages (query, attention output,
    feed-forward) run on those rows only."""
    from hf_memedit import object_positions_only
    from hf_memedit.fast_paths.heads import logit_positions

    torch.manual_seed(0)
    model = TINY[arch](2).eval()
    layout = ARCHITECTURES[arch]
    assert layout.head
    with torch.no_grad():  # weights large enough that attention is far from uniform: every key then counts
        for parameter in block_list(model, layout)[-1].parameters():
            parameter.normal_(0.0, 0.5)
    fast = evaluate_facts(model, bert_tokenizer, FACTS, batch_size=3)
    full = evaluate_facts(model, bert_tokenizer, FACTS, batch_size=3, full_logits=True)
    assert fast == full and all(fast.predicted)

    kind = model_kind(model)
    batch = FactCollator(bert_tokenizer, kind)(FACTS)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    positions = logit_positions(batch["labels"], kind)
    seen = {stage: [] for stage in layout.row_wise}
    if not layout.shared_blocks:  # ALBERT's one layer runs at every depth: it stays whole
        assert layout.row_wise
        for stage in layout.row_wise:
            first = block_list(model, layout)[-1].get_submodule(stage[0])
            first.register_forward_hook(
                lambda module, args, output, stage=stage: seen[stage].append(tuple(args[0].shape[:2]))
            )

    def logits_and_grads(restricted: bool):
        model.zero_grad()
        with object_positions_only(model, positions) if restricted else contextlib.nullcontext():
            logits = model(**inputs).logits
            logits = logits if restricted else logits[positions]
            logits.log_softmax(-1)[:, 0].sum().backward()  # any loss on these logits
        return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    expected, expected_grads = logits_and_grads(restricted=False)
    logits, grads = logits_and_grads(restricted=True)
    assert_agree_up_to_reordering({"logits": logits}, {"logits": expected})
    assert_agree_up_to_reordering(grads, expected_grads)
    for shapes in seen.values():
        assert shapes == [tuple(batch["input_ids"].shape), (1, int(positions.sum()))]


def test_a_head_the_configuration_does_not_build_runs_in_full(bert_tokenizer):
    """DeBERTa-v2 with legacy=False builds `lm_predictions` instead of the table's `cls`: no head is
    assumed, and evaluation runs the full head."""
    from transformers import DebertaV2ForMaskedLM

    from hf_memedit.fast_paths.heads import head_modules

    from .helpers import TINY

    legacy = TINY["deberta-v2"](2).eval()
    assert head_modules(legacy) is not None
    model = DebertaV2ForMaskedLM(type(legacy.config)(**{**legacy.config.to_dict(), "legacy": False})).eval()
    assert head_modules(model) is None
    with pytest.raises(ValueError, match="does not know the LM head of DebertaV2ForMaskedLM"):
        from hf_memedit import object_positions_only

        with object_positions_only(model, torch.ones(1, 1, dtype=torch.bool)):
            pass
    assert len(evaluate_facts(model, bert_tokenizer, FACTS, batch_size=3)) == len(FACTS)  # it falls back, no error
