"""evaluate_facts: hand-computable cases for both model kinds, multi-token objects, candidates,
padding, bad input; and the real SmolLM2 against a naive per-fact `generate` loop."""

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import MaskedLMOutput

from hf_memedit import FactEncoder, FactEncodingError, candidate_vocabulary, evaluate_facts
from hf_memedit.benchmarks import load_benchmark
from hf_memedit.evaluation.scoring import generate_facts, normalize_answer

from .helpers import naive_greedy_correct, tiny_bert


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def predict_constant(model, favourite: int, runner_up: int):
    """Make `model` put its highest logit on `favourite` and the second on `runner_up`, everywhere."""
    vocab = model.get_output_embeddings().weight.shape[0]

    def forward(input_ids, attention_mask=None, **kwargs):
        logits = torch.zeros(*input_ids.shape, vocab)
        logits[..., favourite], logits[..., runner_up] = 2.0, 1.0
        return MaskedLMOutput(logits=logits)

    model.forward = forward
    return model


def ids_of(tokenizer, kind, text, obj):
    encoded = FactEncoder(tokenizer, kind).encode(text, obj)
    return [label for label in encoded["labels"] if label != -100]


@pytest.mark.parametrize("kind", ["masked", "causal"])
def test_hand_computed_accuracy_with_multi_token_objects(kind, bert_tokenizer, bpe_tokenizer):
    tokenizer = bert_tokenizer if kind == "masked" else bpe_tokenizer
    model = tiny_bert(len(tokenizer)) if kind == "masked" else tiny_llama(len(tokenizer))
    text = "The capital of France is [Y]."
    paris, = ids_of(tokenizer, kind, text, "Paris")
    other, = ids_of(tokenizer, kind, text, "capital")  # one token under both vocabularies
    assert ids_of(tokenizer, kind, text, "Paris Paris") == [paris, paris]
    assert ids_of(tokenizer, kind, text, "Paris capital") == [paris, other]
    facts = [{"text": text, "object": obj} for obj in ("Paris", "Paris Paris", "Paris capital", "capital")]
    predict_constant(model, favourite=paris, runner_up=other)

    results = evaluate_facts(model, tokenizer, facts, full_logits=True)  # the patched forward gives the logits
    assert results.correct == [True, True, False, False]  # every object token must be right
    assert results.accuracy == 0.5
    assert results.predicted == [[paris], [paris, paris], [paris, paris], [paris]]

    # Restricted to candidates without "Paris", the runner-up wins.
    restricted = evaluate_facts(model, tokenizer, facts, candidates=[other, paris + 1], full_logits=True)
    assert restricted.correct == [False, False, False, True]
    # The LAMA-style vocabulary of the objects "capital" and "Lyon" holds no "Paris" either.
    vocabulary = candidate_vocabulary(tokenizer, ["capital", "Lyon"])
    assert other in vocabulary and paris not in vocabulary
    assert vocabulary == sorted(set(vocabulary))
    lama = evaluate_facts(model, tokenizer, facts, candidates=vocabulary, full_logits=True)
    assert lama.correct == restricted.correct and all(set(ids) <= set(vocabulary) for ids in lama.predicted)


def test_causal_padding_never_shifts_positions(bpe_tokenizer):
    """Batched right-padded evaluation equals one fact at a time, whatever the tokenizer's padding side."""
    model = tiny_llama(len(bpe_tokenizer), seed=3)
    facts = [
        {"text": "The capital of France is [Y].", "object": "Paris"},
        {"text": "The largest city of Ontario is [Y].", "object": "Kitchener-Waterloo"},
        {"text": "Oslo: [Y]", "object": "Oslo"},
    ]
    alone = [evaluate_facts(model, bpe_tokenizer, [fact]).predicted[0] for fact in facts]
    bpe_tokenizer.padding_side = "left"
    try:
        batched = evaluate_facts(model, bpe_tokenizer, facts, batch_size=3).predicted
    finally:
        bpe_tokenizer.padding_side = "right"
    assert batched == alone
    assert [len(p) for p in alone] == [len(ids_of(bpe_tokenizer, "causal", f["text"], f["object"])) for f in facts]


def test_results_come_back_in_input_order_and_training_mode_is_restored(bert_tokenizer):
    model = tiny_bert(len(bert_tokenizer)).train()
    facts = [{"text": "[Y].", "object": "a"}, {"text": "A much longer sentence about [Y] here.", "object": "b"}]
    forward = evaluate_facts(model, bert_tokenizer, facts, batch_size=1)
    backward = evaluate_facts(model, bert_tokenizer, facts[::-1], batch_size=2)
    assert backward.predicted == forward.predicted[::-1]
    assert model.training


