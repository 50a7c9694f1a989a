import pytest
import torch

from hf_memedit import FactCollator, FactEncoder, FactEncodingError, filter_encodable

from .helpers import FACTS


def test_masked_multi_token_object(bert_tokenizer):
    encoded = FactEncoder(bert_tokenizer, "masked").encode("The largest city of Ontario is [Y].", "Kitchener-Waterloo")
    object_ids = bert_tokenizer("Kitchener-Waterloo", add_special_tokens=False)["input_ids"]
    assert len(object_ids) == 3
    masks = [i for i, t in enumerate(encoded["input_ids"]) if t == bert_tokenizer.mask_token_id]
    assert len(masks) == 3 and masks == list(range(masks[0], masks[0] + 3))
    assert [encoded["labels"][i] for i in masks] == object_ids
    assert all(label == -100 for i, label in enumerate(encoded["labels"]) if i not in masks)
    text = bert_tokenizer.decode(encoded["input_ids"])
    assert text == "[CLS] the largest city of ontario is [MASK] [MASK] [MASK]. [SEP]"


def test_causal_multi_token_object_is_scored_at_its_own_positions(bpe_tokenizer):
    encoded = FactEncoder(bpe_tokenizer, "causal").encode("The largest city of Ontario is [Y].", "Kitchener-Waterloo")
    ids, labels = encoded["input_ids"], encoded["labels"]
    prompt = bpe_tokenizer("The largest city of Ontario is", add_special_tokens=False)["input_ids"]
    target = bpe_tokenizer(" Kitchener-Waterloo", add_special_tokens=False)["input_ids"]
    assert len(target) > 1
    # The prompt ends before the object; the text after it ('.') is dropped.
    assert ids == prompt + target
    assert labels == [-100] * len(prompt) + target
    # With the model's shift, object token k is predicted from position len(prompt)+k-1: its own position.
    shifted = labels[1:]
    positions = [i for i, label in enumerate(shifted) if label != -100]
    assert positions == list(range(len(prompt) - 1, len(prompt) - 1 + len(target)))
    assert bpe_tokenizer.decode(ids[len(prompt) :]) == " Kitchener-Waterloo"


def test_collator_pads_inputs_and_labels(bert_tokenizer, bpe_tokenizer):
    batch = FactCollator(bert_tokenizer, "masked")(FACTS[:3])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert int((batch["labels"] != -100).sum()) == 1 + 1 + 3
    bpe_tokenizer.padding_side = "left"  # ignored: causal positions must not shift
    try:
        batch = FactCollator(bpe_tokenizer, "causal")([FACTS[0], FACTS[2], FACTS[3]])
    finally:
        bpe_tokenizer.padding_side = "right"
    assert (batch["attention_mask"][:, 0] == 1).all()  # every row starts at position 0


@pytest.mark.parametrize(
    "text, obj, message",
    [
        ("The capital of France is Paris.", "Paris", "has no placeholder"),
        ("[Y] and [Y].", "Paris", "more than one placeholder"),
        ("The capital of France is [Y].", "  ", "is empty"),
        ("The capital of France is [Y].", "\u2603", "cannot encode the object"),
    ],
)
def test_bad_facts_raise_naming_the_fact(bert_tokenizer, text, obj, message):
    with pytest.raises(FactEncodingError, match=message):
        FactEncoder(bert_tokenizer, "masked").encode(text, obj)


def test_bad_facts_can_be_filtered_with_a_count(bert_tokenizer):
    facts = FACTS[:2] + [{"text": "no placeholder", "object": "x"}, {"text": "[Y] is cold.", "object": "\u2603"}]
    kept, dropped = filter_encodable(facts, FactEncoder(bert_tokenizer, "masked"))
    assert kept == FACTS[:2]
    assert [index for index, _ in dropped] == [2, 3]
    with pytest.raises(FactEncodingError, match="no placeholder"):
        FactCollator(bert_tokenizer, "masked")(facts)


def test_missing_field_and_mask_token(bert_tokenizer, bpe_tokenizer):
    with pytest.raises(FactEncodingError, match="has no 'object' field"):
        FactCollator(bert_tokenizer, "masked")([{"text": "[Y]."}])
    with pytest.raises(ValueError, match="has no mask token"):
        FactEncoder(bpe_tokenizer, "masked")
    with pytest.raises(ValueError, match="Unknown model kind"):
        FactEncoder(bert_tokenizer, "seq2seq")


def test_max_length(bert_tokenizer):
    with pytest.raises(FactEncodingError, match="more than max_length=4"):
        FactEncoder(bert_tokenizer, "masked", max_length=4).encode("The capital of France is [Y].", "Paris")
    assert (
        torch.tensor(FactEncoder(bert_tokenizer, "masked", max_length=64).encode("[Y].", "Paris")["input_ids"]).numel()
        == 4
    )
