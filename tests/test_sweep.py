"""`memedit sweep`: the grid, its table and plots, resuming, the kNN-LM ε sweep."""

import json

import pytest

from hf_memedit.cli import main, parse
from hf_memedit.experiments import run_sweep

from .helpers import ROOT


CONFIGS = ROOT / "trainer_configs"


@pytest.mark.slow
def test_sweep_writes_table_and_plots_and_resumes(tmp_path, real_bert_dir, monkeypatch, capsys):
    argv = [
        "--config",
        str(CONFIGS / "bert_tiny_sweep.yaml"),
        "--output_dir",
        str(tmp_path / "sweep"),
        "--sweep_deltas",
        "1e-3",
        "2e-2",
        "--max_steps",
        "30",
        "--ft_epochs",
        "10",
        "--disable_tqdm",
        "true",
        "--logging_steps",
        "10",
    ]
    job, args, _ = parse("sweep", argv)
    from hf_memedit.fast_paths import prefix as prefix_module

    built = []
    original_init = prefix_module.PrefixCache.__init__
    monkeypatch.setattr(
        prefix_module.PrefixCache,
        "__init__",
        lambda self, model, block, *a, **k: built.append(block) or original_init(self, model, block, *a, **k),
    )
    rows = run_sweep(job, args)
    assert len(rows) == 4  # 2 blocks × 2 δ
    # One line per point on stdout, not the points' training logs (kept as each row's train_loss).
    points_output = capsys.readouterr().out.split("[sweep 1]", 1)[1]
    assert points_output.count("[sweep ") == 3
    assert "'loss'" not in points_output and "train_runtime" not in points_output
    assert all(row["train_loss"] > 0 for row in rows)
    assert built == [1]  # block 0 has nothing frozen below it; block 1's cache serves both δ
    folder = tmp_path / "sweep"
    for name in ("sweep.md", "sweep.json", "points.jsonl", "tradeoff.png", "avg_acc_per_block.png"):
        assert (folder / name).is_file(), name
    assert (folder / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    table = (folder / "sweep.md").read_text()
    assert "picked on validation" in table and "picked on test" in table
    assert f"Every point trains with learning_rate {args.learning_rate}, max_steps {args.max_steps}," in table
    for row in rows:  # each half scores its own modified facts, together the m edited
        assert row["validation"]["n_unmodified"] + row["test"]["n_unmodified"] > 0
        assert row["validation"]["n_modified"] > 0 and row["test"]["n_modified"] > 0
        assert row["validation"]["n_modified"] + row["test"]["n_modified"] == job.m
    bigger = [r for r in rows if r["point"]["delta"] == 2e-2]
    smaller = [r for r in rows if r["point"]["delta"] == 1e-3]
    assert sum(r["test"]["a_m"] for r in bigger) >= sum(r["test"]["a_m"] for r in smaller)

    # Resumed with one more δ: only the two new points train.
    from hf_memedit import edit_trainer as trainer_module

    trained = []
    original_train = trainer_module.ConstrainedEditTrainer.train
    monkeypatch.setattr(
        trainer_module.ConstrainedEditTrainer,
        "train",
        lambda self, *a, **k: trained.append(self.args.delta) or original_train(self, *a, **k),
    )
    job, args, _ = parse("sweep", argv[:5] + ["1e-3", "2e-2", "5e-3"] + argv[7:])
    rows = run_sweep(job, args)
    assert len(rows) == 6 and trained == [5e-3, 5e-3]


@pytest.mark.slow
def test_knn_sweep_from_the_cli(tmp_path, real_bert_dir, capsys):
    out = tmp_path / "knn"
    main(
        [
            "sweep",
            "--config",
            str(CONFIGS / "bert_tiny_ftm.yaml"),
            "--setting",
            "knn",
            "--knn_metric",
            "cosine",
            "--output_dir",
            str(out),
            "--disable_tqdm",
            "true",
        ]
    )
    printed = capsys.readouterr().out
    assert "kNN cosine, ε 0" in printed and "Best picked on validation" in printed
    rows = [json.loads(line) for line in (out / "points.jsonl").read_text().splitlines()]
    assert len(rows) >= 2 and all(r["point"]["metric"] == "cosine" for r in rows)
    assert (out / "tradeoff.png").is_file()
    with pytest.raises(SystemExit, match="setting 'knn' trains nothing"):
        main(
            [
                "edit",
                "--config",
                str(CONFIGS / "bert_tiny_ftm.yaml"),
                "--setting",
                "knn",
                "--output_dir",
                str(out / "e"),
            ]
        )


def test_validation_and_test_halves_share_no_fact_nor_subject_and_each_has_its_modified_facts():
    """A pick on validation sees none of the test's facts: the halves are cut by a seeded hash of the subject, the
    modified facts included, so validation A_M is measured on other facts than test A_M (it was the same set)."""
    from datasets import DatasetDict

    from hf_memedit.benchmarks import load_benchmark
    from hf_memedit.experiments.grid import validation_views
    from hf_memedit.experiments.loading import holdout
    from hf_memedit.preservation import disjoint_split

    benchmark = load_benchmark(
        "geo_mod", m=32, seed=0, relations=["P36", "P1376", "P30"], locality_relations=["P17"], object_last=True
    )
    splits, _ = disjoint_split(benchmark, 0.5, 0)
    views = validation_views(splits, 0.5, 0)
    validation, test = views["validation"], views["test"]
    for key in ("uuid", "subject"):
        assert not {x for s in validation.values() for x in s[key]} & {x for s in test.values() for x in s[key]}, key
    assert (
        0 < len(validation["modified_test"]) < 32
        and len(validation["modified_test"]) + len(test["modified_test"]) == 32
    )
    assert (
        set(test["modified_train"]["uuid"]) == set(test["modified_test"]["uuid"])
        and "modified_train" not in validation
    )
    assert len(validation["unmodified_test"]) and len(test["unmodified_test"])
    # A fact's half does not depend on which other facts are there (a rank cut moved them).
    scored = splits["unmodified_test"]
    part = scored.select(range(0, len(scored), 3))
    assert set(holdout(part, 0.5, 0)[0]["uuid"]) == set(holdout(scored, 0.5, 0)[0]["uuid"]) & set(part["uuid"])
    with pytest.raises(ValueError, match="half holds none of the 1 modified test phrasings"):
        validation_views(DatasetDict({**splits, "modified_test": splits["modified_test"].select([0])}), 0.5, 0)
