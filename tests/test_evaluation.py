"""evaluate_facts: hand-computable cases for both model kinds, multi-token objects, candidates,
padding, bad input; and the real SmolLM2 against a naive per-fact `generate` loop."""

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import MaskedLMOutput

from hf_memedit import FactEncoder, FactEncodingError, candidate_vocabulary, evaluate_facts
from hf_memedit.benchmarks import load_benchmark
from hf_memedit.evaluation.metrics import generation_metrics
from hf_memedit.evaluation.scoring import answer_matches, generate_facts, normalize_answer
from hf_memedit.experiments.loading import hash_share

from .helpers import naive_greedy_correct, tiny_bert


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
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
    (paris,) = ids_of(tokenizer, kind, text, "Paris")
    (other,) = ids_of(tokenizer, kind, text, "capital")  # one token under both vocabularies
    assert ids_of(tokenizer, kind, text, "Paris Paris") == [paris, paris]
    assert ids_of(tokenizer, kind, text, "Paris capital") == [paris, other]
    facts = [{"text": text, "object": obj} for obj in ("Paris", "Paris Paris", "Paris capital", "capital")]
    predict_constant(model, favourite=paris, runner_up=other)

    results = evaluate_facts(model, tokenizer, facts, full_logits=True)  # the patched forward gives the logits
    assert results.correct == [True, True, False, False]  # every object token must be right
    assert results.accuracy == 0.5
    assert results.predicted == [[paris], [paris, paris], [paris, paris], [paris]]
    # The margin is the object token's logit over the best other one, at its weakest position.
    assert results.margins == [1.0, 1.0, -1.0, -1.0]

    # Restricted to candidates without "Paris", the runner-up wins.
    restricted = evaluate_facts(model, tokenizer, facts, candidates=[other, paris + 1], full_logits=True)
    assert restricted.correct == [False, False, False, True]
    assert restricted.margins[3] == 1.0 and restricted.margins[0] == -float("inf")  # "Paris" is no candidate
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
    encoder_only = BertModel(
        BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    )
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
    full = evaluate_facts(model, tokenizer, facts, batch_size=16, full_logits=True)
    assert full == results and full.margins == pytest.approx(results.margins, abs=1e-4)
    assert [m > 0 for m in results.margins] == results.correct  # a fact is right exactly where its margin is positive

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
    assert generated == generate_facts(
        model, tokenizer, facts, batch_size=32
    )  # batching (left padding) changes nothing
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


def test_generation_metrics_match_each_answer_to_its_object():
    """Answers are compared after normalisation; retention by generation counts only what θ0 generated right;
    without the answers before an edit there is no retention to report."""
    splits = {
        "modified_test": [{"object": "Lima"}, {"object": "Rome"}],
        "unmodified_test": [{"object": "Paris"}, {"object": "Oslo"}, {"object": "Kabul"}],
    }
    after = {"modified_test": ["lima", "Rome, the capital of"], "unmodified_test": ["the Paris", "Bergen", "Kabul"]}
    before = {"modified_test": ["Madrid", "Rome"], "unmodified_test": ["Paris", "Oslo", "Herat"]}
    assert generation_metrics(splits, after, before) == {
        "gen_a_m": 0.5,
        "gen_a_m_comma": 1.0,  # "Rome, the capital of" is Rome when the answer stops at a comma too
        "gen_a_fs": 2 / 3,
        "gen_a_fs_before": 2 / 3,
        "gen_retention": 0.5,
        "gen_n_known": 2,
        "gen_retention_comma": 0.5,
        "gen_n_known_comma": 2,
        "gen_bleed": 0.0,
        "gen_n_lost": 1,
    }  # Oslo's answer Bergen is no new object
    assert generation_metrics(splits, after) == {"gen_a_m": 0.5, "gen_a_m_comma": 1.0, "gen_a_fs": 2 / 3}


def test_new_beats_old_compares_the_objects_sequence_log_probabilities(bpe_tokenizer):
    """object_log_probs is the sum of the object tokens' log-probabilities, each given the text and the object's
    earlier tokens (a hand-run forward per fact); P(new) > P(old) is scored per fact, on every test phrasing."""
    import datasets

    from hf_memedit.evaluation.metrics import preference_metrics
    from hf_memedit.evaluation.scoring import object_log_probs

    from .helpers import TINY

    torch.manual_seed(0)
    model = TINY["llama"](2).double().eval()
    rows = [
        {"uuid": "a", "text": "The capital of France is [Y].", "object": "Lima", "original_object": "Paris"},
        {"uuid": "a", "text": "France's capital is [Y].", "object": "Lima", "original_object": "Paris"},
        {"uuid": "b", "text": "The capital of Peru is [Y].", "object": "Rome", "original_object": "Lima"},
    ]

    def by_hand(text: str, obj: str) -> float:
        prefix = bpe_tokenizer(text.split("[Y]")[0].rstrip(" "))["input_ids"]
        target = bpe_tokenizer(" " + obj, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prefix + target])).logits[0].log_softmax(-1)
        return sum(float(logits[len(prefix) - 1 + k, token]) for k, token in enumerate(target))

    found = object_log_probs(model, bpe_tokenizer, rows)
    assert found == pytest.approx([by_hand(r["text"], r["object"]) for r in rows], abs=1e-9)
    old = object_log_probs(model, bpe_tokenizer, rows, object_key="original_object")
    wins = [n > o for n, o in zip(found, old)]
    metrics = preference_metrics(model, bpe_tokenizer, {"modified_test": datasets.Dataset.from_list(rows)})
    assert metrics == {"new_beats_old": ((wins[0] and wins[1]) + wins[2]) / 2, "n_new_beats_old": 2}


