import os

import pytest
import torch
from datasets import Dataset
from transformers import BertForMaskedLM, Trainer, TrainerCallback, TrainingArguments

from hf_memedit import ConstrainedEditTrainer, EditConfig, FactCollator
from hf_memedit.checkpointing import THETA0_NAME
from hf_memedit.projection import l2_distance

from .helpers import FACTS, assert_agree_up_to_reordering, assert_in_linf_ball, tiny_bert


COMMON = dict(report_to="none", disable_tqdm=True, seed=0, data_seed=0, dataloader_pin_memory=False)


def _args(out, **kw):
    values = dict(norm="linf", delta=1e-3, edit_blocks=["1"], learning_rate=1e-2, save_strategy="no", **COMMON)
    values.update(kw)
    return EditConfig(output_dir=out, **values)


class _GradCapture(TrainerCallback):
    """Keeps the gradients right before the first real optimizer step."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _first_step_grads(trainer_cls, args, vocab, tokenizer, facts):
    capture = _GradCapture()
    model = tiny_bert(vocab, layers=2)
    kwargs = dict(args=args, train_dataset=Dataset.from_list(facts), callbacks=[capture])
    if trainer_cls is Trainer:
        trainer = Trainer(model=model, data_collator=FactCollator(tokenizer, "masked"), **kwargs)
    else:
        trainer = trainer_cls(model, processing_class=tokenizer, **kwargs)
    trainer.train()
    return capture.grads, trainer.state.log_history[-1]["train_loss"]


def test_gradient_accumulation_equals_the_large_batch(tmp_out, bert_tokenizer):
    facts = FACTS[:4]  # objects of 1, 1, 3 and 1 tokens: unequal micro-batches
    vocab = bert_tokenizer.vocab_size
    full, full_loss = _first_step_grads(
        ConstrainedEditTrainer,
        _args(tmp_out, per_device_train_batch_size=4, max_steps=1),
        vocab,
        bert_tokenizer,
        facts,
    )
    accum, accum_loss = _first_step_grads(
        ConstrainedEditTrainer,
        _args(tmp_out, per_device_train_batch_size=1, gradient_accumulation_steps=4, max_steps=1),
        vocab,
        bert_tokenizer,
        facts,
    )
    assert_agree_up_to_reordering(accum, full)
    assert accum_loss == pytest.approx(full_loss, rel=1e-5)

    # The pitfall it fixes: a plain Trainer on BertForMaskedLM gets other gradients.
    plain_args = lambda **kw: TrainingArguments(  # noqa: E731
        output_dir=tmp_out, remove_unused_columns=False, max_steps=1, **COMMON, **kw
    )
    plain_full, _ = _first_step_grads(Trainer, plain_args(per_device_train_batch_size=4), vocab, bert_tokenizer, facts)
    plain_accum, _ = _first_step_grads(
        Trainer, plain_args(per_device_train_batch_size=1, gradient_accumulation_steps=4), vocab, bert_tokenizer, facts
    )
    assert any(not torch.allclose(plain_full[n], plain_accum[n], rtol=1e-2) for n in plain_full)


def test_projection_once_per_real_step_and_bound_holds(tmp_out, bert_tokenizer):
    model = tiny_bert(bert_tokenizer.vocab_size, layers=2)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = _args(tmp_out, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=5, logging_steps=1)
    trainer = ConstrainedEditTrainer(
        model, args, train_dataset=Dataset.from_list(FACTS), processing_class=bert_tokenizer
    )
    trainer.train()
    assert trainer.projector.num_projections == 5  # 10 micro-steps, 5 optimizer steps
    for name, param in trainer.edit_model.trainable_parameters().items():
        assert_in_linf_ball(param, theta0[name], 1e-3, name)
    assert trainer.projector.distance() == pytest.approx(1e-3, rel=1e-3)  # the constraint is active
    logged = [entry["constraint_distance"] for entry in trainer.state.log_history if "constraint_distance" in entry]
    assert len(logged) == 5 and all(0 < d <= 1e-3 + 1e-6 for d in logged)  # float32 rounding at |θ0| ≈ 1


def test_l2_bound_holds_after_training(tmp_out, bert_tokenizer):
    model = tiny_bert(bert_tokenizer.vocab_size, layers=2)
    args = _args(tmp_out, norm="l2", delta=1e-2, per_device_train_batch_size=4, max_steps=4)
    trainer = ConstrainedEditTrainer(
        model, args, train_dataset=Dataset.from_list(FACTS), processing_class=bert_tokenizer
    )
    trainer.train()
    distance = float(l2_distance(trainer.edit_model.trainable_parameters(), trainer.edit_model.theta0))
    assert 0.99e-2 < distance <= 1e-2 * (1 + 1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_skipped_optimizer_steps_are_not_projected(tmp_out, bert_tokenizer, fused):
    """A step the fp16 grad scaler skips (inf gradients) is not projected, for fused and plain Adam."""
    model = tiny_bert(bert_tokenizer.vocab_size, layers=2)
    trainer = ConstrainedEditTrainer(
        model,
        _args(tmp_out, max_steps=1, optim="adamw_torch_fused" if fused else "adamw_torch"),
        train_dataset=Dataset.from_list(FACTS),
        processing_class=bert_tokenizer,
    )
    optimizer = trainer.create_optimizer()
    assert bool(optimizer.defaults.get("fused")) == fused
    assert trainer.create_optimizer() is optimizer  # hooked once, however often it is asked for
    scaler = torch.amp.GradScaler("cpu")
    params = list(trainer.edit_model.trainable_parameters().values())
    scaler.scale(torch.ones(()))  # starts the scaler's bookkeeping, as scaling the loss would
    for p in params:
        p.grad = torch.full_like(p, float("inf"))
    scaler.step(optimizer)
    scaler.update()
    assert trainer.projector.num_projections == 0
    scaler.scale(torch.ones(()))
    for p in params:
        p.grad = torch.ones_like(p)
    scaler.step(optimizer)
    assert trainer.projector.num_projections == 1


class _Crash(TrainerCallback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise KeyboardInterrupt("killed mid-way")


def _resume_args(out):
    return _args(
        out,
        per_device_train_batch_size=2,
        max_steps=6,
        save_strategy="steps",
        save_steps=2,
        learning_rate=5e-3,
        delta=2e-3,
    )


def test_resume_matches_an_uninterrupted_run_and_keeps_theta0(tmp_path, bert_tokenizer):
    vocab = bert_tokenizer.vocab_size
    data = Dataset.from_list(FACTS)

    def run(model, out, **train_kwargs):
        trainer = ConstrainedEditTrainer(model, _resume_args(out), train_dataset=data, processing_class=bert_tokenizer)
        trainer.train(**train_kwargs)
        return trainer

    reference = run(tiny_bert(vocab, layers=2, dropout=0.1), str(tmp_path / "ref"))
    theta0 = {n: t.clone() for n, t in reference.edit_model.theta0.items()}

    crashed_dir = str(tmp_path / "crash")
    crashed = ConstrainedEditTrainer(
        tiny_bert(vocab, layers=2, dropout=0.1),
        _resume_args(crashed_dir),
        train_dataset=data,
        processing_class=bert_tokenizer,
        callbacks=[_Crash(at_step=3)],
    )
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    assert sorted(os.listdir(crashed_dir)) == ["checkpoint-2"]
    assert os.path.isfile(os.path.join(crashed_dir, "checkpoint-2", THETA0_NAME))

    # Resume from a fresh copy of the base model.
    resumed = run(tiny_bert(vocab, layers=2, dropout=0.1), crashed_dir, resume_from_checkpoint=True)
    for name, param in reference.edit_model.trainable_parameters().items():
        assert torch.equal(resumed.edit_model.trainable_parameters()[name], param), name

    # Resume from the checkpoint's own weights: θ0 still is the original model, not the checkpoint.
    checkpoint = BertForMaskedLM.from_pretrained(os.path.join(crashed_dir, "checkpoint-2"))
    from_checkpoint = run(checkpoint, crashed_dir, resume_from_checkpoint=os.path.join(crashed_dir, "checkpoint-2"))
    for name, value in theta0.items():
        assert torch.equal(from_checkpoint.edit_model.theta0[name], value), name
        assert torch.equal(
            from_checkpoint.edit_model.trainable_parameters()[name], reference.edit_model.trainable_parameters()[name]
        )


@pytest.mark.parametrize(
    "constraint", [dict(norm="l2", key_constraint="output", output_rho=1e-3), dict(norm="fisher", delta=1e-1)]
)
def test_resume_from_the_checkpoints_weights_builds_the_constraint_around_theta0(constraint, tmp_path, bert_tokenizer):
    """Given the checkpoint's own weights, the preserved keys, the output radius and the Fisher are estimated at θ0
    as restored from the checkpoint, not at the weights given: the edit equals the uninterrupted one."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(f["text"].replace("[Y]", f["object"]) for f in FACTS) + "\nThe capital of Italy is Rome.\n"
    )
    data = Dataset.from_list(FACTS)
    vocab = bert_tokenizer.vocab_size

    def trainer(model, out, **kw):
        args = _args(
            out,
            per_device_train_batch_size=2,
            max_steps=6,
            save_strategy="steps",
            save_steps=2,
            learning_rate=5e-2,
            delta=constraint.get("delta", 5e-2),
            preserve_corpus=str(corpus),
            preserve_keys_file=str(tmp_path / "keys.safetensors"),
            **{k: v for k, v in constraint.items() if k != "delta"},
        )
        return ConstrainedEditTrainer(
            model, args, train_dataset=data, processing_class=bert_tokenizer, fisher_dataset=data, **kw
        )

    reference = trainer(tiny_bert(vocab, layers=2), str(tmp_path / "ref"))
    reference.train()
    crashed = trainer(tiny_bert(vocab, layers=2), str(tmp_path / "crash"), callbacks=[_Crash(at_step=3)])
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    checkpoint = str(tmp_path / "crash" / "checkpoint-2")
    resumed = trainer(BertForMaskedLM.from_pretrained(checkpoint), str(tmp_path / "crash"))
    resumed.train(resume_from_checkpoint=checkpoint)
    if reference.keys is not None:
        for name, moment in reference.keys.moments.items():
            assert torch.equal(resumed.keys.moments[name], moment), name
        for name, (_, _, radius) in reference.projector.keys.bases.items():
            assert resumed.projector.keys.bases[name][2] == radius, name
    else:
        for name, weight in reference.projector.fisher.items():
            assert torch.equal(resumed.projector.fisher[name], weight), name
    for name, param in reference.edit_model.trainable_parameters().items():
        assert torch.equal(resumed.edit_model.trainable_parameters()[name], param), name


