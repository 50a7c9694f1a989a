"""avg_acc by hand, the evaluate module offline, the trainer's fact evaluation, the results record."""

import json

import evaluate
import pytest
from datasets import Dataset, DatasetDict

from hf_memedit import AVG_ACC_METRIC_PATH, ConstrainedEditTrainer, EditConfig, ResultsRecord, avg_acc
from hf_memedit.evaluation.results import LOST_SHOWN

from .helpers import tiny_bert


BEFORE = dict(
    original_correct_before=[True, True],
    unmodified_correct_before=[True, True, False, True],
    unmodified_predicted=[[1], [2, 3], [4], [9]],
    unmodified_predicted_before=[[1], [2, 3], [5], [8]],
    modified_relations=["P36", "P17"],
    unmodified_relations=["P36", "P36", "P17", "P17"],
)


def test_avg_acc_by_hand():
    result = avg_acc(
        [True, False], [True, True, True, False], modified_train_correct=[True, True, True, False], **BEFORE
    )
    assert result["a_m"] == 0.5 and result["a_fs"] == 0.75 and result["avg_acc"] == 0.625
    assert result["n_modified"] == 2 and result["n_unmodified"] == 4
    assert result["a_m_train"] == 0.75
    assert result["a_fs_before"] == 0.75 and result["a_fs_drop"] == 0.0
    # Accuracy is unchanged, yet one known fact was forgotten and another learned:
    assert result["retention"] == pytest.approx(2 / 3) and result["n_known"] == 3
    assert result["agreement"] == 0.5
    assert result["a_f_before"] == pytest.approx(5 / 6)
    assert result["per_relation"] == {
        "P17": {"a_m": 0.0, "n_modified": 1, "a_fs": 0.5, "n_unmodified": 2, "retention": 0.0, "n_known": 1},
        "P36": {"a_m": 1.0, "n_modified": 1, "a_fs": 1.0, "n_unmodified": 2, "retention": 1.0, "n_known": 2},
    }


def test_retention_on_the_edited_relations_leaves_out_relations_no_edit_touched():
    result = avg_acc(
        [True],
        [True, False, True, True],
        unmodified_correct_before=[True, True, True, False],
        modified_relations=["P36"],
        unmodified_relations=["P36", "P36", "P17", "P17"],
    )
    assert result["retention"] == pytest.approx(2 / 3) and result["n_known"] == 3
    assert result["retention_edited"] == 0.5 and result["n_known_edited"] == 2  # P17's kept fact does not count
    no_edited_known = avg_acc(
        [True], [True], unmodified_correct_before=[True], modified_relations=["P36"], unmodified_relations=["P17"]
    )
    assert no_edited_known["retention_edited"] is None and no_edited_known["n_known_edited"] == 0
    assert "retention_edited" not in avg_acc([True], [True], unmodified_correct_before=[True])


def test_retention_of_firmly_known_facts_leaves_out_near_ties():
    result = avg_acc(
        [True],
        [False, False, True, True],
        unmodified_correct_before=[True, True, True, False],
        unmodified_margins_before=[0.2, 1.5, 1.0, -0.3],
    )
    assert result["retention"] == pytest.approx(1 / 3) and result["n_known"] == 3
    assert result["retention_confident"] == 0.5 and result["n_known_confident"] == 2  # the near-tie (0.2) is left out
    assert "retention_confident" not in avg_acc([True], [True], unmodified_correct_before=[True])
    with pytest.raises(ValueError, match="unmodified_margins_before has 1 entries but there are 2"):
        avg_acc([True], [True, False], unmodified_correct_before=[True, True], unmodified_margins_before=[1.0])


def test_avg_acc_edge_cases_and_bad_input():
    only_unmodified = avg_acc([], [True, False])
    assert only_unmodified["a_m"] is None and only_unmodified["avg_acc"] is None and only_unmodified["a_fs"] == 0.5
    nothing_known = avg_acc([True], [False], unmodified_correct_before=[False])
    assert nothing_known["retention"] is None and nothing_known["n_known"] == 0
    with pytest.raises(ValueError, match="no facts"):
        avg_acc([], [])
    with pytest.raises(ValueError, match="unmodified_correct_before has 1 entries but there are 2"):
        avg_acc([True], [True, False], unmodified_correct_before=[True])
    with pytest.raises(ValueError, match="needs both"):
        avg_acc([True], [True], unmodified_predicted=[[1]])


