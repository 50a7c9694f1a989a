"""The two fast paths change no result: object-position-only logits and the frozen-prefix cache,
in training (loss, gradients, final weights) and in evaluation, on every architecture of the table."""

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from hf_memedit import BlockSelectorConfig, ConstrainedEditTrainer, EditConfig, evaluate_facts, get_edit_model
from hf_memedit.collators import FactCollator
from hf_memedit.fast_paths.prefix import PrefixCache, first_editable_block, unsafe_reason

from .helpers import FACTS, MASKED, TINY, assert_agree_up_to_reordering


COMMON = dict(report_to="none", disable_tqdm=True, seed=0, data_seed=0, save_strategy="no")
LR = 1e-2


def build(name: str, vocab: int, layers: int = 4):
    """A tiny random model without dropout (the cache runs frozen blocks without it; the slow path would not)."""
    return TINY[name](layers, vocab=vocab)


CAUSAL = sorted(set(TINY) - set(MASKED))


def tokenizer_for(name, bert_tokenizer, bpe_tokenizer):
    return bert_tokenizer if name in MASKED else bpe_tokenizer


def facts_for(name):
    """Causal LMs need the object after some prompt: drop the fact that starts with it."""
    return FACTS if name in MASKED else [f for f in FACTS if not f["text"].startswith("[Y]")]


