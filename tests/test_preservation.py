"""Preservation: the disjoint locality split, the neighbour mix and its weighted loss, bleed, and the
options' errors."""

import datasets
import pytest
import torch

from hf_memedit import EditConfig, FactCollator
from hf_memedit.benchmarks import load_benchmark
from hf_memedit.benchmarks.common import (
    CONSISTENCY,
    FEATURES,
    MODIFIED_TEST,
    MODIFIED_TRAIN,
    UNMODIFIED_TEST,
    UNMODIFIED_TRAIN,
    hash_share,
)
from hf_memedit.benchmarks.relations import INVERSE, entailed
from hf_memedit.cli import parse
from hf_memedit.cli.edit import format_summary
from hf_memedit.edit_trainer import ConstrainedEditTrainer
from hf_memedit.evaluation.metrics import avg_acc, bleed_flags
from hf_memedit.evaluation.results import ResultsRecord
from hf_memedit.experiments import run_edit, run_eval
from hf_memedit.loss import ObjectTokenLoss
from hf_memedit.preservation import NeighbourRisk, disjoint_split, neighbour_risk, no_split, preservation_batches

from .helpers import FACTS, ROOT, SHARED, tiny_bert


def _row(uuid, relation, subject, text, obj):
    return {
        "uuid": uuid,
        "relation": relation,
        "subject": subject,
        "text": text,
        "object": obj,
        "original_object": obj,
    }


def _splits(n=40):
    """n unmodified facts over two relations sharing subjects (as geo's capital and continent do)."""
    train, test = [], []
    for i in range(n):
        relation, subject = ("P36", "P30")[i % 2], f"country{i // 2}"
        train += [_row(f"u{i}", relation, subject, f"Of {subject} the {relation} is [Y].", "Paris")] * 2
        test.append(_row(f"u{i}", relation, subject, f"The {relation} of {subject} is [Y].", "Paris"))
    modified = [_row("m0", "P36", "countryX", "The capital of countryX is [Y].", "Lima")]
    make = lambda rows: datasets.Dataset.from_list(rows, features=FEATURES)  # noqa: E731
    return datasets.DatasetDict(
        {
            MODIFIED_TRAIN: make(modified),
            MODIFIED_TEST: make(modified),
            UNMODIFIED_TRAIN: make(train),
            UNMODIFIED_TEST: make(test),
        }
    )


def test_the_locality_facts_share_nothing_with_the_preservation_facts():
    splits = _splits()
    out, locality = disjoint_split(splits, 0.5, seed=0)
    kept, scored = out[UNMODIFIED_TRAIN], out[UNMODIFIED_TEST]
    assert set(kept["uuid"]).isdisjoint(scored["uuid"]) and set(kept["subject"]).isdisjoint(scored["subject"])
    # By subject: a country's capital and continent are on one side, so no fact is lost to a shared subject.
    assert locality.disjoint and locality.n_preservation_facts + locality.n_locality_facts == 40
    assert locality.n_locality_facts == len(scored) > 0 and locality.n_preservation_facts == len(set(kept["uuid"])) > 0
    assert str(len(scored)) in locality.describe() and "disjoint" in locality.describe()
    # The same seed gives the same split whatever the row order; another seed another split.
    shuffled = datasets.DatasetDict({k: v.shuffle(seed=3) for k, v in splits.items()})
    assert set(disjoint_split(shuffled, 0.5, seed=0)[0][UNMODIFIED_TEST]["uuid"]) == set(scored["uuid"])
    assert set(disjoint_split(splits, 0.5, seed=1)[0][UNMODIFIED_TEST]["uuid"]) != set(scored["uuid"])
    # A fact's side is its subject's, whatever other facts are there: half the facts split alone land as before.
    half = datasets.DatasetDict(
        {
            **splits,
            UNMODIFIED_TRAIN: splits[UNMODIFIED_TRAIN].select(range(40)),
            UNMODIFIED_TEST: splits[UNMODIFIED_TEST].select(range(20)),
        }
    )
    alone = disjoint_split(half, 0.5, seed=0)[0]
    assert set(alone[UNMODIFIED_TEST]["uuid"]) == set(scored["uuid"]) & set(half[UNMODIFIED_TEST]["uuid"])
    # The modified facts are untouched.
    assert out[MODIFIED_TRAIN]["uuid"] == ["m0"]


