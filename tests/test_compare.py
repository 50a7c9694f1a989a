"""`memedit compare`: every method side by side, each tuned on validation, resumable."""

import dataclasses
import json

import pytest

from hf_memedit.cli import parse

from .helpers import ROOT


CONFIGS = ROOT / "trainer_configs"


@pytest.mark.slow
def test_compare_runs_every_method_and_resumes(tmp_path, real_bert_dir, monkeypatch):
    from hf_memedit.experiments.compare import LABELS, run_compare

    argv = [
        "--config",
        str(CONFIGS / "compare_bert_tiny.yaml"),
        "--output_dir",
        str(tmp_path / "compare"),
        "--max_steps",
        "20",
        "--ft_epochs",
        "10",
        "--disable_tqdm",
        "true",
        "--logging_steps",
        "10",
    ]
    job, args, _ = parse("compare", argv)
    picks = run_compare(job, args)
    assert set(picks) == set(LABELS)
    folder = tmp_path / "compare"
    table = (folder / "compare.md").read_text()
    for label in LABELS.values():
        assert f"| {label} |" in table
    for plot in ("compare.png", "frontier.png"):
        assert (folder / plot).read_bytes()[:4] == b"\x89PNG"
    assert "disjoint from the" in table and "| bleed |" in table and "| retention, edited relations |" in table
    assert "Retention is a share of the facts θ0 knew: " in table and "| retention val |" in table
    assert "| edited relations val | edited relations test |" in table
    assert (
        f"max_steps 20, per_device_train_batch_size {args.per_device_train_batch_size}," in table
    )  # the knobs no row names
    assert f"preserve_weight {args.preserve_weight}" in table
    result = json.loads((folder / "compare.json").read_text())
    linf = result["rows"]["ftm_linf"]
    assert len(linf) == 4  # 2 blocks × 2 δ
    assert all(0 < r["test"]["n_known_edited"] <= r["test"]["n_known"] for r in linf)
    best_block = max(linf, key=lambda r: r["validation"]["avg_acc"])["point"]["block"]
    assert result["block"] == best_block
    for method in ("ftm_unconstrained", "ftm_l2", "ftm_fisher", "fta", "ftm_answers", "ftm_nullspace"):
        assert {r["point"]["block"] for r in result["rows"][method]} == {best_block}, method
    assert all(r["point"]["modules"] == ["mlp_out"] and r["point"]["max_steps"] == 25 for r in result["rows"]["ftl"])
    assert {r["point"]["delta"] for r in result["rows"]["ftl"]} == {5e-4, 1e-3, 1e-2}
    locft = result["rows"]["locft_bf"]
    assert {r["point"]["block"] for r in locft} == {"0", "1"} and all(
        r["point"]["num_train_epochs"] == 25 for r in locft
    )
    assert all(r["point"]["eos_target"] is False for r in locft)  # a masked LM has no EOS target
    assert all(r["point"]["preserve_corpus"] == "benchmark" for r in result["rows"]["ftm_nullspace"])
    nullspace = {
        (r["point"].get("nullspace_energy"), tuple(r["point"].get("modules") or ()))
        for r in result["rows"]["ftm_nullspace"]
    }
    assert nullspace == {(None, ("mlp_out",)), (0.99, ()), (0.9, ()), (0.8, ())}  # AlphaEdit's, then whole blocks
    assert (
        result["locality"]["disjoint"]
        and result["locality"]["n_locality_facts"]
        == linf[0]["test"]["n_unmodified"] + linf[0]["validation"]["n_unmodified"]
    )
    # L2 δ: the smallest ball holding each L∞ box, so it grows with the L∞ δ by √n.
    l2 = sorted(r["point"]["delta"] for r in result["rows"]["ftm_l2"])
    assert l2[1] / l2[0] == pytest.approx(10.0)
    for name, pick in picks.items():  # the pick is the best on validation among the method's points
        assert pick["validation"]["avg_acc"] == max(r["validation"]["avg_acc"] for r in result["rows"][name])
    knn = result["rows"]["knn"]
    assert knn[0]["point"]["epsilon"] == 0.0 and knn[0]["test"]["a_m"] == 0.0  # ε = 0: the model alone
    assert knn[-1]["test"]["a_m"] >= knn[0]["test"]["a_m"]

    from hf_memedit import edit_trainer as trainer_module

    monkeypatch.setattr(
        trainer_module.ConstrainedEditTrainer, "train", lambda *a, **k: pytest.fail("a done point retrained")
    )
    again = run_compare(job, args)
    assert {m: p["point"] for m, p in again.items()} == {m: p["point"] for m, p in picks.items()}