class _FirstGradients(TrainerCallback):
    """The trainable parameters' gradients right before the first optimizer step."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def train(name, tokenizer, out, fast: bool, blocks=("-1",), dtype=torch.float64, max_steps=4, **kw):
    """Trains a tiny model; returns the trainer, each step's unrounded loss and the first step's gradients.

    float64 by default: then float reordering between two paths stays near 1e-16, far below what
    Adam can amplify into a visible weight difference (see `adam_tolerance`).
    """
    model = build(name, len(tokenizer)).to(dtype)
    args = EditConfig(
        output_dir=out,
        edit_blocks=list(blocks),
        norm="linf",
        delta=5e-2,
        learning_rate=LR,
        max_steps=max_steps,
        per_device_train_batch_size=4,
        logging_steps=1,
        prefix_cache=fast,
        object_logits_only=fast,
        **COMMON,
        **kw,
    )
    capture = _FirstGradients()
    trainer = ConstrainedEditTrainer(
        model, args, train_dataset=Dataset.from_list(facts_for(name)), processing_class=tokenizer, callbacks=[capture]
    )
    losses = []
    step = trainer.training_step

    def recording_step(*args, **kwargs):
        loss = step(*args, **kwargs)
        losses.append(loss.item())
        return loss

    trainer.training_step = recording_step
    trainer.train()
    return trainer, losses, capture.grads


def adam_tolerance(steps: int, dtype: torch.dtype) -> float:
    """How far two runs of the same Adam steps may drift when their gradients differ by reordering only.

    Adam's first update lr·g/(|g| + ε) has slope lr/ε at g ≈ 0, so a gradient error e moves a weight by
    up to (lr/ε)·e per step. A reordered sum of O(1) terms errs by a few hundred ulps at most
    (256·eps here). In float64 that is (1e-2/1e-8)·256·2.2e-16 ≈ 6e-8 per step; a wrong fast path
    moves weights by ~lr per step, 1e5 times more. (In float32 the same bound is ~1e2: no bound at all,
    which is why weights after Adam are compared in float64 only.)
    """
    return steps * (LR / 1e-8) * 256 * torch.finfo(dtype).eps


@pytest.mark.parametrize("name", MASKED + CAUSAL)
def test_fast_training_matches_the_straightforward_loop(name, tmp_out, bert_tokenizer, bpe_tokenizer):
    tokenizer = tokenizer_for(name, bert_tokenizer, bpe_tokenizer)
    blocks = ["all"] if name == "albert" else ["-1"]
    # In the dtype users train in: the first step's loss and gradients, the well-conditioned quantities.
    _, slow_losses, slow_grads = train(
        name, tokenizer, tmp_out, fast=False, blocks=blocks, dtype=torch.float32, max_steps=1
    )
    _, fast_losses, fast_grads = train(
        name, tokenizer, tmp_out, fast=True, blocks=blocks, dtype=torch.float32, max_steps=1
    )
    assert fast_losses == pytest.approx(slow_losses, rel=1e-6)
    assert_agree_up_to_reordering(fast_grads, slow_grads)
    # Four Adam steps and everything downstream, in float64 (see adam_tolerance).
    slow, slow_losses, slow_grads = train(name, tokenizer, tmp_out, fast=False, blocks=blocks)
    fast, fast_losses, fast_grads = train(name, tokenizer, tmp_out, fast=True, blocks=blocks)
    assert fast.object_logits_only
    if name == "albert":  # shared blocks: nothing below the edit is frozen, so no cache
        assert fast.prefix_cache is None
    elif unsafe_reason(fast.model, 3) is not None:  # Gemma's alternating layer types do not repeat from block 3
        assert name in {"gemma2", "gemma3_text"} and fast.prefix_cache is None
    else:
        assert (
            fast.prefix_cache is not None
            and fast.prefix_cache.block == 3
            and len(fast.prefix_cache) == len(facts_for(name))
        )
    assert len(slow_losses) == 4 and fast_losses == pytest.approx(slow_losses, rel=1e-12)
    assert_agree_up_to_reordering(fast_grads, slow_grads)
    slow_params, fast_params = slow.edit_model.trainable_parameters(), fast.edit_model.trainable_parameters()
    moved = 0
    for key, param in slow_params.items():
        torch.testing.assert_close(fast_params[key], param, rtol=0, atol=adam_tolerance(4, torch.float64), msg=key)
        moved += int(not torch.equal(param, slow.edit_model.theta0[key]))
    assert moved  # the edit changed something, so the equality is not vacuous
    splits = {"modified_test": Dataset.from_list(facts_for(name))}
    slow_eval = slow.fact_results(splits)["modified_test"]
    fast_eval = fast.fact_results(splits)["modified_test"]
    assert fast_eval.predicted == slow_eval.predicted
    # Trainer.evaluate on a plain dataset (the eval loss through prediction_step) agrees as well.
    facts = Dataset.from_list(facts_for(name))
    assert fast.evaluate(facts)["eval_loss"] == pytest.approx(slow.evaluate(facts)["eval_loss"], rel=1e-9)
    fast.args.prediction_loss_only = True  # the object-position logits suffice then
    assert fast.evaluate(facts)["eval_loss"] == pytest.approx(slow.evaluate(facts)["eval_loss"], rel=1e-9)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_fast_paths_hold_under_activation_checkpointing(name, tmp_out, bert_tokenizer, bpe_tokenizer):
    """Checkpointing runs the edited blocks again during backward: they must be fed and cut the same way."""
    tokenizer = tokenizer_for(name, bert_tokenizer, bpe_tokenizer)
    slow, slow_losses, slow_grads = train(name, tokenizer, tmp_out, fast=False, blocks=["2", "3"])
    fast, fast_losses, fast_grads = train(
        name,
        tokenizer,
        tmp_out,
        fast=True,
        blocks=["2", "3"],
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": False},
    )
    assert fast.prefix_cache.block == 2 and fast.model.is_activation_checkpointing
    assert len(slow_losses) == 4 and fast_losses == pytest.approx(slow_losses, rel=1e-12)
    assert_agree_up_to_reordering(fast_grads, slow_grads)
    fast_params = fast.edit_model.trainable_parameters()
    for key, param in slow.edit_model.trainable_parameters().items():
        torch.testing.assert_close(fast_params[key], param, rtol=0, atol=adam_tolerance(4, torch.float64), msg=key)


@pytest.mark.parametrize("name", [n for n in MASKED + CAUSAL if n != "albert"])  # ALBERT: no frozen prefix
def test_evaluation_from_the_prefix_equals_the_full_forward(name, bert_tokenizer, bpe_tokenizer):
    tokenizer = tokenizer_for(name, bert_tokenizer, bpe_tokenizer)
    model = build(name, len(tokenizer), layers=4).eval()
    facts = facts_for(name) * 3  # batches with padding
    full = evaluate_facts(model, tokenizer, facts, batch_size=5, full_logits=True)
    edit = get_edit_model(model, BlockSelectorConfig(blocks=["2", "3"]))
    cache = PrefixCache.for_model(model)
    assert cache.block == 2
    cache.add_facts(tokenizer, facts, batch_size=4)
    assert len(cache) == len(facts_for(name))  # one entry per distinct token sequence
    fast = evaluate_facts(model, tokenizer, facts, batch_size=5, prefix=cache)
    assert fast.predicted == full.predicted and fast.correct == full.correct
    # Half-precision storage: half the bytes, the same states up to that precision's rounding.
    half = PrefixCache.for_model(model, dtype="float16")
    assert len(evaluate_facts(model, tokenizer, facts, batch_size=5, prefix=half)) == len(facts)  # filled lazily
    assert set(half.states) == set(cache.states)
    for key, state in half.states.items():
        assert state.dtype == torch.float16
        torch.testing.assert_close(state.float(), cache.states[key], rtol=1e-3, atol=1e-3)
    edit.unload()


@pytest.mark.parametrize("name, block, config", [("gemma2", 3, {}), ("deberta-v2", 2, {"conv_kernel_size": 3})])
def test_a_forward_the_cache_cannot_wrap_runs_the_straightforward_loop(
    name, block, config, bert_tokenizer, bpe_tokenizer, tmp_out, caplog, monkeypatch
):
    """Gemma-2 picks each block's attention (sliding or full) by its index in the list; DeBERTa-v2 with a
    convolution adds it after block 0. Taking blocks out of the list would run them wrong: the trainer runs
    the straightforward loop, says so once, and the cache refuses to be built."""
    from hf_memedit.fast_paths import prefix

    tokenizer = tokenizer_for(name, bert_tokenizer, bpe_tokenizer)

    def model():
        m = build(name, len(tokenizer)).eval()
        if config:  # DeBERTa-v2's encoder builds its convolution from the config
            m = type(m)(type(m.config)(**{**m.config.to_dict(), **config})).eval()
        return m

    facts = facts_for(name)
    batch = FactCollator(tokenizer, "causal" if name in CAUSAL else "masked")(facts)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    real = batch["attention_mask"].bool()
    # Without the guard, the cut forward computes something else: the guard is what keeps results right.
    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(prefix, "unsafe_reason", lambda model, block: None)
        wrong = model()
        full = wrong(**inputs).logits[real]
        get_edit_model(wrong, BlockSelectorConfig(blocks=[str(block)]))
        cache = PrefixCache.for_model(wrong)
        assert cache.block == block
        with cache.feeding(**inputs):
            cut = wrong(**inputs).logits[real]
        assert (cut - full).abs().max() > 1e-3
    edited = model()
    get_edit_model(edited, BlockSelectorConfig(blocks=[str(block)]))
    with pytest.raises(ValueError, match="No prefix cache for .*Set prefix_cache: false"):
        PrefixCache(edited, block)
    prefix._say_once.cache_clear()
    with caplog.at_level("WARNING", logger=prefix.__name__):
        assert PrefixCache.for_model(edited) is None
        args = EditConfig(
            output_dir=tmp_out,
            edit_blocks=[str(block)],
            norm="linf",
            delta=1e-2,
            max_steps=1,
            per_device_train_batch_size=4,
            **COMMON,
        )
        trainer = ConstrainedEditTrainer(
            model(), args, train_dataset=Dataset.from_list(facts), processing_class=tokenizer
        )
        assert trainer.prefix_cache is None
    said = [r for r in caplog.records if "runs without the prefix cache" in r.getMessage()]
    assert len(said) == 1, said


def test_cache_refills_when_stale_and_refuses_misuse(tmp_out, bert_tokenizer):
    model = build("bert", bert_tokenizer.vocab_size)
    get_edit_model(model, BlockSelectorConfig(blocks=["2"]))
    cache = PrefixCache.for_model(model)
    batch = FactCollator(bert_tokenizer, "masked")(FACTS[:3])
    assert not batch["attention_mask"].all()  # padded
    cache.add_facts(bert_tokenizer, FACTS[:3])
    before = {key: state.clone() for key, state in cache.states.items()}
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight.mul_(2.0)  # a frozen weight below the edit is written to
    with cache.feeding(batch["input_ids"], batch["attention_mask"]):
        pass  # the stale states were dropped and this batch's recomputed
    assert set(cache.states) == set(before)
    assert all(not torch.allclose(cache.states[key], before[key]) for key in before)
    model.bert.encoder.layer[0].output.dense.bias.requires_grad_(True)  # something below the edit trains
    with pytest.raises(ValueError, match="a parameter below it now trains"):
        with cache.feeding(batch["input_ids"], batch["attention_mask"]):
            pass
    model.bert.encoder.layer[0].output.dense.bias.requires_grad_(False)
    # A cache for block 2 given to an edit of block 1.
    other = build("bert", bert_tokenizer.vocab_size)
    args = EditConfig(output_dir=tmp_out, edit_blocks=["1"], **COMMON)
    with pytest.raises(ValueError, match="holds the inputs of block 2"):
        ConstrainedEditTrainer(other, args, processing_class=bert_tokenizer, prefix_cache=cache)
    with pytest.raises(ValueError, match="Unknown prefix cache dtype"):
        PrefixCache(model, 2, dtype="float8")
    left = {k: v.flip(1) for k, v in batch.items()}
    with pytest.raises(ValueError, match="right-padded"):
        with PrefixCache(model, 2).feeding(left["input_ids"], left["attention_mask"]):
            pass


def test_what_is_frozen_decides_the_first_block(bert_tokenizer):
    model = build("bert", bert_tokenizer.vocab_size)
    for blocks, expected in ((["3"], 3), (["1", "3"], 1), (["embeddings", "3"], 0), (["0"], 0)):
        edit = get_edit_model(model, BlockSelectorConfig(blocks=blocks))
        assert first_editable_block(model) == expected, blocks
        assert (PrefixCache.for_model(model) is None) == (expected == 0)
        edit.unload()


def test_memory_estimate_refuses_a_cache_that_does_not_fit(bert_tokenizer, monkeypatch):
    model = build("bert", bert_tokenizer.vocab_size)
    get_edit_model(model, BlockSelectorConfig(blocks=["3"]))
    cache = PrefixCache.for_model(model)
    assert cache.estimate_bytes(100) == 100 * 16 * 4
    assert PrefixCache.for_model(model, dtype="float16").estimate_bytes(100) == 100 * 16 * 2

    class Tight:
        available = 1000

    monkeypatch.setattr("hf_memedit.fast_paths.prefix.psutil.virtual_memory", lambda: Tight)
    with pytest.raises(MemoryError, match="prefix_cache_dtype float16"):
        cache.add_facts(bert_tokenizer, FACTS)
    assert len(cache) == 0


def test_flos_are_the_trainers_estimate(tmp_out, bert_tokenizer):
    """The parameter count is taken once, the estimate is transformers' own."""
    from transformers import Trainer

    trainer, _, _ = train("bert", bert_tokenizer, tmp_out, fast=True, dtype=torch.float32)
    batch = FactCollator(bert_tokenizer, "masked")(FACTS[:3])
    expected = Trainer.floating_point_ops(trainer, batch)
    assert expected > 0 and trainer.floating_point_ops(batch) == expected
    assert trainer.state.total_flos > 0