def _rows(facts, split_text="The {r} of {s} is [Y]."):
    return [_row(uuid, r, s, split_text.format(r=r, s=s), o) for uuid, s, r, o in facts]


def _benchmark(modified, unmodified):
    """Splits from (uuid, subject, relation, object) facts; a modified one also gives its new object."""
    make = lambda rows: datasets.Dataset.from_list(rows, features=FEATURES)  # noqa: E731
    edits = [
        {**_row(uuid, r, s, f"The {r} of {s} is [Y].", new), "original_object": old}
        for uuid, s, r, old, new in modified
    ]
    return datasets.DatasetDict(
        {
            MODIFIED_TRAIN: make(edits),
            MODIFIED_TEST: make(edits),
            UNMODIFIED_TRAIN: make(_rows(unmodified)),
            UNMODIFIED_TEST: make(_rows(unmodified)),
        }
    )


def test_facts_an_edit_changes_are_scored_as_its_consistency_not_as_locality():
    """An edit that makes Bucharest the capital of Japan: Bucharest is now the capital of Japan and lies in it (the
    consistency, on those objects), Tokyo is no longer Japan's capital nor, as that fact had it, in Japan (dropped),
    and a second capital of Japan is the edit's own prompt; the facts of other subjects, and Japan's continent, are
    locality. Each dropped fact is named with its reason."""
    splits = _benchmark(
        [("m0", "Japan", "P36", "Tokyo", "Bucharest")],
        [
            ("u1", "Bucharest", "P1376", "Romania"),
            ("u2", "Tokyo", "P1376", "Japan"),
            ("u3", "Bucharest", "P17", "Romania"),
            ("u4", "Tokyo", "P17", "Japan"),
            ("u5", "Japan", "P36", "Kyoto"),
            ("u6", "France", "P36", "Paris"),
            ("u7", "Japan", "P30", "Asia"),
        ],
    )
    out, locality = no_split(splits)
    assert sorted(out[UNMODIFIED_TEST]["uuid"]) == ["u6", "u7"] and locality.n_locality_facts == 2
    assert {(r["uuid"], r["text"], r["object"], r["original_object"]) for r in out[CONSISTENCY]} == {
        ("u1", "The P1376 of Bucharest is [Y].", "Japan", "Romania"),
        ("u3", "The P17 of Bucharest is [Y].", "Japan", "Romania"),
    }
    assert {f["uuid"]: f["reason"] for f in locality.dropped_facts} == {
        "u1": "implied_by_edit",
        "u2": "inverse_of_edit",
        "u3": "implied_by_edit",
        "u4": "about_edited_object",
        "u5": "same_prompt_as_edit",
    }
    assert locality.dropped == {
        "about_edited_object": 1,
        "implied_by_edit": 2,
        "inverse_of_edit": 1,
        "same_prompt_as_edit": 1,
    }
    assert locality.n_consistency_facts == 2 and "1 an edited fact read backwards" in locality.describe()
    assert sorted(out[UNMODIFIED_TRAIN]["uuid"]) == ["u6", "u7"]  # nor are they preserved: the edit contradicts them
    # With preservation data too, those facts are neither preserved nor scored.
    pooled, _ = disjoint_split(splits, 0.5, seed=0)
    assert not {"u1", "u2", "u3", "u4", "u5"} & (
        set(pooled[UNMODIFIED_TRAIN]["uuid"]) | set(pooled[UNMODIFIED_TEST]["uuid"])
    )