def test_compare_of_a_causal_lm_reports_general_drift(tmp_path, bpe_tokenizer):
    """drift_eval in a compare: each point's next-token KL to θ0 and perplexity ratio on θ0's held-out samples,
    in compare.json and in the table (a tiny random Llama, two methods, a few steps)."""
    from hf_memedit import EditConfig
    from hf_memedit.experiments import JobConfig, run_compare

    from .helpers import TINY

    model = TINY["llama"](2, vocab=len(bpe_tokenizer))
    job = JobConfig(
        model_name_or_path="tiny-llama",
        benchmark="geo_mod",
        m=4,
        compare_methods=["ftm_linf", "ftm_unconstrained", "ftm_kl"],
        benchmark_options={"relations": ["P36"], "max_facts_per_relation": 40},
    )
    args = EditConfig(
        output_dir=str(tmp_path / "compare"),
        edit_blocks=["1"],
        norm="linf",
        delta=1e-2,
        max_steps=3,
        learning_rate=1e-2,
        report_to="none",
        disable_tqdm=True,
        drift_eval=True,
        preserve_corpus_length=8,
        per_device_train_batch_size=4,
    )
    picks = run_compare(job, args, model=model, tokenizer=bpe_tokenizer)
    for pick in picks.values():
        drift = pick["drift"]
        assert drift["drift_kl"] > 0 and drift["perplexity_ratio"] > 0 and drift["n_drift_tokens"] == 32 * 8
    assert (
        picks["ftm_unconstrained"]["drift"]["drift_kl"] > picks["ftm_linf"]["drift"]["drift_kl"]
    )  # a free edit moves more
    rows = json.loads((tmp_path / "compare" / "compare.json").read_text())["rows"]
    assert [r["point"].get("eos_target") for r in rows["ftm_kl"]] == [None, True]  # a causal LM: also with EOS targets
    table = (tmp_path / "compare" / "compare.md").read_text()
    assert "| drift KL | ppl ratio |" in table
    assert f"{picks['ftm_linf']['drift']['drift_kl']:.3g}" in table


def test_a_grid_draws_risky_neighbours_from_one_ranking(tmp_path, bpe_tokenizer):
    """preserve_risk in a sweep or compare: θ0 ranks each objective's neighbours once, and the points' batches
    hold other neighbours than uniform draws (a tiny random Llama on geo_mod)."""
    from hf_memedit import EditConfig
    from hf_memedit.benchmarks.common import UNMODIFIED_TRAIN
    from hf_memedit.experiments import JobConfig
    from hf_memedit.experiments.grid import GridRunner
    from hf_memedit.experiments.grid_point import GridPoint

    from .helpers import TINY

    model = TINY["llama"](2, vocab=len(bpe_tokenizer))
    job = JobConfig(
        model_name_or_path="tiny-llama",
        benchmark="geo_mod",
        m=4,
        benchmark_options={"relations": ["P36"], "max_facts_per_relation": 40},
    )
    point = GridPoint(norm="linf", block="1", delta=1e-2, settings={"preserve_objective": "kl"})
    batches = {}
    for risk in (0.0, 1.0):
        args = EditConfig(
            output_dir=str(tmp_path / str(risk)),
            edit_blocks=["1"],
            max_steps=3,
            report_to="none",
            disable_tqdm=True,
            per_device_train_batch_size=4,
            preserve_ratio=2,
            preserve_risk=risk,
        )
        runner = GridRunner(job, args, model=model, tokenizer=bpe_tokenizer)
        dataset, point_args = runner.train_set(point, str(tmp_path / "point"))
        batches[risk] = dataset["text"]
        assert point_args.preserve_objective == "kl" and point_args.edit_blocks == ["1"]
        if risk:
            ranking = runner.context.risk("kl")
            assert runner.train_set(point, str(tmp_path / "point"))[0]["text"] == batches[risk]
            assert runner.context.risk("kl") is ranking and runner.context.risk("none") is None
            assert ranking.by_token.shape[0] == len(runner.context.splits[UNMODIFIED_TRAIN])
    assert batches[1.0] != batches[0.0]