def test_bad_input_gets_clear_errors(bert_tokenizer, bpe_tokenizer):
    model = tiny_bert(len(bert_tokenizer))
    with pytest.raises(ValueError, match="No facts to evaluate"):
        evaluate_facts(model, bert_tokenizer, [])
    encoder_only = BertModel(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8))
    with pytest.raises(ValueError, match="neither a masked nor a causal"):
        evaluate_facts(encoder_only, bert_tokenizer, [{"text": "[Y]", "object": "a"}])
    with pytest.raises(ValueError, match="has no mask token"):
        evaluate_facts(tiny_bert(len(bpe_tokenizer)), bpe_tokenizer, [{"text": "[Y]", "object": "a"}])
    with pytest.raises(FactEncodingError, match="nothing to predict it from"):
        evaluate_facts(tiny_llama(len(bpe_tokenizer)), bpe_tokenizer, [{"text": "[Y] is big.", "object": "Paris"}])
    with pytest.raises(ValueError, match="must lie in"):
        evaluate_facts(model, bert_tokenizer, [{"text": "[Y]", "object": "a"}], candidates=[10**9])


@pytest.mark.slow
def test_smollm2_matches_a_naive_greedy_generate_loop(smollm2):
    """The batched teacher-forced evaluator agrees, fact by fact, with greedy `generate`."""
    model, tokenizer = smollm2
    splits = load_benchmark("geo_mod", m=8, relations=["P36"], object_last=True, max_facts_per_relation=64)
    facts = list(splits["modified_test"]) + list(splits["unmodified_test"])
    results = evaluate_facts(model, tokenizer, facts, batch_size=16)
    assert evaluate_facts(model, tokenizer, facts, batch_size=16, full_logits=True) == results

    naive = naive_greedy_correct(model, tokenizer, facts)
    assert results.correct == naive
    # A real model that knows capitals: some right (originals), none of the new capitals (modified).
    assert 0.1 < sum(naive[8:]) / len(naive[8:]) < 0.9
    assert not any(naive[:8])


@pytest.mark.slow
def test_generation_scoring_is_stricter_than_teacher_forcing(smollm2):
    """Greedy generation must produce the object and then stop (EOS, newline or period): every fact it scores right
    is right under teacher forcing too, and a real model gets some right."""
    model, tokenizer = smollm2
    splits = load_benchmark("geo_mod", m=8, relations=["P36"], object_last=True, max_facts_per_relation=64)
    facts = list(splits["unmodified_test"])
    forced = evaluate_facts(model, tokenizer, facts, batch_size=16).correct
    generated = generate_facts(model, tokenizer, facts, batch_size=7)
    assert generated == generate_facts(model, tokenizer, facts, batch_size=32)  # batching (left padding) changes nothing
    assert all(f for g, f in zip(generated, forced) if g)
    assert 0 < sum(generated) <= sum(forced)


def test_answers_are_normalised_as_squad_does(bert_tokenizer):
    assert normalize_answer("  The Paris, ") == "paris" and normalize_answer("St. John's") == "st johns"
    with pytest.raises(ValueError, match="causal LM"):
        generate_facts(tiny_bert(bert_tokenizer.vocab_size), bert_tokenizer, [{"text": "[Y] is big.", "object": "a"}])


def test_next_token_drift_is_zero_at_theta0_and_the_kl_of_the_two_models(bpe_tokenizer):
    from contextlib import contextmanager

    from hf_memedit.evaluation.metrics import next_token_drift

    from .helpers import TINY

    torch.manual_seed(0)
    model = TINY["llama"](2).double()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}

    @contextmanager
    def at_theta0():
        current = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(theta0[n])
        yield
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(current[n])

    sequences = [[5, 9, 11, 3], [7, 2, 8]]
    same = next_token_drift(model, bpe_tokenizer, sequences, at_theta0)
    assert same["drift_kl"] == pytest.approx(0.0, abs=1e-12) and same["perplexity_ratio"] == pytest.approx(1.0)
    assert same["n_drift_tokens"] == 5  # the next tokens of both sequences, not the padding
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.add_(0.5)
    moved = next_token_drift(model, bpe_tokenizer, sequences, at_theta0)

    @torch.no_grad()
    def summed_kl(sequence: list[int]) -> float:
        ids = torch.tensor([sequence])
        lp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        with at_theta0():
            lp0 = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        return float((lp0.exp() * (lp0 - lp)).sum())

    expected = (summed_kl(sequences[0]) + summed_kl(sequences[1])) / 5
    assert moved["drift_kl"] == pytest.approx(expected, rel=1e-9) and moved["drift_kl"] > 0