def test_a_fact_read_backwards_in_the_preservation_data_is_not_scored():
    """Hungary's capital and Budapest's country are one fact: whichever side the preservation data holds, the other
    is not scored; a shared border read backwards (P47) neither; a fact of another pair is."""
    facts = [
        ("u1", "Hungary", "P36", "Budapest"),
        ("u2", "Budapest", "P1376", "Hungary"),
        ("u3", "Peru", "P47", "Chile"),
        ("u4", "Chile", "P47", "Peru"),
        ("u5", "Norway", "P36", "Oslo"),
    ]
    seed = next(
        s
        for s in range(200)
        if len({hash_share(c, s, "preserve") < 0.5 for c in ("Hungary", "Budapest")}) == 2
        and len({hash_share(c, s, "preserve") < 0.5 for c in ("Peru", "Chile")}) == 2
        and hash_share("Norway", s, "preserve") >= 0.5
    )
    out, locality = disjoint_split(_benchmark([("m0", "Iceland", "P36", "Reykjavik", "Lima")], facts), 0.5, seed)
    pool = set(out[UNMODIFIED_TRAIN]["uuid"])
    assert len(pool) == 2 and sorted(out[UNMODIFIED_TEST]["uuid"]) == ["u5"]
    assert locality.dropped == {"linked_to_preservation": 2}
    assert {f["uuid"] for f in locality.dropped_facts} == {"u1", "u2", "u3", "u4"} - pool
    assert "2 a preservation fact read backwards or implied, or sharing its prompt" in locality.describe()


def _check_disjoint(splits, locality, any_relation=False):
    """No scored fact shares a subject with the preservation facts, is one of them read backwards (with
    `any_relation`: their subject and object swapped under any relation) or implied, shares a prompt with one of
    them, or is a fact an edit changes."""
    pool = [(r["subject"], r["relation"], r["object"]) for r in splits[UNMODIFIED_TRAIN]]
    stated = {t for fact in pool for t in entailed(fact)}
    scored = [(r["subject"], r["relation"], r["object"]) for r in splits[UNMODIFIED_TEST]]
    assert scored and pool
    assert not {s for s, _, _ in scored} & {s for s, _, _ in pool}
    assert not any(entailed(fact) & stated for fact in scored)
    assert not {(s, r) for s, r, _ in scored} & {(s, r) for s, r, _ in stated}
    pool_facts = set(pool)
    assert not [(s, r, o) for s, r, o in scored if (o, INVERSE.get(r), s) in pool_facts]
    if any_relation:
        pairs = {(s, o) for s, _, o in pool}
        assert not [fact for fact in scored if (fact[2], fact[0]) in pairs]
    edits = {(r["subject"], r["relation"], r["original_object"], r["object"]) for r in splits[MODIFIED_TEST]}
    for s, r, old, new in edits:
        assert (old, INVERSE.get(r), s) not in scored and not [
            f for f in scored if f[0] in (old, new) and f[1] in (r, INVERSE.get(r))
        ]
        assert not {(a, q) for a, q, _ in entailed((s, r, new))} & {(a, q) for a, q, _ in scored}
    assert locality.n_locality_facts == len(set(splits[UNMODIFIED_TEST]["uuid"]))
    assert sum(locality.dropped.values()) == len(locality.dropped_facts)


def test_the_demo_benchmark_scores_no_fact_its_preservation_data_or_its_edits_state():
    """The demo's geo_mod facts (capitals both ways, continents, the countries of cities): none of the scored facts
    is a preservation fact read backwards (c12_demo_leak found 88), nor a fact one of the 32 edits changes."""
    benchmark = load_benchmark(
        "geo_mod", m=32, seed=0, relations=["P36", "P1376", "P30"], locality_relations=["P17"], object_last=True
    )
    splits, locality = disjoint_split(benchmark, 0.5, seed=0)
    _check_disjoint(splits, locality, any_relation=True)
    assert locality.dropped["linked_to_preservation"] > 0 and locality.dropped["inverse_of_edit"] > 0
    assert locality.n_consistency_facts > 0 and set(splits[CONSISTENCY]["relation"]) <= {"P36", "P1376", "P17"}


@pytest.mark.shared
def test_the_trex_relations_that_read_each_other_backwards_leak_nothing():
    benchmark = load_benchmark(
        "trex_mod",
        m=64,
        seed=0,
        data_dir=str(SHARED / "data" / "trex"),
        relations=["P36", "P1376", "P47", "P530", "P190", "P361", "P527"],
    )
    splits, locality = disjoint_split(benchmark, 0.5, seed=0)
    _check_disjoint(splits, locality)
    assert locality.dropped["linked_to_preservation"] > 0