def test_a_retention_floor_picks_the_most_edits_among_the_points_that_keep_enough():
    """Ā picks a point that learns everything and keeps little; pick_min_retention 0.9 the one learning the most
    among those keeping 90%; with no point that high, the one keeping the most. The floor does not key points."""
    from hf_memedit import EditConfig
    from hf_memedit.experiments import JobConfig
    from hf_memedit.experiments.picks import VALIDATION, best, pick_rule
    from hf_memedit.experiments.points import point_context

    def row(name, a_m, a_fs, retention):
        return {
            "name": name,
            VALIDATION: {"a_m": a_m, "a_fs": a_fs, "avg_acc": (a_m + a_fs) / 2, "retention": retention},
        }

    rows = [
        row("greedy", 1.0, 0.05, 0.2),
        row("careful", 0.6, 0.14, 0.95),
        row("balanced", 0.9, 0.13, 0.92),
        row("tied", 0.9, 0.12, 0.97),
    ]
    assert best(rows, VALIDATION)["name"] == "greedy"
    assert best(rows, VALIDATION, 0.9)["name"] == "balanced"  # A_M 0.9 twice: the better Ā
    assert best(rows, VALIDATION, 0.96)["name"] == "tied"
    assert best(rows, VALIDATION, 0.99)["name"] == "tied"  # nothing keeps 99%: the point keeping the most
    assert "90.00%" in pick_rule(0.9) and "Ā" in pick_rule(None)
    with pytest.raises(ValueError, match="pick_min_retention"):
        JobConfig(pick_min_retention=1.5)
    args = EditConfig(output_dir="unused", report_to="none")
    assert point_context(JobConfig(pick_min_retention=0.9), args) == point_context(JobConfig(), args)


