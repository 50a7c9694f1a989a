"""What the LocFT-BF baseline needs of the trainer: EOS targets, their per-fact loss, skipped batches,
the epoch stop."""

import datasets
import pytest
import torch

from hf_memedit import EditConfig, FactCollator
from hf_memedit.edit_trainer import ConstrainedEditTrainer
from hf_memedit.experiments.methods import METHODS
from hf_memedit.loss import ObjectTokenLoss

from .helpers import TINY


def _args(tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path),
        edit_blocks=["1"],
        edit_modules=["mlp_out"],
        norm="none",
        delta=None,
        learning_rate=1e-2,
        per_device_train_batch_size=2,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        logging_steps=1,
    )
    return EditConfig(**{**base, **overrides})


FACTS = [
    {"text": "The capital of France is [Y].", "object": "Paris"},
    {"text": "The capital of Peru is [Y].", "object": "Lima"},
]


def test_eos_is_appended_and_labelled_for_causal_lms_only(bpe_tokenizer, bert_tokenizer):
    plain = FactCollator(bpe_tokenizer, "causal")([FACTS[0]])
    eos = FactCollator(bpe_tokenizer, "causal", append_eos=True)([FACTS[0]])
    assert eos["input_ids"][0, :-1].tolist() == plain["input_ids"][0].tolist()
    assert eos["input_ids"][0, -1] == bpe_tokenizer.eos_token_id == eos["labels"][0, -1]
    assert (eos["labels"] != -100).sum() == (plain["labels"] != -100).sum() + 1
    with pytest.raises(ValueError, match="causal LM"):
        FactCollator(bert_tokenizer, "masked", append_eos=True)


def test_a_target_suffix_is_written_after_each_edit_rows_object_and_labelled(
    tmp_path, bpe_tokenizer, bert_tokenizer, caplog
):
    fact = {"text": "The capital of France is [Y]", "object": "Paris"}
    plain = FactCollator(bpe_tokenizer, "causal")([fact])
    stop = FactCollator(bpe_tokenizer, "causal", target_suffix=".")([fact])
    period = bpe_tokenizer("The capital of France is Paris.")["input_ids"]
    assert stop["input_ids"][0].tolist() == period  # "Paris." as the tokenizer writes it
    assert (stop["labels"] != -100).sum() > (plain["labels"] != -100).sum()
    assert stop["labels"][0, -1] == period[-1]  # the suffix's last token is a target
    # In a preservation group, KL neighbours keep θ0's answer as it is: only the edit rows end with the suffix.
    group = {"text": [fact["text"]] * 2, "object": ["Paris", "Lima"], "preserve": [False, True]}
    mixed = FactCollator(bpe_tokenizer, "causal", target_suffix=".")([group])
    alone = FactCollator(bpe_tokenizer, "causal")([{"text": fact["text"], "object": "Lima"}])
    for row, single in ((0, stop), (1, alone)):  # each row as encoded alone, then padding
        width = single["labels"].shape[1]
        assert mixed["labels"][row, :width].tolist() == single["labels"][0].tolist()
        assert (mixed["labels"][row, width:] == -100).all()
    # With EOS targets too: the object, the suffix, then EOS.
    both = FactCollator(bpe_tokenizer, "causal", append_eos=True, target_suffix=".")([fact])
    assert both["input_ids"][0].tolist() == [*period, bpe_tokenizer.eos_token_id]
    # A suffix the tokenizer would write into the object's own tokens is left out for that object, and said once.
    merged = FactCollator(bpe_tokenizer, "causal", target_suffix="is")  # "Par" + "is": the learnt "Paris" token
    par = {**fact, "object": "Par"}
    with caplog.at_level("WARNING"):
        rows = merged([par, par])
    assert rows["input_ids"][0].tolist() == FactCollator(bpe_tokenizer, "causal")([par])["input_ids"][0].tolist()
    assert caplog.text.count("target_suffix 'is' is not added after 'Par'") == 1
    # Likewise where the object with the suffix cannot be encoded (here: longer than max_length).
    short = FactCollator(bpe_tokenizer, "causal", target_suffix=".", max_length=plain["input_ids"].shape[1])
    assert short([fact])["input_ids"][0].tolist() == plain["input_ids"][0].tolist()
    assert "target_suffix '.' is not added after 'Paris': the object followed by it cannot be encoded" in caplog.text
    with pytest.raises(ValueError, match="masked LM has no such end"):
        FactCollator(bert_tokenizer, "masked", target_suffix=".")
    with pytest.raises(ValueError, match="target_suffix ' ' writes nothing after the object"):
        _args(tmp_path, target_suffix=" ")
    assert _args(tmp_path, target_suffix="\n").target_suffix == "\n"  # a newline ends an answer too
    # Named where a run's knobs are: its record, a grid point's label, a sweep's or compare's shared settings.
    from hf_memedit.experiments.grid_point import GridPoint
    from hf_memedit.experiments.reports import shared_settings

    point = GridPoint(norm="linf", block="1", delta=0.01, settings={"target_suffix": "."})
    assert point.describe() == "linf, block 1, targets end with '.', δ 0.01"
    assert ", target_suffix '.'; a point may set its own" in shared_settings(_args(tmp_path, target_suffix="."))
    assert "target_suffix" not in shared_settings(_args(tmp_path))


