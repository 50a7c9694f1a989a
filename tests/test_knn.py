"""kNN-LM for modification: distances kept straight, the datastore overrides only within ε."""

import pytest
import torch

from hf_memedit.evaluation.scoring import evaluate_facts
from hf_memedit.knn import KnnDatastore, object_states, pairwise_distance

from .helpers import FACTS, tiny_bert


def test_distances_by_hand():
    queries = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    keys = torch.tensor([[3.0, 0.0], [0.0, -1.0]])
    l2 = pairwise_distance(queries, keys, "l2")
    assert torch.allclose(l2, torch.tensor([[2.0, 2**0.5], [13**0.5, 3.0]], dtype=torch.float64))
    cosine = pairwise_distance(queries, keys, "cosine")  # a distance: 0 for the same direction, 2 for opposite
    assert torch.allclose(cosine, torch.tensor([[0.0, 1.0], [1.0, 2.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="Unknown metric"):
        pairwise_distance(queries, keys, "dot")


# A random tiny BERT puts every mask state in nearly the same direction: cosine distances between
# different facts are ~1e-7 there, L2 distances ~1e-3; the same text gives 0 (to rounding).
@pytest.mark.parametrize("metric, small", [("l2", 1e-6), ("cosine", 1e-9)])
def test_datastore_overrides_within_epsilon_only(metric, small, bert_tokenizer):
    model = tiny_bert(bert_tokenizer.vocab_size, layers=2)
    modified = [{"text": f["text"], "object": "lima"} for f in FACTS[:3]]  # new object for three facts
    store = KnnDatastore.build(model, bert_tokenizer, modified, metric=metric)
    assert store.keys.shape == (3, 16)
    lima = bert_tokenizer.convert_tokens_to_ids("lima")
    assert store.values == [[lima]] * 3

    results = store.predict(model, bert_tokenizer, modified + FACTS[3:], epsilons=[-1.0, small, 1e9])
    own = evaluate_facts(model, bert_tokenizer, modified + FACTS[3:])
    assert results[-1.0].predicted == own.predicted  # nothing is closer than a negative ε
    assert results[small].correct[:3] == [True, True, True]  # the training texts themselves: distance 0
    assert results[small].predicted[3:] == own.predicted[3:]  # other facts are farther away
    assert all(p == [lima] for p in results[1e9].predicted)  # ε = ∞: every fact takes a neighbour's object


def test_object_states_are_taken_where_the_object_is_predicted(bert_tokenizer):
    model = tiny_bert(bert_tokenizer.vocab_size, layers=2).eval()
    fact = FACTS[0]
    state = object_states(model, bert_tokenizer, [fact])[0]
    from hf_memedit import FactCollator

    batch = FactCollator(bert_tokenizer, "masked")([fact])
    position = int((batch.pop("labels")[0] != -100).nonzero()[0])
    with torch.no_grad():
        hidden = model.base_model(**batch).last_hidden_state[0, position]
    assert torch.allclose(state, hidden)