def test_compares_run_as_lanes_merge_into_one_table_without_training(tmp_path):
    """`memedit compare --merge_lanes`: the points of lanes (same settings, each its own compare_methods) make one
    compare.md, compare.json and plots of the methods the lanes report, picked as one compare picks; lanes of other
    settings, other locality facts or another block are refused."""
    from hf_memedit import EditConfig
    from hf_memedit.cli import main
    from hf_memedit.experiments import JobConfig
    from hf_memedit.experiments.compare import merge_compares
    from hf_memedit.experiments.grid_point import GridPoint
    from hf_memedit.experiments.points import CONTEXT, point_context, save_points
    from hf_memedit.preservation import Locality

    def row(point, a_m, retention):
        half = {
            "a_m": a_m,
            "a_fs": retention / 4,
            "avg_acc": (a_m + retention / 4) / 2,
            "retention": retention,
            "agreement": 0.5,
            "bleed": 0.5,
            "a_fs_before": 0.25,
        }
        return {"point": point.to_dict(), "distance": 0.01, "validation": half, "test": dict(half)}

    job = JobConfig(model_name_or_path="tiny", benchmark="geo_mod", m=4)
    args = EditConfig(output_dir=str(tmp_path / "merged"), edit_blocks=["1"], report_to="none")
    locality = Locality(True, 0.5, 10, 20, {"linked_to_preservation": 2})
    linf = [
        row(
            GridPoint(norm="linf", block="1", delta=d, method="ftm_linf", settings={"preserve_objective": "none"}),
            a,
            r,
        )
        for d, a, r in ((1e-2, 0.5, 0.9), (3e-2, 1.0, 0.6))
    ]
    kl = [
        row(GridPoint(norm="linf", block="1", delta=d, method="ftm_kl", settings={"preserve_objective": "kl"}), a, r)
        for d, a, r in ((1e-2, 0.7, 0.95), (3e-2, 0.9, 0.9))
    ]
    # Lane b ran ftm_kl alone: its block stage (compare_block auto) trained L∞ points it does not report.
    lanes = {"a": ({"ftm_linf": linf}, linf, None), "b": ({"ftm_kl": kl}, kl + linf[:1], "1")}
    for name, (reported, points, block) in lanes.items():
        folder = tmp_path / name
        folder.mkdir()
        save_points(str(folder), {GridPoint.from_dict(r["point"]).key: r for r in points})
        (folder / CONTEXT).write_text(json.dumps(point_context(job, args)))  # as a lane's compare writes it
        (folder / "compare.json").write_text(
            json.dumps({"locality": locality.to_dict(), "rows": reported, "block": block})
        )
    picks = merge_compares([str(tmp_path / "a"), str(tmp_path / "b")], job, args)
    assert picks["ftm_linf"]["point"]["delta"] == 3e-2 and picks["ftm_kl"]["point"]["delta"] == 3e-2  # best Ā
    merged = tmp_path / "merged"
    result = json.loads((merged / "compare.json").read_text())
    assert list(result["rows"]) == ["ftm_linf", "ftm_kl"] and result["locality"] == locality.to_dict()
    assert len((merged / "points.jsonl").read_text().splitlines()) == 4
    table = (merged / "compare.md").read_text()
    assert "| FTM, L∞ | linf, block 1, δ 0.03 |" in table and "| FTM + KL to θ0 on neighbours, L∞ |" in table
    assert "edit block 1 (the best L∞ block on validation)" in table
    assert all((merged / plot).read_bytes()[:4] == b"\x89PNG" for plot in ("compare.png", "frontier.png"))

    alone = merge_compares([str(tmp_path / "b")], job, dataclasses.replace(args, output_dir=str(tmp_path / "kl")))
    assert set(alone) == {"ftm_kl"} and "FTM, L∞ |" not in (tmp_path / "kl" / "compare.md").read_text()
    fixed = dataclasses.replace(job, compare_block="1")
    lone = merge_compares([str(tmp_path / "a")], fixed, dataclasses.replace(args, output_dir=str(tmp_path / "fixed")))
    assert (
        set(lone) == {"ftm_linf"}
        and "Each point edits the block it names." in (tmp_path / "fixed" / "compare.md").read_text()
    )

    other = dataclasses.replace(job, m=8)  # a lane made with other settings
    with pytest.raises(ValueError, match="other settings"):
        merge_compares([str(tmp_path / "a")], other, dataclasses.replace(args, output_dir=str(tmp_path / "m2")))
    written = json.loads((tmp_path / "b" / "compare.json").read_text())
    (tmp_path / "b" / "compare.json").write_text(json.dumps({**written, "block": "0"}))
    with pytest.raises(ValueError, match=r"edited different blocks \(0, 1\): give every lane the same compare_block"):
        merge_compares([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "kl")], job, args)
    other_facts = Locality(True, 0.5, 10, 18, {"linked_to_preservation": 4}).to_dict()
    (tmp_path / "b" / "compare.json").write_text(json.dumps({**written, "locality": other_facts}))
    with pytest.raises(ValueError, match="different locality facts"):
        merge_compares([str(tmp_path / "a"), str(tmp_path / "b")], job, args)
    with pytest.raises(SystemExit, match="holds no compare.json"):
        main(
            [
                "compare",
                "--model_name_or_path",
                "tiny",
                "--benchmark",
                "geo_mod",
                "--m",
                "4",
                "--edit_blocks",
                "1",
                "--output_dir",
                str(merged),
                "--merge_lanes",
                str(tmp_path),
            ]
        )


def test_nullspace_energies_set_the_null_space_methods_grid(bpe_tokenizer):
    """`nullspace_energies`: both null-space methods make one point per δ and share of the keys' energy removed
    (ftm_nullspace after AlphaEdit's own point); a share outside (0, 1) is refused; the grid does not key points."""
    from types import SimpleNamespace

    from hf_memedit import EditConfig
    from hf_memedit.cli import parse
    from hf_memedit.experiments import JobConfig
    from hf_memedit.experiments.method import MethodContext
    from hf_memedit.experiments.methods import METHODS, method_arguments
    from hf_memedit.experiments.methods.ftm_nullspace import NullspaceArguments
    from hf_memedit.experiments.points import point_context

    from .helpers import TINY

    job = JobConfig(method_args={"nullspace_energies": [0.5, 0.7]})
    args = EditConfig(output_dir="unused", report_to="none")
    runner = SimpleNamespace(model=TINY["llama"](2, vocab=len(bpe_tokenizer)), args=args)
    ctx = MethodContext(runner, linf=[1e-2, 2e-2], block="1", arguments=method_arguments(job)[NullspaceArguments])
    kl = METHODS["ftm_kl_nullspace"].grid_points(ctx)
    assert [(p.delta, p.settings["nullspace_energy"], p.settings["preserve_objective"]) for p in kl] == [
        (1e-2, 0.5, "kl"),
        (1e-2, 0.7, "kl"),
        (2e-2, 0.5, "kl"),
        (2e-2, 0.7, "kl"),
    ]
    assert {p.method for p in kl} == {"ftm_kl_nullspace"} and {p.block for p in kl} == {"1"}
    plain = METHODS["ftm_nullspace"].grid_points(ctx)
    assert [(p.settings.get("nullspace_energy"), p.modules) for p in plain[:3]] == [
        (None, ["mlp_out"]),
        (0.5, None),
        (0.7, None),
    ]
    default = METHODS["ftm_kl_nullspace"].points(dataclasses.replace(ctx, arguments=NullspaceArguments()))
    assert [p.settings["nullspace_energy"] for p in default] == [0.9, 0.8, 0.9, 0.8]
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="nullspace_energies"):
            method_arguments(JobConfig(method_args={"nullspace_energies": [0.5, bad]}))
        with pytest.raises(ValueError, match="nullspace_energies"):
            parse("compare", ["--nullspace_energies", "0.5", str(bad)])
    assert point_context(job, args) == point_context(JobConfig(), args)
    with pytest.raises(ValueError, match=r"Unknown method arguments \['knn_metrc'\]"):
        method_arguments(JobConfig(method_args={"knn_metrc": "cosine"}))