def test_resume_from_a_foreign_checkpoint_is_refused(tmp_path, bert_tokenizer):
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    trainer = ConstrainedEditTrainer(
        tiny_bert(bert_tokenizer.vocab_size, layers=2),
        _args(str(tmp_path)),
        train_dataset=Dataset.from_list(FACTS),
        processing_class=bert_tokenizer,
    )
    with pytest.raises(ValueError, match="not written by ConstrainedEditTrainer"):
        trainer.train(resume_from_checkpoint=str(folder))


def test_needs_an_edit_config(tmp_out):
    with pytest.raises(TypeError, match="needs an EditConfig"):
        ConstrainedEditTrainer(tiny_bert(100), TrainingArguments(output_dir=tmp_out))


def test_diagonal_fisher_is_the_mean_of_per_fact_squared_gradients_of_log_p(bert_tokenizer):
    """F = mean over facts of (∂ log p(object | text) / ∂θ)², log p summed over the object's tokens: a 3-token object
    (FACTS[2]) weighs as much as its log-likelihood says, not 1/9 of it (the square of a per-token mean)."""
    from hf_memedit.fisher import diagonal_fisher

    model = tiny_bert(bert_tokenizer.vocab_size, layers=2, dropout=0.1).train()
    names = [n for n, _ in model.named_parameters() if ".layer.1." in n]
    fisher = diagonal_fisher(model, bert_tokenizer, FACTS[:3], names, samples=3)
    assert model.training and all(p.requires_grad for p in model.parameters())  # restored
    model.eval()  # dropout off, as diagonal_fisher has it
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters() if n in names}
    lengths = []
    for fact in FACTS[:3]:
        batch = FactCollator(bert_tokenizer, "masked")([fact])
        positions = batch["labels"] != -100
        lengths.append(int(positions.sum()))
        model.zero_grad()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        log_p = logits[positions].log_softmax(-1).gather(1, batch["labels"][positions][:, None]).sum()
        log_p.backward()
        for n, p in model.named_parameters():
            if n in names:
                expected[n] += p.grad.pow(2) / 3
    assert max(lengths) == 3  # a multi-token object is among them
    for n in names:
        assert torch.allclose(fisher[n], expected[n], rtol=1e-5, atol=1e-12), n


def test_fisher_norm_needs_unmodified_facts(bert_tokenizer, tmp_out):
    args = _args(tmp_out, norm="fisher", delta=1e-2)
    with pytest.raises(ValueError, match="needs fisher_dataset"):
        ConstrainedEditTrainer(
            tiny_bert(bert_tokenizer.vocab_size, layers=2),
            args,
            train_dataset=Dataset.from_list(FACTS),
            processing_class=bert_tokenizer,
        )
