"""`memedit inspect` on every family of the block table, from a config alone, and docs/models.md's list of them."""

import re

import pytest
from transformers import BloomConfig

from hf_memedit import ARCHITECTURES, BlockSelectorConfig
from hf_memedit.architectures import block_list
from hf_memedit.blocks import selected_parameter_names
from hf_memedit.cli import main
from hf_memedit.inspection import architectures_markdown

from .helpers import ROOT, TINY


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("arch", sorted(TINY))
def test_inspect_prints_the_layout_of_every_family(arch, tmp_path, capsys):
    """Only config.json is there: the layout and the parameter counts come from the meta device, and
    equal those of the real model."""
    model = TINY[arch](3, vocab=300)
    model.config.architectures = [type(model).__name__]  # as save_pretrained writes it, and Hub configs hold it
    model.config.save_pretrained(tmp_path)
    layout = ARCHITECTURES[arch]
    blocks = "all" if layout.shared_blocks else "1"
    main(["inspect", str(tmp_path), "--edit_blocks", blocks])
    out = capsys.readouterr().out
    assert out.startswith(f"{type(model).__name__} (model_type {arch!r}")
    assert f"parameters: {_count(model):,d}\n" in out
    assert f"blocks: {model.base_model_prefix}.{layout.blocks}, 3 blocks" in out
    assert f"LM head: {', '.join(layout.head)}\n" in out
    assert (f"mlp_out: {layout.mlp_out}\n" if layout.mlp_out else "mlp_out: none known") in out
    for index, block in enumerate(block_list(model, layout)):
        assert re.search(rf"^\| {index} \| {_count(block):,d} \|", out, re.M), (index, out)
    trained = selected_parameter_names(model, BlockSelectorConfig(blocks=[blocks]))
    total = sum(model.get_parameter(n).numel() for n in trained)
    assert (
        f"this edit trains: edit_blocks [{blocks if blocks == 'all' else 1!r}], "
        f"{len(trained)} tensors, {total:,d} parameters" in out
    )


def test_inspect_says_where_the_prefix_cache_can_start(tmp_path, capsys):
    TINY["gemma2"](4, vocab=300).config.save_pretrained(tmp_path)
    main(["inspect", str(tmp_path)])
    out = capsys.readouterr().out
    assert "prefix cache: from blocks 2 only (its forward reads config.layer_types by block index" in out
    assert "this edit trains" not in out  # no edit was chosen


def test_inspect_an_architecture_outside_the_table(tmp_path, capsys):
    BloomConfig(vocab_size=300, hidden_size=16, n_layer=2, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(SystemExit, match=r"memedit inspect: error: Architecture 'bloom' .* Pass `blocks_path`"):
        main(["inspect", str(tmp_path)])
    main(["inspect", str(tmp_path), "--blocks_path", "h", "--embeddings_paths", "word_embeddings"])
    out = capsys.readouterr().out
    assert "layout from the user's blocks_path" in out and "blocks: transformer.h, 2 blocks" in out
    assert "LM head: unknown" in out and "embeddings: transformer.word_embeddings (4,800)" in out


def test_the_models_page_lists_the_block_table():
    """docs/models.md lists the block table's architectures, as `architectures_markdown` writes them."""
    page = (ROOT / "docs" / "models.md").read_text(encoding="utf-8")
    begin, end = "<!-- architectures: begin -->\n", "\n<!-- architectures: end -->"
    assert begin in page and end in page, "docs/models.md lost its architectures markers"
    listed = page.split(begin, 1)[1].split(end, 1)[0]
    assert listed == architectures_markdown(), (
        "docs/models.md's architecture list is stale: paste python -c 'from hf_memedit.inspection import "
        "architectures_markdown; print(architectures_markdown())' between its markers."
    )