def test_reports_say_how_many_known_facts_retention_rests_on():
    """Retention is a share of the facts θ0 knew; with few on validation the report says how coarse a pick by it is."""
    from hf_memedit.evaluation.results import format_metric
    from hf_memedit.experiments.reports import known_facts_note

    def row(n_validation, n_test):
        return {
            "validation": {"retention": 11 / 12, "n_known": n_validation},
            "test": {"retention": 0.96, "n_known": n_test},
        }

    assert known_facts_note([row(12, 25), row(12, 25)]) == (
        "Retention is a share of the facts θ0 knew: 12 on validation, 25 on test; with 12 on validation one fact "
        "moves validation retention by 8.3 points, so picks that weigh retention rest on few facts."
    )
    assert (
        known_facts_note([row(40, 38), row(41, 38)])
        == "Retention is a share of the facts θ0 knew: 40–41 on validation, 38 on test."
    )
    assert (
        known_facts_note([{"validation": {"retention": 0.5}, "test": {"retention": 0.5}}]) == ""
    )  # recorded before n_known
    assert format_metric(row(12, 25)["validation"], "retention") == "91.67% (11 of 12)"
    assert format_metric({"retention": 0.5}, "retention") == "50.00%" and format_metric({}, "retention") == "–"


def test_the_compare_block_is_chosen_by_its_own_step(tmp_path, bpe_tokenizer):
    """compare_block 'auto': the block-editing methods edit FTM, L∞'s best block on validation, its points trained
    first even when ftm_linf is not among compare_methods (they silently took edit_blocks' first); a given block
    trains no such step; a compare whose methods edit no compare block chooses none."""
    from hf_memedit import EditConfig
    from hf_memedit.experiments import JobConfig, run_compare
    from hf_memedit.experiments.picks import VALIDATION, best

    from .helpers import TINY

    def points(folder):
        return [json.loads(line) for line in (folder / "points.jsonl").read_text().splitlines()]

    model = TINY["llama"](2, vocab=len(bpe_tokenizer))
    job = JobConfig(
        model_name_or_path="tiny-llama",
        benchmark="geo_mod",
        m=4,
        compare_methods=["ftm_unconstrained"],
        sweep_blocks=["0", "1"],
        sweep_deltas=[1e-2],
        benchmark_options={"relations": ["P36"], "max_facts_per_relation": 40},
    )
    args = EditConfig(
        output_dir=str(tmp_path / "auto"),
        edit_blocks=["1"],
        max_steps=2,
        learning_rate=1e-2,
        report_to="none",
        disable_tqdm=True,
        per_device_train_batch_size=4,
    )
    picks = run_compare(job, args, model=model, tokenizer=bpe_tokenizer)
    result = json.loads((tmp_path / "auto" / "compare.json").read_text())
    stage = [row for row in points(tmp_path / "auto") if row["point"]["method"] == "ftm_linf"]
    assert {row["point"]["block"] for row in stage} == {"0", "1"} and list(result["rows"]) == ["ftm_unconstrained"]
    assert result["block"] == best(stage, VALIDATION)["point"]["block"] == picks["ftm_unconstrained"]["point"]["block"]
    assert "(the best L∞ block on validation)" in (tmp_path / "auto" / "compare.md").read_text()

    fixed = dataclasses.replace(args, output_dir=str(tmp_path / "fixed"))
    run_compare(dataclasses.replace(job, compare_block="0"), fixed, model=model, tokenizer=bpe_tokenizer)
    assert [row["point"]["method"] for row in points(tmp_path / "fixed")] == ["ftm_unconstrained"]
    assert points(tmp_path / "fixed")[0]["point"]["block"] == "0"
    assert "FTM variants and FTA edit block 0 (compare_block)." in (tmp_path / "fixed" / "compare.md").read_text()

    alone = dataclasses.replace(args, output_dir=str(tmp_path / "knn"))
    run_compare(
        dataclasses.replace(job, compare_methods=["knn"], method_args={"knn_epsilons": [0.0, 1e3]}),
        alone,
        model=model,
        tokenizer=bpe_tokenizer,
    )
    assert {row["point"]["method"] for row in points(tmp_path / "knn")} == {"knn"}
    assert json.loads((tmp_path / "knn" / "compare.json").read_text())["block"] is None