def test_relations_read_backwards_and_implied():
    assert entailed(("Hungary", "P36", "Budapest")) == {
        ("Hungary", "P36", "Budapest"),
        ("Budapest", "P1376", "Hungary"),
        ("Budapest", "P17", "Hungary"),
    }
    assert entailed(("Peru", "shares border with", "Chile")) == {
        ("Peru", "shares border with", "Chile"),
        ("Chile", "shares border with", "Peru"),
    }
    assert entailed(("steel", "P527", "carbon")) == {("steel", "P527", "carbon"), ("carbon", "P361", "steel")}
    assert entailed(("Paris", "P17", "France")) == {("Paris", "P17", "France")}  # not every relation has an inverse


def test_preservation_batches_mix_neighbours_of_the_same_relation_with_their_weight():
    splits = _splits()
    edit = datasets.Dataset.from_list(
        [_row(f"m{i}", "P36", f"c{i}", "The capital of c is [Y].", "Lima") for i in range(5)]
    )
    groups = preservation_batches(
        edit, splits[UNMODIFIED_TRAIN], per_batch=2, ratio=1.5, weight=0.25, epochs=2, seed=0, same_relation=True
    )
    assert len(groups) == 6  # 3 batches (2, 2, 1 edit facts) per epoch
    neighbours = {row["text"]: row["relation"] for row in splits[UNMODIFIED_TRAIN]}
    for group in groups:
        n_edit = group["weight"].count(1.0)
        assert group["weight"] == [1.0] * n_edit + [0.25] * 3  # round(1.5 × 2) neighbours, whatever the batch's size
        assert all(neighbours[text] == "P36" for text in group["text"][n_edit:])
    again = preservation_batches(edit, splits[UNMODIFIED_TRAIN], 2, 1.5, 0.25, 2, 0, True)
    assert again.to_list() == groups.to_list()
    with pytest.raises(ValueError, match="no neighbour facts"):
        preservation_batches(edit, splits[UNMODIFIED_TRAIN].select([]), 2, 1.0, 1.0, 1, 0, True)


def test_risky_neighbours_are_drawn_by_the_new_objects_probability_on_them():
    """preserve_risk 1: each edit row's neighbours come from those where θ0 gives its new object mass (while any
    is free); 0 draws exactly as without risk; any share is deterministic in the seed."""
    splits = _splits()
    neighbours = splits[UNMODIFIED_TRAIN]
    edit = datasets.Dataset.from_list(
        [_row(f"m{i}", "P36", f"c{i}", f"The capital of c{i} is [Y].", "Lima") for i in range(4)]
    )
    by_token = torch.zeros(len(neighbours), 2)
    risky = {0: {0, 4, 8}, 1: {12, 16, 20}}  # P36 neighbours (even rows) where each new object's first token has mass
    for token, rows in risky.items():
        by_token[sorted(rows), token] = torch.tensor([0.5, 0.3, 0.2])
    risk = NeighbourRisk(by_token, column=(0, 0, 1, 1))
    uniform = preservation_batches(edit, neighbours, 2, 1.0, 1.0, 3, 0, True)
    assert preservation_batches(edit, neighbours, 2, 1.0, 1.0, 3, 0, True, risk, 0.0).to_list() == uniform.to_list()
    by_risk = preservation_batches(edit, neighbours, 2, 1.0, 1.0, 3, 0, True, risk, 1.0)
    row_of = {f"The capital of c{i} is [Y].": i for i in range(4)}
    for group in by_risk:
        for edit_text, neighbour_text in zip(group["text"][:2], group["text"][2:]):
            wanted = {neighbours[i]["text"] for i in risky[risk.column[row_of[edit_text]]]}
            assert neighbour_text in wanted, (edit_text, neighbour_text)
    assert by_risk.to_list() != uniform.to_list()
    half = preservation_batches(edit, neighbours, 2, 4.0, 1.0, 3, 0, True, risk, 0.5)
    assert half.to_list() == preservation_batches(edit, neighbours, 2, 4.0, 1.0, 3, 0, True, risk, 0.5).to_list()
    with pytest.raises(ValueError, match="neighbour_risk of these"):
        preservation_batches(edit, neighbours, 2, 1.0, 1.0, 1, 0, True, None, 0.5)
    with pytest.raises(ValueError, match="neighbour_risk of these"):
        preservation_batches(edit.select([0]), neighbours, 2, 1.0, 1.0, 1, 0, True, risk, 0.5)