def test_the_trainer_trains_the_target_suffix(tmp_path, bpe_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(bpe_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    rows = datasets.Dataset.from_list([{"text": "The capital of France is [Y]", "object": "Paris"}])
    trainer = ConstrainedEditTrainer(
        model, _args(tmp_path, target_suffix="."), train_dataset=rows, processing_class=bpe_tokenizer
    )
    batch = next(iter(trainer.get_train_dataloader()))
    period = bpe_tokenizer("The capital of France is Paris.")["input_ids"]
    assert batch["input_ids"][0].tolist() == period
    trainer.args.max_steps = 1
    trainer.train()  # the prefix cache is filled up front with the sequence trained, not the object alone
    assert set(trainer.prefix_cache.states) == {tuple(period)}


def test_the_sequence_loss_is_the_mean_of_each_facts_mean(bpe_tokenizer):
    batch = FactCollator(bpe_tokenizer, "causal")(FACTS)
    torch.manual_seed(0)
    logits = torch.randn(*batch["input_ids"].shape, bpe_tokenizer.vocab_size + 1, dtype=torch.float64)
    labels = batch["labels"]
    per_fact = []
    for row in range(len(labels)):
        wanted = (labels[row, 1:] != -100).nonzero()[:, 0]
        ce = torch.nn.functional.cross_entropy(logits[row, wanted], labels[row, 1:][wanted], reduction="none")
        per_fact.append(ce.mean())
    expected = torch.stack(per_fact).mean().item()
    assert ObjectTokenLoss("causal", "sequence")({"logits": logits}, labels).item() == pytest.approx(
        expected, rel=1e-12
    )
    assert ObjectTokenLoss("causal")({"logits": logits}, labels).item() != pytest.approx(
        expected, rel=1e-6
    )  # FACTS differ in length


def test_a_batch_below_skip_below_loss_changes_nothing(tmp_path, bpe_tokenizer):
    data = datasets.Dataset.from_list(FACTS * 2)
    moved = {}
    for threshold in (None, 1e9):  # 1e9: every batch is "already learned"
        torch.manual_seed(0)
        model = TINY["llama"](2)
        trainer = ConstrainedEditTrainer(
            model,
            _args(tmp_path / str(threshold), max_steps=2, skip_below_loss=threshold),
            train_dataset=data,
            processing_class=bpe_tokenizer,
        )
        trainer.train()
        moved[threshold] = any(
            not torch.equal(p, trainer.edit_model.theta0[n])
            for n, p in trainer.edit_model.trainable_parameters().items()
        )
    assert moved[None] and not moved[1e9]


def test_training_stops_once_an_epoch_mean_loss_is_low(tmp_path, bpe_tokenizer):
    data = datasets.Dataset.from_list(FACTS * 2)
    model = TINY["llama"](2)
    trainer = ConstrainedEditTrainer(
        model,
        _args(tmp_path, num_train_epochs=5, stop_at_epoch_loss=1e9, eos_target=True, loss_reduction="sequence"),
        train_dataset=data,
        processing_class=bpe_tokenizer,
    )
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.state.epoch == pytest.approx(1.0)  # one epoch of 2 batches


def test_the_method_table_holds_the_2026_baselines():
    assert {"locft_bf", "ftm_nullspace", "ftm_answers"} <= set(METHODS)
    for name in ("skip_below_loss", "stop_at_epoch_loss"):
        with pytest.raises(ValueError, match=name):
            EditConfig(output_dir="x", **{name: 0})


def test_a_short_last_accumulation_group_weighs_as_much_as_a_full_one(tmp_path, bpe_tokenizer):
    """Three micro-batches of one fact, two per step: the epoch's second step accumulates one. With the mean per fact
    ('sequence'), its gradient is that fact's mean-loss gradient, not half of it (remainder / accumulation steps)."""
    from transformers import TrainerCallback

    class Capture(TrainerCallback):
        def __init__(self):
            self.steps = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.steps.append(
                (
                    {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                    {n: p.detach().clone() for n, p in model.named_parameters()},
                )
            )

    model = TINY["llama"](2, vocab=len(bpe_tokenizer)).double()
    capture = Capture()
    args = _args(
        tmp_path,
        loss_reduction="sequence",
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        num_train_epochs=1,
        max_steps=-1,
        edit_modules=None,
    )
    trainer = ConstrainedEditTrainer(
        model,
        args,
        train_dataset=datasets.Dataset.from_list([FACTS[0]] * 3),
        processing_class=bpe_tokenizer,
        callbacks=[capture],
    )
    trainer.train()
    assert len(capture.steps) == 2
    grads, params = capture.steps[1]
    reference = TINY["llama"](2, vocab=len(bpe_tokenizer)).double()
    reference.load_state_dict(params)
    batch = FactCollator(bpe_tokenizer, "causal")([FACTS[0]])
    labels = batch.pop("labels")
    ObjectTokenLoss("causal", "sequence")(reference(**batch), labels).backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if n in grads}
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-9, atol=1e-12, msg=name)