def test_relation_folds_pick_on_other_relations_and_report_on_held_out_ones(tmp_path, bpe_tokenizer):
    """relation_folds: the relations are dealt into folds (each with an edited relation), every point is scored on
    each fold's facts, and fold j's pick, the best on the other folds' facts pooled by their counts, is reported on
    fold j's own; a sweep reports the same; too many folds or a fold count below 2 stop with one line."""
    from statistics import mean

    from hf_memedit import EditConfig
    from hf_memedit.experiments import JobConfig, run_compare, run_sweep
    from hf_memedit.experiments.folds import pooled

    from .helpers import TINY, tiny_fold_compare

    model = TINY["llama"](2, vocab=len(bpe_tokenizer))
    job, args = tiny_fold_compare(tmp_path / "compare", ["ftm_linf", "ftm_unconstrained"])
    run_compare(job, args, model=model, tokenizer=bpe_tokenizer)
    written = json.loads((tmp_path / "compare" / "compare.json").read_text())
    folds = written["relation_folds"]["relations"]
    assert sorted(r for fold in folds for r in fold) == ["P1376", "P30", "P36"] and all(len(f) == 1 for f in folds)
    views = [f"relations/{j}" for j in range(3)]
    for row in (row for rows in written["rows"].values() for row in rows):
        assert (
            sum(row[v].get("n_modified", 0) for v in views)
            == row["validation"]["n_modified"] + row["test"]["n_modified"]
        )  # the folds partition the facts
    for method, result in written["relation_folds"]["methods"].items():
        rows = written["rows"][method]
        for j, pick in enumerate(result["folds"]):
            others = [v for v in views if v != views[j]]
            by_hand = max(rows, key=lambda r: pooled(r, others)["avg_acc"] or -1.0)
            assert pooled(by_hand, others)["avg_acc"] == pick["picked_on"]["avg_acc"]
            chosen = next(r for r in rows if r["point"] == pick["point"])
            assert pick["held_out"] == chosen[views[j]] and pick["relations"] == folds[j]
            held_out = chosen[views[j]]
            counted = [r[v] for v in others for r in [chosen] if r[v].get("n_modified")]
            assert pick["picked_on"]["a_m"] == pytest.approx(
                sum(f["a_m"] * f["n_modified"] for f in counted) / sum(f["n_modified"] for f in counted)
            )
            assert held_out.get("n_modified", 0) > 0
        assert result["summary"]["a_m"]["mean"] == pytest.approx(mean(p["held_out"]["a_m"] for p in result["folds"]))
    table = (tmp_path / "compare" / "compare.md").read_text()
    from hf_memedit.experiments.grid_point import point_of

    pick = written["relation_folds"]["methods"]["ftm_linf"]["folds"][0]
    held = pick["held_out"]
    counted = f"{100 * held['a_m']:.2f}% ({round(held['a_m'] * held['n_modified'])} of {held['n_modified']})"
    assert f"| FTM, L∞ | 0 | {point_of(pick).describe()} | {counted} |" in table  # A_M with the facts it rests on
    assert "## Held-out relations (3 folds)" in table and table.index("## Held-out relations") < table.index(
        "## Every point"
    )
    sweep_args = EditConfig(**{**args.to_dict(), "output_dir": str(tmp_path / "sweep")})
    import dataclasses

    run_sweep(dataclasses.replace(job, compare_methods=None), sweep_args, model=model, tokenizer=bpe_tokenizer)
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert len(sweep["relation_folds"]["methods"]["sweep"]["folds"]) == 3
    assert "## Held-out relations (3 folds)" in (tmp_path / "sweep" / "sweep.md").read_text()
    with pytest.raises(ValueError, match=r"relation_folds 4: the modified facts hold 3 relations"):
        run_compare(
            dataclasses.replace(job, relation_folds=4),
            dataclasses.replace(args, output_dir=str(tmp_path / "x")),
            model=model,
            tokenizer=bpe_tokenizer,
        )
    with pytest.raises(ValueError, match="relation_folds must be an integer of at least 2"):
        JobConfig(model_name_or_path="m", relation_folds=1)