def test_the_comma_stop_rule_cuts_only_objects_without_a_comma():
    """LocFT-BF's rule beside the strict one: an answer that runs on past a comma counts, an object that holds a
    comma is not cut, and what precedes the comma must still be the whole object."""
    assert answer_matches("Vanuatu, and it's a city", "Vanuatu", comma=True)
    assert not answer_matches("Vanuatu, and it's a city", "Vanuatu")
    assert answer_matches("Washington, D.C", "Washington, D.C.", comma=True)
    assert not answer_matches("Washington, the city", "Washington, D.C.", comma=True)
    assert not answer_matches("Port Vila, Vanuatu", "Vanuatu", comma=True)


@pytest.mark.slow
def test_a_run_records_what_generation_answers_and_eval_scores_it_and_the_drift_again(tmp_path, bpe_tokenizer):
    """With generation_eval each edited fact records its greedy answer beside the teacher-forced prediction (results
    and summary); the generation scores are those answers', and `memedit eval` of the saved edit gives them, and the
    drift on θ0's held-out samples, again."""
    from hf_memedit.cli import parse
    from hf_memedit.cli.edit import format_summary
    from hf_memedit.evaluation.results import ResultsRecord
    from hf_memedit.experiments import run_edit, run_sweep
    from hf_memedit.experiments.eval_run import run_eval

    from .helpers import ROOT

    base = tmp_path / "base"  # a random Llama wide enough to learn four facts in a few dozen steps
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(bpe_tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    ).save_pretrained(base)
    bpe_tokenizer.save_pretrained(base)
    argv = [
        "--config",
        str(ROOT / "trainer_configs" / "bert_tiny_ftm.yaml"),
        "--model_name_or_path",
        str(base),
        "--benchmark_options",
        '{"relations": ["P36"], "object_last": true, "max_facts_per_relation": 24}',
        "--m",
        "8",
        "--edit_blocks",
        "1",
        "--delta",
        "0.5",
        "--learning_rate",
        "1e-2",
        "--per_device_train_batch_size",
        "4",
        "--max_steps",
        "60",
        "--eos_target",
        "true",
        "--generation_eval",
        "true",
        "--drift_eval",
        "true",
    ]
    job, args, _ = parse("edit", argv + ["--output_dir", str(tmp_path / "run"), "--disable_tqdm", "true"])
    outcome = run_edit(job, args)
    record = ResultsRecord.load(tmp_path / "run")
    assert all(
        isinstance(f["generated"], str) and f["generated_correct"] == answer_matches(f["generated"], f["new"])
        for f in record.facts
    )
    assert record.metrics["gen_a_m"] == sum(f["generated_correct"] for f in record.facts) / len(record.facts) > 0
    text = (tmp_path / "run" / "results.md").read_text()
    assert "| generated after the edit |" in text and all(
        " ".join(f["generated"].split()) in text for f in record.facts
    )
    assert f"{record.facts[0]['generated']!r}" in format_summary(outcome, args, show_examples=4)
    evaluation, _ = run_eval(job, args, str(tmp_path / "run" / "edit"), "check")
    assert "stopped at a comma" in text  # both stop rules are named where their figures are
    for key in (
        "gen_a_m",
        "gen_a_m_comma",
        "gen_a_fs",
        "gen_a_fs_before",
        "gen_retention",
        "gen_retention_comma",
        "gen_n_known",
        "new_beats_old",
        "drift_kl",
        "perplexity_ratio",
    ):
        assert evaluation.metrics[key] == record.metrics[key], key
    assert record.metrics["drift_kl"] > 0
    # A sweep point is scored by generation on both halves too, against θ0's answers on each.
    job, args, _ = parse(
        "sweep",
        argv
        + [
            "--output_dir",
            str(tmp_path / "sweep"),
            "--sweep_deltas",
            "0.5",
            "--sweep_blocks",
            "1",
            "--disable_tqdm",
            "true",
        ],
    )
    (row,) = run_sweep(job, args)
    halves = {"validation": [], "test": []}  # each half scores its own modified facts (cut by the subject's hash)
    for fact in record.facts:
        validation = hash_share(fact["subject"], job.benchmark_seed, "validation") < job.validation_fraction
        halves["validation" if validation else "test"].append(fact["generated_correct"])
    for half, correct in halves.items():
        assert correct and row[half]["gen_a_m"] == pytest.approx(sum(correct) / len(correct)), half
        assert "gen_retention" in row[half]


def test_generation_eval_on_a_masked_lm_scores_by_its_masks_only(tmp_path, real_bert_dir):
    """generation_eval is for causal LMs (as drift_eval): a masked LM's run is scored by its masks and finishes,
    instead of failing in its evaluation after the edit has trained (the facts recipe turns generation on)."""
    from hf_memedit.cli import parse
    from hf_memedit.evaluation.results import ResultsRecord
    from hf_memedit.experiments import run_edit

    from .helpers import ROOT

    job, args, _ = parse(
        "edit",
        [
            "--config", str(ROOT / "trainer_configs" / "bert_tiny_ftm.yaml"), "--output_dir", str(tmp_path / "run"),
            "--max_steps", "2", "--generation_eval", "true", "--eval_before_edit", "false", "--disable_tqdm", "true",
        ],
    )  # fmt: skip
    run_edit(job, args)
    record = ResultsRecord.load(tmp_path / "run")
    assert "a_m" in record.metrics and not any(key.startswith("gen_") for key in record.metrics)