def test_evaluate_module_loads_offline_and_matches_the_function(monkeypatch):
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    metric = evaluate.load(AVG_ACC_METRIC_PATH)
    modified = [True, True, False, False, False, False]
    correct = [True, False, True, True, True, False]
    per_fact_before = [True, True, True, True, False, True]
    predicted = [[7], [7], [1], [2, 3], [4], [9]]
    predicted_before = [[7], [7], [1], [2, 3], [5], [8]]
    relations = ["P36", "P17", "P36", "P36", "P17", "P17"]
    result = metric.compute(
        correct=correct,
        modified=modified,
        correct_before=per_fact_before,
        predicted=predicted,
        predicted_before=predicted_before,
        relations=relations,
        train_correct=[True, True, True, False],
    )
    assert result == avg_acc(
        [True, False], [True, True, True, False], modified_train_correct=[True, True, True, False], **BEFORE
    )
    margins = [0.5, 0.5, 3.0, 0.1, -1.0, 2.0]
    firm = metric.compute(correct=correct, modified=modified, correct_before=per_fact_before, margins_before=margins)
    assert firm["retention_confident"] == 0.5 and firm["n_known_confident"] == 2
    assert metric.compute(correct=[True, False], modified=[True, False])["avg_acc"] == 0.5
    with pytest.raises(ValueError, match="relations has 1 entries for 2 facts"):
        metric.compute(correct=[True, False], modified=[True, False], relations=["P1"])


def _splits(facts_m, facts_u):
    def rows(facts, relation):
        return Dataset.from_list(
            [
                {
                    "uuid": f"{relation}-{i}",
                    "relation": relation,
                    "subject": "s",
                    "text": text,
                    "object": new,
                    "original_object": old,
                }
                for i, (text, old, new) in enumerate(facts)
            ]
        )

    return DatasetDict(
        {
            "modified_train": rows(facts_m, "P36"),
            "modified_test": rows(facts_m, "P36"),
            "unmodified_test": rows(facts_u, "P17"),
        }
    )


def test_trainer_reports_fact_metrics_during_and_after_training(bert_tokenizer, tmp_out):
    splits = _splits(
        [("The capital of France is [Y].", "paris", "lima"), ("The capital of Peru is [Y].", "lima", "oslo")],
        [
            (f"{city} is a city in [Y].", c, c)
            for city, c in [("Paris", "france"), ("Lima", "peru"), ("Oslo", "norway"), ("Athens", "greece")]
        ],
    )
    common = dict(report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, per_device_train_batch_size=4)
    teach = EditConfig(
        output_dir=tmp_out,
        edit_blocks=["embeddings", "all"],
        norm="none",
        delta=None,
        learning_rate=2e-2,
        max_steps=100,
        **common,
    )
    model = tiny_bert(bert_tokenizer.vocab_size)
    ConstrainedEditTrainer(
        model, teach, train_dataset=splits["unmodified_test"], processing_class=bert_tokenizer
    ).train()

    args = EditConfig(
        output_dir=tmp_out,
        edit_blocks=["-1"],
        delta=1e-2,
        learning_rate=1e-2,
        max_steps=6,
        eval_strategy="steps",
        eval_steps=3,
        logging_steps=3,
        **common,
    )
    trainer = ConstrainedEditTrainer(
        model, args, train_dataset=splits["modified_train"], eval_dataset=splits, processing_class=bert_tokenizer
    )
    trainer.train()
    known = trainer.before_edit["unmodified_test"].correct
    assert sum(known) >= 2  # taught: retention has facts to retain
    evaluations = [log for log in trainer.state.log_history if "eval_a_m" in log]
    assert [log["step"] for log in evaluations] == [3, 6]
    for log in evaluations:
        assert {
            "eval_a_fs",
            "eval_avg_acc",
            "eval_a_m_train",
            "eval_retention",
            "eval_agreement",
            "eval_a_f_before",
        } <= set(log)
        assert log["eval_avg_acc"] == pytest.approx((log["eval_a_m"] + log["eval_a_fs"]) / 2)
        assert log["eval_a_fs_before"] == sum(known) / 4
    after = trainer.evaluate()
    still = trainer.fact_results(splits)["unmodified_test"].correct
    assert after["eval_retention"] == sum(a and b for a, b in zip(known, still)) / sum(known)
    assert after == {key: evaluations[-1][key] for key in after}  # no training since the last evaluation


def test_a_m_is_a_share_of_facts_not_of_test_questions(bert_tokenizer):
    """zsRE gives a fact up to two test questions: a fact counts once, right only when every question is (c3_zsre:
    8 modified facts gave n_modified 12). So do the unmodified facts, retention, agreement, the lost facts, and the
    consistency split."""
    from hf_memedit.evaluation.metrics import edit_metrics, lost_facts
    from hf_memedit.evaluation.scoring import FactResults

    def rows(uuids, obj="Paris"):
        return Dataset.from_list(
            [
                {
                    "uuid": u,
                    "relation": "P36",
                    "subject": u,
                    "text": f"The capital of {u}{i} is [Y].",
                    "object": obj,
                    "original_object": "Lima",
                }
                for i, u in enumerate(uuids)
            ]
        )

    splits = DatasetDict(
        {
            "modified_test": rows(["a", "a", "b", "c", "c"], "Oslo"),
            "unmodified_test": rows(["x", "x", "y"]),
            "consistency": rows(["z", "w"]),
        }
    )
    paris, oslo = bert_tokenizer.convert_tokens_to_ids(["paris", "oslo"])
    after = {
        "modified_test": FactResults([True, False, True, True, True], [[oslo]] * 5),
        "unmodified_test": FactResults([True, True, False], [[paris], [paris], [oslo]]),
        "consistency": FactResults([True, False], [[paris], [oslo]]),
    }
    before = {
        "modified_test": FactResults([True] * 5, [[1]] * 5),
        "unmodified_test": FactResults([True, True, True], [[paris]] * 3, [2.0, 0.5, 3.0]),
        "consistency": FactResults([False, False], [[oslo], [oslo]]),
    }
    metrics = edit_metrics(splits, after, before, bert_tokenizer, "masked")
    assert metrics["a_m"] == pytest.approx(2 / 3) and metrics["n_modified"] == 3
    assert metrics["a_fs"] == 0.5 and metrics["n_unmodified"] == 2 and metrics["a_fs_before"] == 1.0
    assert metrics["retention"] == 0.5 and metrics["n_known"] == 2 and metrics["agreement"] == 0.5
    assert (
        metrics["retention_confident"] == 0.0 and metrics["n_known_confident"] == 1
    )  # x's margin is its smallest: 0.5
    assert metrics["bleed"] == 1.0  # y now predicts the new object Oslo
    assert metrics["consistency"] == 0.5 and metrics["consistency_before"] == 0.0 and metrics["n_consistency"] == 2
    lost = lost_facts(splits, after, before, bert_tokenizer, "masked")
    assert [(f["uuid"], f["text"], f["predicted"], f["bleed"], f["margin_before"]) for f in lost] == [
        ("y", "The capital of y2 is [Y].", "oslo", True, 3.0)
    ]


