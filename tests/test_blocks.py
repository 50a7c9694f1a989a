import pytest
import torch
from datasets import Dataset
from transformers import (
    ElectraConfig,
    ElectraForMaskedLM,
    T5Config,
    T5ForConditionalGeneration,
)

from hf_memedit import ARCHITECTURES, BlockSelectorConfig, ConstrainedEditTrainer, EditConfig, get_edit_model
from hf_memedit.blocks import selected_parameter_names

from .helpers import FACTS, SMALL, TINY, V, assert_in_linf_ball, tiny_bert


def test_every_table_entry_has_a_tiny_model():
    assert set(TINY) == set(ARCHITECTURES)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_constrained_edit_on_every_architecture(arch, bert_tokenizer, tmp_out):
    torch.manual_seed(0)
    model = TINY[arch](3)
    shared = ARCHITECTURES[arch].shared_blocks
    blocks = ["all"] if shared else ["-1"]
    names = selected_parameter_names(model, BlockSelectorConfig(blocks=blocks))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = EditConfig(
        output_dir=tmp_out,
        edit_blocks=blocks,
        norm="linf",
        delta=1e-3,
        max_steps=3,
        learning_rate=1e-2,
        per_device_train_batch_size=4,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = ConstrainedEditTrainer(
        model, args, train_dataset=Dataset.from_list(FACTS), processing_class=bert_tokenizer
    )
    trainer.train()
    assert trainer.projector.num_projections == 3
    for name, param in model.named_parameters():
        if name in names:
            assert_in_linf_ball(param, before[name], 1e-3, name)
        else:
            assert torch.equal(param.detach(), before[name]), f"{name} is frozen but changed"
    assert any((model.get_parameter(n) != before[n]).any() for n in names)
    if not shared:
        assert all(".2." in n for n in names), names  # the last of 3 blocks, only


@pytest.mark.parametrize("arch", sorted(TINY))
def test_embeddings_selection(arch):
    """The parameters of the table's embedding modules, no more and no fewer (a weight tied to the head counts)."""
    model = TINY[arch](2)
    names = selected_parameter_names(model, BlockSelectorConfig(blocks=["embeddings"]))
    modules = [model.base_model.get_submodule(path) for path in ARCHITECTURES[arch].embeddings]
    if arch == "opt":  # its embeddings are narrower than its blocks: their projection is one of them
        modules.append(model.base_model.decoder.project_in)
    expected = {id(p) for module in modules for p in module.parameters()}
    assert names and {id(model.get_parameter(n)) for n in names} == expected, names


def test_electra_embeddings_include_their_projection():
    """ELECTRA narrower embeddings are projected to the hidden size: that projection is part of them."""
    narrow = ElectraForMaskedLM(ElectraConfig(vocab_size=V, num_hidden_layers=2, embedding_size=8, **SMALL))
    names = selected_parameter_names(narrow, BlockSelectorConfig(blocks=["embeddings"]))
    assert {"electra.embeddings_project.weight", "electra.embeddings_project.bias"} <= set(names)
    wide = TINY["electra"](2)  # embedding_size == hidden_size: no projection is built
    assert not any(
        "embeddings_project" in n for n in selected_parameter_names(wide, BlockSelectorConfig(blocks=["embeddings"]))
    )


def test_block_indices_match_exactly():
    model = tiny_bert(100, layers=22)
    for index, expected in ((2, "layer.2."), (1, "layer.1."), (-1, "layer.21."), (12, "layer.12.")):
        names = selected_parameter_names(model, BlockSelectorConfig(blocks=[index]))
        assert names and all(f"encoder.{expected}" in n for n in names), (index, names)
    two = selected_parameter_names(model, BlockSelectorConfig(blocks=["2"]))
    assert not any("layer.12." in n or "layer.21." in n for n in two)
    both = selected_parameter_names(model, BlockSelectorConfig(blocks="embeddings,0"))
    assert any("embeddings" in n for n in both) and any("layer.0." in n for n in both)
    every = selected_parameter_names(model, BlockSelectorConfig(blocks=["all"]))
    assert len(every) == 22 * len(selected_parameter_names(model, BlockSelectorConfig(blocks=[0])))


def test_unknown_block_index_lists_the_valid_ones():
    model = tiny_bert(100, layers=4)
    with pytest.raises(
        ValueError, match=r"Unknown block index 4: BertForMaskedLM has 4 blocks, valid indices are 0..3"
    ):
        get_edit_model(model, BlockSelectorConfig(blocks=[4]))
    with pytest.raises(ValueError, match=r"Unknown block 'first'"):
        BlockSelectorConfig(blocks=["first"])
    with pytest.raises(ValueError, match="blocks is empty"):
        BlockSelectorConfig(blocks=[])
    # The model was not touched by the failed selections.
    assert all(p.requires_grad for p in model.parameters())


def test_albert_single_block_explains_sharing():
    model = TINY["albert"](6)
    with pytest.raises(ValueError, match="shares one set of weights across all its 6 layers"):
        get_edit_model(model, BlockSelectorConfig(blocks=[0]))


def test_architecture_outside_the_table_needs_a_path():
    model = T5ForConditionalGeneration(
        T5Config(vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2)
    )
    with pytest.raises(ValueError, match="'t5' .* is not in hf_memedit's block table.*blocks_path"):
        get_edit_model(model, BlockSelectorConfig(blocks=[0]))
    edit = get_edit_model(model, BlockSelectorConfig(blocks=[1], blocks_path="encoder.block"))
    assert edit.theta0 and all(n.startswith("encoder.block.1.") for n in edit.theta0)
    with pytest.raises(ValueError, match="has no module 'encoder.blocks'.*its children"):
        get_edit_model(
            T5ForConditionalGeneration(model.config), BlockSelectorConfig(blocks=[0], blocks_path="encoder.blocks")
        )


def test_selection_without_parameters_is_refused():
    model = tiny_bert(100, layers=2)
    model.bert.encoder.layer[0] = torch.nn.Identity()
    with pytest.raises(ValueError, match="holds no parameters"):
        get_edit_model(model, BlockSelectorConfig(blocks=[0]))


def test_print_trainable_parameters(capsys):
    edit = get_edit_model(tiny_bert(100, layers=2), BlockSelectorConfig(blocks=[1]))
    edit.print_trainable_parameters()
    out = capsys.readouterr().out
    trainable, total = edit.get_nb_trainable_parameters()
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in out
    assert 0 < trainable < total


@pytest.mark.parametrize("arch", sorted(TINY))
def test_mlp_out_selects_one_projection_per_block(arch):
    """FT-L's selection: the MLP output projection of the chosen block, nothing else."""
    model = TINY[arch](3)
    layout = ARCHITECTURES[arch]
    blocks = ["all"] if layout.shared_blocks else ["1"]
    if layout.mlp_out is None:  # Mixtral: every expert's projections are one fused tensor
        with pytest.raises(ValueError, match="No MLP output projection is known"):
            selected_parameter_names(model, BlockSelectorConfig(blocks=blocks, modules=["mlp_out"]))
        return
    names = selected_parameter_names(model, BlockSelectorConfig(blocks=blocks, modules=["mlp_out"]))
    suffix = layout.mlp_out + "."
    assert names and all(suffix in name for name in names), names
    if not layout.shared_blocks:
        assert all(".1." in name for name in names)
    with pytest.raises(ValueError, match="has no submodule 'no.such'"):
        selected_parameter_names(model, BlockSelectorConfig(blocks=blocks, modules=["no.such"]))


@pytest.mark.parametrize("accumulation", [1, 2])
def test_stop_at_loss_ends_training_early(bert_tokenizer, tmp_out, accumulation):
    model = tiny_bert(bert_tokenizer.vocab_size, layers=2)
    args = EditConfig(
        output_dir=tmp_out,
        edit_blocks=["0"],
        edit_modules=["mlp_out"],
        norm="linf",
        delta=1e-3,
        max_steps=20,
        stop_at_loss=100.0,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=accumulation,
    )
    trainer = ConstrainedEditTrainer(
        model, args, train_dataset=Dataset.from_list(FACTS), processing_class=bert_tokenizer
    )
    trainer.train()
    assert trainer.state.global_step == 1  # the first loss (≈ ln V ≈ 10) is already below 100
    assert trainer.projector.num_projections == 1  # ... and that step was taken whole, not cut mid-accumulation
    assert trainer.edit_model.changed_tensors()
    assert set(trainer.edit_model.theta0) == {n for n, _ in model.named_parameters() if ".layer.0.output.dense." in n}


def test_a_blocks_path_model_trains_with_the_full_head_and_says_so(tmp_out, bpe_tokenizer, caplog):
    """An architecture outside the table (BLOOM, through blocks_path) has no known head: the trainer says
    it runs the full head instead of silently dropping object-position logits; its prefix cache is
    read against the user's layout and trains the same weights as without it."""
    from transformers import BloomConfig, BloomForCausalLM

    def train(prefix_cache: bool):
        torch.manual_seed(0)
        model = BloomForCausalLM(
            BloomConfig(
                vocab_size=len(bpe_tokenizer),
                hidden_size=16,
                n_layer=2,
                n_head=2,
                hidden_dropout=0.0,
                attention_dropout=0.0,
            )
        ).double()
        args = EditConfig(
            output_dir=tmp_out,
            edit_blocks=["1"],
            blocks_path="h",
            norm="linf",
            delta=1e-2,
            max_steps=3,
            learning_rate=1e-2,
            report_to="none",
            disable_tqdm=True,
            save_strategy="no",
            prefix_cache=prefix_cache,
        )
        facts = [f for f in FACTS if not f["text"].startswith("[Y]")]
        return ConstrainedEditTrainer(
            model, args, train_dataset=Dataset.from_list(facts), processing_class=bpe_tokenizer
        )

    with caplog.at_level("WARNING", logger="hf_memedit.edit_trainer"):
        cached = train(prefix_cache=True)
    assert not cached.object_logits_only and cached.prefix_cache is not None and cached.prefix_cache.block == 1
    assert "block table does not hold the LM head" in caplog.text and "BloomForCausalLM" in caplog.text
    plain = train(prefix_cache=False)
    for trainer in (cached, plain):
        trainer.train()
    changed = cached.edit_model.changed_tensors()
    assert changed and changed.keys() == plain.edit_model.changed_tensors().keys()
    for name, value in changed.items():  # float64: reordering stays far below a wrong cache's effect
        torch.testing.assert_close(value, plain.edit_model.trainable_parameters()[name], rtol=0, atol=1e-9, msg=name)


def test_resolved_blocks_name_each_block_as_the_model_counts_it():
    """What a run's summary shows: "-1" of a 2-block model is block 1; 'all' and 'embeddings' stay as they are."""
    from hf_memedit.blocks import resolved_blocks

    model = TINY["llama"](2)
    assert resolved_blocks(model, BlockSelectorConfig(blocks=["-1", "0"])) == ["1", "0"]
    assert resolved_blocks(model, BlockSelectorConfig(blocks=["all", "embeddings"])) == ["all", "embeddings"]