def test_neighbour_risk_is_theta0s_probability_of_the_new_objects_first_token(bert_tokenizer):
    """Against the straightforward computation: the full forward's softmax at each neighbour's first mask."""
    model = tiny_bert(bert_tokenizer.vocab_size, seed=0)
    edit = datasets.Dataset.from_list(
        [
            _row("m0", "P36", "Peru", "The capital of Peru is [Y].", "Kitchener-Waterloo"),
            _row("m1", "P36", "Chile", "[Y] is the capital of Chile.", "Lima"),
            _row("m2", "P36", "Peru", "Peru has its capital in [Y].", "Kitchener-Waterloo"),
        ]
    )
    neighbours = datasets.Dataset.from_list(
        [
            _row("n0", "P36", "France", "The capital of France is [Y].", "Paris"),
            _row("n1", "P36", "Ontario", "The largest city of Ontario is [Y].", "Kitchener-Waterloo"),
            _row("n2", "P36", "Norway", "[Y] is the capital of Norway, it is said.", "Oslo"),
        ]
    )
    risk = neighbour_risk(model, bert_tokenizer, neighbours, edit, batch_size=2)
    assert risk.column[0] == risk.column[2] != risk.column[1]
    collator = FactCollator(bert_tokenizer, "masked")
    model.eval()
    for n, neighbour in enumerate(neighbours):
        batch = collator([neighbour])
        labels = batch.pop("labels")[0]
        with torch.no_grad():
            probabilities = model(**batch).logits[0, (labels != -100).nonzero()[0, 0]].softmax(-1)
        for row, fact in enumerate(edit):
            first = bert_tokenizer(fact["object"], add_special_tokens=False)["input_ids"][0]
            assert risk.weights([n], row)[0] == pytest.approx(probabilities[first].item(), rel=1e-4, abs=1e-9)


def test_weighted_loss_is_the_weighted_sum_over_object_tokens(bert_tokenizer):
    collator = FactCollator(bert_tokenizer, "masked")
    group = {
        "text": ["The capital of France is [Y].", "The capital of Peru is [Y]."],
        "object": ["Paris", "Kitchener-Waterloo"],
    }
    plain = collator([group])
    assert "object_weights" not in plain  # all weights 1: the batch is the FTA batch it always was
    weighted = collator([{**group, "weight": [1.0, 0.3]}])
    assert weighted["object_weights"].tolist() == pytest.approx([1.0, 0.3])
    torch.manual_seed(0)
    logits = torch.randn(*plain["input_ids"].shape, 50, dtype=torch.float64)
    labels = weighted["labels"].clamp(max=49).where(weighted["labels"] >= 0, torch.tensor(-100))
    loss = ObjectTokenLoss("masked")
    unweighted = loss({"logits": logits}, labels, num_items_in_batch=7)
    ones = torch.tensor([1.0, 1.0])
    assert loss({"logits": logits}, labels, num_items_in_batch=7, row_weights=ones).item() == pytest.approx(
        unweighted.item(), rel=1e-12
    )
    per_token = torch.nn.functional.cross_entropy(logits[labels != -100], labels[labels != -100], reduction="none")
    rows = (labels != -100).nonzero()[:, 0]
    expected = (per_token * weighted["object_weights"].double()[rows]).sum() / 7
    value = loss({"logits": logits}, labels, num_items_in_batch=7, row_weights=weighted["object_weights"])
    assert value.item() == pytest.approx(expected.item(), rel=1e-12)


def test_the_trainer_trains_on_weighted_groups_and_weight_matters(bert_tokenizer, tmp_path):
    group = {"text": ["The capital of France is [Y].", "The capital of Peru is [Y]."], "object": ["Lima", "Lima"]}
    results = {}
    for weight in (1.0, 1e-6):
        args = EditConfig(
            output_dir=str(tmp_path / str(weight)),
            edit_blocks=["0"],
            norm="none",
            delta=None,
            learning_rate=1e-2,
            max_steps=3,
            per_device_train_batch_size=1,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            use_cpu=True,
        )
        data = datasets.Dataset.from_list([{**group, "weight": [1.0, weight]}] * 3)
        trainer = ConstrainedEditTrainer(
            tiny_bert(bert_tokenizer.vocab_size, seed=0), args, train_dataset=data, processing_class=bert_tokenizer
        )
        trainer.train()
        results[weight] = {n: p.detach().clone() for n, p in trainer.edit_model.trainable_parameters().items()}
    assert any(not torch.equal(results[1.0][n], results[1e-6][n]) for n in results[1.0])