def test_a_folds_pick_never_sees_its_held_out_relations_and_pools_by_counts():
    """Point A is the best on folds 1 and 2 and the worst on fold 0, B the reverse: fold 0 picks A and reports A's
    fold-0 figures. Pooling weighs each fold by its facts: fold 1's 30 facts outweigh fold 2's 2, where a plain mean of
    the shares would pick the other point. A retention floor picks among the points that keep enough."""
    from hf_memedit.experiments.folds import fold_picks, fold_summary, pooled

    def view(a_m, n, retention=1.0):
        return {"a_m": a_m, "n_modified": n, "a_fs": 0.5, "n_unmodified": 10, "retention": retention, "n_known": 10}

    a = {
        "point": {"method": "m", "norm": "linf", "block": "1", "delta": 0.01},
        "relations/0": view(0.1, 10),
        "relations/1": view(0.9, 30),
        "relations/2": view(0.0, 2, retention=0.5),
    }
    b = {
        "point": {"method": "m", "norm": "linf", "block": "1", "delta": 0.03},
        "relations/0": view(0.8, 10),
        "relations/1": view(0.5, 30),
        "relations/2": view(1.0, 2),
    }
    folds = [["P1"], ["P2"], ["P3"]]
    assert pooled(a, ["relations/1", "relations/2"])["a_m"] == pytest.approx((0.9 * 30 + 0.0 * 2) / 32)
    assert (0.9 + 0.0) / 2 < (0.5 + 1.0) / 2  # a plain mean of the shares would prefer B on folds 1 and 2
    picks = fold_picks([a, b], folds, None)
    assert picks[0]["point"] == a["point"] and picks[0]["held_out"] == a["relations/0"]  # worse there, never seen
    assert picks[1]["point"] == b["point"] and picks[2]["point"] == a["point"]
    assert fold_summary(picks)["a_m"] == {"mean": pytest.approx((0.1 + 0.5 + 0.0) / 3), "min": 0.0, "max": 0.5,
                                          "folds": 3}  # fmt: skip
    floor = fold_picks([a, b], folds, 0.95)  # fold 0: A keeps (10 + 5) / 20 on folds 1 and 2, B all of it
    assert floor[0]["point"] == b["point"]


def test_uneven_relation_folds_are_named_with_the_fix(caplog):
    """A fold with under half its even share of the modified facts is said, with per_relation as the fix; even
    folds are not."""
    import datasets

    from hf_memedit.experiments.folds import relation_folds

    def splits(relations):  # a fact's second test prompt (zsRE) is counted once
        rows = {"uuid": [*map(str, range(len(relations))), "0"], "relation": [*relations, relations[0]]}
        return datasets.DatasetDict({"modified_test": datasets.Dataset.from_dict(rows)})

    folds = relation_folds(splits(["P103"] * 10 + ["P36", "P17"]), 3, 0)
    assert sorted(r for fold in folds for r in fold) == ["P103", "P17", "P36"]
    assert "the folds hold" in caplog.text and '{"per_relation": true}' in caplog.text
    shares = caplog.text.split("the folds hold ")[1].split(" of the 12")[0]
    assert sorted(map(int, shares.split(" / "))) == [1, 1, 10]
    caplog.clear()
    relation_folds(splits(["P103"] * 10 + ["P36", "P17"]), 3, 0, per_relation=True)  # few facts of two relations
    assert "drawn relation by relation already" in caplog.text and 'per_relation": true' not in caplog.text
    caplog.clear()
    relation_folds(splits(["P103", "P36", "P17"] * 4), 3, 0)
    assert "the folds hold" not in caplog.text