def test_bleed_by_generation_reads_the_whole_new_object():
    """Teacher-forced bleed sees a lost fact's first object token only (SmolLM2 starts Kigali, Kinshasa and Kuala
    Lumpur alike); greedy generation's answer is the whole object."""
    from hf_memedit.evaluation.metrics import generation_metrics

    splits = {
        "modified_test": [{"object": "Kigali"}],
        "unmodified_test": [{"object": "Paris"}, {"object": "Oslo"}, {"object": "Rome"}, {"object": "Kigali"}],
    }
    after = {"modified_test": ["Kigali"], "unmodified_test": ["Kigali", "Kinshasa", "Rome", "Kigali"]}
    before = {"modified_test": ["Lima"], "unmodified_test": ["Paris", "Oslo", "Rome", "Kigali"]}
    metrics = generation_metrics(splits, after, before)
    assert metrics["gen_n_lost"] == 2 and metrics["gen_bleed"] == 0.5


def test_zsre_modified_facts_are_counted_once(tmp_path):
    from hf_memedit.benchmarks import load_benchmark
    from hf_memedit.evaluation.metrics import edit_metrics
    from hf_memedit.evaluation.scoring import FactResults

    from .helpers import ROOT

    splits = load_benchmark(
        "zsre_mod", m=3, seed=0, data_dir=str(ROOT / "tests" / "fixtures" / "kilt_zsre"), cache_dir=str(tmp_path)
    )
    assert len(splits["modified_test"]) > 3  # some modified facts have two test questions
    right = FactResults([True] * len(splits["modified_test"]), [[0]] * len(splits["modified_test"]))
    assert edit_metrics(splits, {"modified_test": right})["n_modified"] == 3


def test_results_record_round_trip(tmp_path):
    metrics = avg_acc([True, False], [True, True, True, False], **BEFORE)
    record = ResultsRecord(
        metrics, config={"norm": "linf", "delta": 0.001}, seed=3, model="tiny", benchmark={"name": "geo_mod", "m": 2}
    )
    json_path, md_path = record.save(tmp_path)
    assert ResultsRecord.load(tmp_path) == record
    assert json.loads(open(json_path).read())["versions"]["transformers"]
    table = open(md_path).read()
    assert "| A_M (modified facts, every test phrasing right) | 50.00% |" in table
    assert "| retention (unmodified, right before → still right) | 66.67% (2 of 3) |" in table  # the facts it rests on
    assert "| retention on the edited relations | 66.67% (2 of 3) |" in table
    assert (
        "| P17 | 0.00% | 1 | 50.00% | 2 | 0.00% (0 of 1) |" in table
    )  # retention per relation: where facts were lost
    assert "| benchmark.name | geo_mod |" in table and "| delta | 0.001 |" in table
    lost = [
        {
            "uuid": f"u{i}",
            "relation": "P17",
            "subject": f"City {i}",
            "text": f"City {i} is in [Y].",
            "object": "Peru",
            "predicted": "Chile",
            "bleed": i % 2 == 0,
            "margin_before": 0.25,
        }
        for i in range(LOST_SHOWN + 1)
    ]
    record = ResultsRecord({**metrics, "n_known": 60}, lost=lost)
    record.save(tmp_path)
    assert ResultsRecord.load(tmp_path).lost == lost
    table = (tmp_path / "results.md").read_text()
    assert (
        f"Facts the edit lost ({LOST_SHOWN + 1} of the 60 known "
        f"before it; the first {LOST_SHOWN} here, all in results.json)" in table
    )
    assert "| City 0 is in ___. | Peru | Chile | yes | 0.25 |" in table and f"City {LOST_SHOWN - 1} is" in table
    assert f"City {LOST_SHOWN} is" not in table
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ResultsRecord.load(tmp_path)