def test_bleed_counts_lost_facts_that_now_predict_a_new_object(bert_tokenizer):
    modified = [{"text": "The capital of Peru is [Y].", "object": "Paris"}]
    unmodified = [
        {"text": "The capital of Norway is [Y].", "object": "Oslo"},
        {"text": "The capital of Greece is [Y].", "object": "Athens"},
        {"text": "The capital of Chile is [Y].", "object": "Paris"},
    ]
    paris, lima = bert_tokenizer.convert_tokens_to_ids(["paris", "lima"])
    flags = bleed_flags(bert_tokenizer, "masked", modified, unmodified, [[paris], [lima], [paris]])
    assert flags == [True, False, False]  # the third predicts its own object, which happens to be a new one
    metrics = avg_acc(
        [True],
        [False, False, True],
        unmodified_correct_before=[True, True, False],
        unmodified_bleeds=flags,
        modified_relations=["P36"],
        unmodified_relations=["P36", "P30", "P36"],
    )
    assert metrics["n_lost"] == 2 and metrics["bleed"] == 0.5
    assert metrics["per_relation"]["P36"]["bleed"] == 1.0 and metrics["per_relation"]["P30"]["bleed"] == 0.0
    with pytest.raises(ValueError, match="unmodified_bleeds"):
        avg_acc([True], [False], unmodified_correct_before=[True], unmodified_bleeds=[True, False])


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("preserve_objective", "kl2", "Unknown preserve_objective"),
        ("preserve_ratio", 0, "preserve_ratio"),
        ("preserve_weight", -1.0, "preserve_weight"),
        ("preserve_fraction", 1.0, "preserve_fraction"),
        ("preserve_risk", 1.5, "preserve_risk must lie in"),
        ("preserve_risk", -0.1, "preserve_risk must lie in"),
    ],
)
def test_preservation_options_are_checked(option, value, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        EditConfig(output_dir=str(tmp_path), **{option: value})


@pytest.mark.slow
@pytest.mark.parametrize(
    "objective, fraction, risk", [("answers", 0.5, 0.0), ("evidence", 0.0, 0.0), ("kl", 0.5, 0.5)]
)
def test_a_preserving_edit_reports_locality_on_disjoint_facts(
    objective, fraction, risk, tmp_path, tmp_path_factory, real_bert_dir
):
    ft_dir = tmp_path_factory.getbasetemp() / "preserving_ft"  # both cases start from one FT model
    job, args, _ = parse(
        "edit",
        [
            "--config",
            str(ROOT / "trainer_configs" / "bert_tiny_ft_ftm.yaml"),
            "--output_dir",
            str(tmp_path / "run"),
            "--ft_dir",
            str(ft_dir),
            "--preserve_objective",
            objective,
            "--preserve_fraction",
            str(fraction),
            "--preserve_risk",
            str(risk),
            "--max_steps",
            "20",
            "--ft_epochs",
            "10",
            "--disable_tqdm",
            "true",
        ],
    )
    outcome = run_edit(job, args)
    record = ResultsRecord.load(tmp_path / "run")
    locality = record.locality
    assert record.config["preserve_objective"] == objective and record.config["preserve_fraction"] == fraction
    assert record.config["preserve_risk"] == risk
    assert locality["n_locality_facts"] == record.metrics["n_unmodified"]
    assert {"bleed", "n_lost"} <= set(record.metrics)
    text = (tmp_path / "run" / "results.md").read_text()
    assert locality["description"] in text
    if fraction:
        assert locality["disjoint"] and 0 < locality["n_locality_facts"] < 120 - 8
    else:
        assert not locality["disjoint"] and "NOT disjoint" in text
    # Every batch held the edit's facts and as many preservation facts.
    assert all(
        len(group) == 2 * args.per_device_train_batch_size for group in outcome.trainer.train_dataset["text"][:-1]
    )
    # The lost facts behind retention and bleed, each a scored fact, listed in the record, its table and the summary.
    scored = dict(
        zip(
            outcome.trainer.eval_dataset["unmodified_test"]["uuid"],
            outcome.trainer.eval_dataset["unmodified_test"]["object"],
        )
    )
    assert len(record.lost) == record.metrics["n_lost"] > 0
    assert all(scored[fact["uuid"]] == fact["object"] != fact["predicted"] for fact in record.lost)
    assert sum(fact["bleed"] for fact in record.lost) == round(record.metrics["bleed"] * len(record.lost))
    assert f"Facts the edit lost ({len(record.lost)} of the {record.metrics['n_known']} known" in text
    assert f"unmodified facts the edit lost ({len(record.lost)}" in format_summary(outcome, args)
    # `memedit eval` of the saved edit, with the run's config, scores what the run scored: the same θ0 (its FT
    # model), the same disjoint facts, the same numbers.
    evaluation, _ = run_eval(job, args, str(tmp_path / "run" / "edit"), "check")
    assert evaluation.locality == locality
    # The same facts lost; their margins before the edit within float noise (the run's θ0 ran through the
    # prefix cache, the evaluation's through the whole model).
    assert [{**f, "margin_before": None} for f in evaluation.lost] == [
        {**f, "margin_before": None} for f in record.lost
    ]
    assert [f["margin_before"] for f in evaluation.lost] == pytest.approx(
        [f["margin_before"] for f in record.lost], abs=1e-4
    )
    for key in (
        "a_m",
        "a_fs",
        "n_unmodified",
        "retention",
        "n_known",
        "agreement",
        "bleed",
        "retention_edited",
        "retention_confident",
        "n_known_confident",
    ):
        assert evaluation.metrics[key] == record.metrics[key], key


def test_kl_rows_score_the_distance_to_theta0s_distribution(bert_tokenizer):
    collator = FactCollator(bert_tokenizer, "masked")
    group = {
        "text": ["The capital of France is [Y].", "The capital of Peru is [Y]."],
        "object": ["Paris", "Lima"],
        "weight": [1.0, 2.0],
        "preserve": [False, True],
    }
    batch = collator([group])
    assert batch["preserve_rows"].tolist() == [False, True]
    torch.manual_seed(0)
    logits = torch.randn(*batch["input_ids"].shape, 40, dtype=torch.float64, requires_grad=True)
    labels = batch["labels"].clamp(max=39).where(batch["labels"] >= 0, torch.tensor(-100))
    positions = labels != -100
    loss = ObjectTokenLoss("masked")
    weights, kl_rows = batch["object_weights"], batch["preserve_rows"]
    same = logits[positions][1:].detach().log_softmax(-1)  # θ = θ0 on the KL row: it costs nothing
    value = loss(
        {"logits": logits}, labels, num_items_in_batch=2, row_weights=weights, kl_rows=kl_rows, reference=same
    )
    ce = torch.nn.functional.cross_entropy(logits[positions][:1], labels[positions][:1])
    assert value.item() == pytest.approx(ce.item() / 2, rel=1e-12)
    value.backward()
    assert logits.grad[1].abs().max().item() < 1e-15 and logits.grad[0].abs().max().item() > 0
    reference = torch.randn(1, 40, dtype=torch.float64).log_softmax(-1)
    kl = (reference[0].exp() * (reference[0] - logits[positions][1].log_softmax(-1))).sum()
    value = loss(
        {"logits": logits}, labels, num_items_in_batch=2, row_weights=weights, kl_rows=kl_rows, reference=reference
    )
    assert value.item() == pytest.approx((ce + 2 * kl).item() / 2, rel=1e-12)
    with pytest.raises(ValueError, match="1 object positions"):
        loss({"logits": logits}, labels, num_items_in_batch=2, kl_rows=kl_rows, reference=reference.repeat(2, 1))


def test_the_trainer_keeps_the_kl_rows_near_theta0(bert_tokenizer, tmp_path):
    """Trained on an edit and a KL row of another fact, the model's distribution on that fact moves less than
    when the same row is trained as an edit (a hard label)."""
    neighbour = "The capital of Norway is [Y]."
    moves = {}
    for objective, preserve in (("kl", True), ("none", False)):
        model = tiny_bert(bert_tokenizer.vocab_size, seed=0)
        args = EditConfig(
            output_dir=str(tmp_path / objective),
            edit_blocks=["0"],
            norm="none",
            delta=None,
            learning_rate=1e-2,
            max_steps=8,
            per_device_train_batch_size=1,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            use_cpu=True,
            preserve_objective=objective,
        )
        group = {
            "text": ["The capital of Peru is [Y].", neighbour],
            "object": ["Oslo", "Lima"],
            "weight": [1.0, 1.0],
            "preserve": [False, preserve],
        }
        batch = FactCollator(bert_tokenizer, "masked")([{"text": neighbour, "object": "Oslo"}])
        with torch.no_grad():
            before = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
        trainer = ConstrainedEditTrainer(
            model, args, train_dataset=datasets.Dataset.from_list([group] * 8), processing_class=bert_tokenizer
        )
        trainer.train()
        with torch.no_grad():
            after = model.eval()(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits.log_softmax(-1)
        at = batch["labels"] != -100
        moves[objective] = float((before[at].exp() * (before[at] - after[at])).sum())
    assert moves["kl"] < moves["none"]


def test_the_kl_term_is_zero_with_zero_gradient_at_theta0_under_dropout(bert_tokenizer, tmp_path):
    """θ0's reference is its own distribution (dropout off, the same on every call), and the KL rows are scored
    without dropout too: at θ = θ0 the term is 0 with a zero gradient, on every call, and the train mode is kept."""
    model = tiny_bert(bert_tokenizer.vocab_size, layers=2, dropout=0.1)
    args = EditConfig(
        output_dir=str(tmp_path),
        edit_blocks=["1"],
        norm="none",
        delta=None,
        preserve_objective="kl",
        max_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )
    group = {
        "text": [f["text"] for f in FACTS[:4]],
        "object": [f["object"] for f in FACTS[:4]],
        "preserve": [True] * 4,
    }
    trainer = ConstrainedEditTrainer(
        model, args, train_dataset=datasets.Dataset.from_list([group]), processing_class=bert_tokenizer
    )
    batch = FactCollator(bert_tokenizer, "masked")([group])
    items = (batch["labels"] != -100).sum()
    model.train()
    for _ in range(3):
        model.zero_grad()
        loss = trainer.training_step(model, dict(batch), num_items_in_batch=items)
        assert loss.item() == 0.0
        # softmax(θ0's logits) − exp(log_softmax(θ0's logits)): float32 rounding only (dropout gave 1e-3 to the loss)
        assert max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None) < 1e-7
    assert model.training
    # compute_loss alone has no reference: refused in train mode, not scored by cross-entropy against the labels
    with pytest.raises(ValueError, match="call trainer.training_step"):
        trainer.compute_loss(model, dict(batch), num_items_in_batch=items)


def test_theta0s_distribution_of_each_kl_row_is_computed_once(bert_tokenizer, tmp_path, monkeypatch):
    """θ0 never changes: a KL row's reference is computed the first time the row comes round and kept; the second
    batch holding the same rows runs no θ0 forward, and the kept values equal a fresh computation."""
    model = tiny_bert(bert_tokenizer.vocab_size, layers=2)
    args = EditConfig(
        output_dir=str(tmp_path),
        edit_blocks=["1"],
        norm="linf",
        delta=1e-2,
        preserve_objective="kl",
        max_steps=4,
        per_device_train_batch_size=1,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )
    groups = [
        {
            "text": [FACTS[0]["text"], FACTS[k]["text"]],
            "object": ["Lima", FACTS[k]["object"]],
            "preserve": [False, True],
        }
        for k in (1, 3, 1, 3)
    ]
    trainer = ConstrainedEditTrainer(
        model, args, train_dataset=datasets.Dataset.from_list(groups), processing_class=bert_tokenizer
    )
    computed = []
    compute = trainer._theta0_log_probs
    monkeypatch.setattr(
        trainer, "_theta0_log_probs", lambda inputs, rows: computed.append(len(rows)) or compute(inputs, rows)
    )
    trainer.train()
    assert sum(computed) == 2 and len(trainer._references) == 2  # two distinct KL rows, four batches
    batch = FactCollator(bert_tokenizer, "masked")([groups[0]])
    kept = trainer._with_references(batch)["theta0_log_probs"]
    torch.testing.assert_close(kept, torch.cat(compute(batch, [1])), rtol=0, atol=1e-6)
