"""Sharing edits: manifest, delta/full/peft round trips, tamper and escape refusals, wrong base,
stacked edits, the model card, and a real push to a loopback Hub and back."""

import json
import os

import pytest
import torch
import yaml
from transformers import AutoModelForMaskedLM

from hf_memedit import EditModel, evaluate_facts
from hf_memedit.cli import main
from hf_memedit.hub import apply_edit, package_edit, push_edit, push_folder, revert_edit
from hf_memedit.hub.manifest import MANIFEST_NAME, ManifestError, manifest_id, read_manifest

from .helpers import DELTA, FACTS, ROOT, tiny_bert
from .helpers import make_run_folder as _make_run
from .utils.hub_server import FakeHub


def _state(model):
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def _same(model, state) -> bool:
    return all(torch.equal(value, state[name]) for name, value in model.state_dict().items())


@pytest.fixture
def run(tmp_path, base_dir):
    """(run folder, the edited model's state, the base state)."""
    base_state = _state(AutoModelForMaskedLM.from_pretrained(base_dir))
    edited = _make_run(str(tmp_path / "run"), AutoModelForMaskedLM.from_pretrained(base_dir), seed=0)
    return str(tmp_path / "run"), _state(edited), base_state


@pytest.mark.parametrize("format", ["delta", "full"])
def test_round_trip_apply_and_revert(format, run, base_dir, tmp_path):
    run_dir, edited_state, base_state = run
    base = {} if format == "delta" else {"base_model": AutoModelForMaskedLM.from_pretrained(base_dir)}
    manifest = package_edit(run_dir, str(tmp_path / "out"), format=format, **base)
    assert manifest["format"] == format and set(manifest["tensors"]) == {
        n for n in edited_state if not torch.equal(edited_state[n], base_state[n])
    }
    for entry in manifest["tensors"].values():
        assert 0 < entry["max_abs_delta"] <= DELTA and entry["l2_delta"] > 0
    files = set(os.listdir(tmp_path / "out"))
    assert {MANIFEST_NAME, "README.md", "memedit_base.safetensors"} <= files
    if format == "delta":
        assert "model.safetensors" not in files
        size = sum(os.path.getsize(tmp_path / "out" / f) for f in files)
        assert size < os.path.getsize(os.path.join(base_dir, "model.safetensors"))
    else:  # plain transformers loads it
        assert _same(AutoModelForMaskedLM.from_pretrained(tmp_path / "out"), edited_state)

    model = AutoModelForMaskedLM.from_pretrained(base_dir)
    apply_edit(model, str(tmp_path / "out"))
    assert _same(model, edited_state)
    assert model.config.memedit_chain == [manifest["id"]]
    revert_edit(model, str(tmp_path / "out"))
    assert _same(model, base_state) and model.config.memedit_chain == []


def test_peft_format_loads_with_stock_peft(run, base_dir, tmp_path):
    from peft import PeftModel

    run_dir, edited_state, _ = run
    with pytest.raises(ValueError, match="format 'peft' writes the edited model, so package_edit needs base_model"):
        package_edit(run_dir, str(tmp_path / "out"), format="peft")
    package_edit(
        run_dir, str(tmp_path / "out"), format="peft", base_model=AutoModelForMaskedLM.from_pretrained(base_dir)
    )
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LN_TUNING"
    merged = PeftModel.from_pretrained(
        AutoModelForMaskedLM.from_pretrained(base_dir), tmp_path / "out"
    ).merge_and_unload()
    assert _same(merged, edited_state)
    with pytest.raises(ValueError, match="PeftModel.from_pretrained"):
        apply_edit(AutoModelForMaskedLM.from_pretrained(base_dir), str(tmp_path / "out"))


def _flip_byte(path, offset_from_end: int = 10):
    data = bytearray(open(path, "rb").read())
    data[-offset_from_end] ^= 0x01
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("target", ["memedit_edit.safetensors", MANIFEST_NAME])
def test_one_changed_byte_is_refused_and_the_base_is_untouched(target, run, base_dir, tmp_path):
    run_dir, _, base_state = run
    package_edit(run_dir, str(tmp_path / "out"))
    _flip_byte(tmp_path / "out" / target, offset_from_end=40 if target == MANIFEST_NAME else 10)
    model = AutoModelForMaskedLM.from_pretrained(base_dir)
    with pytest.raises(ManifestError, match="changed|tampered|damaged"):
        apply_edit(model, str(tmp_path / "out"))
    assert _same(model, base_state)


def test_manifest_names_that_escape_the_folder_are_refused(run, tmp_path):
    run_dir, _, _ = run
    package_edit(run_dir, str(tmp_path / "out"))
    path = tmp_path / "out" / MANIFEST_NAME
    for evil in ("../../etc/passwd", "/etc/passwd", "sub/../../x"):
        manifest = json.loads(path.read_text())
        manifest["files"][evil] = "0" * 64
        manifest["id"] = manifest_id(manifest)  # resealed: only the path check stands in the way
        path.write_text(json.dumps(manifest))
        with pytest.raises(ManifestError, match="refused"):
            read_manifest(str(tmp_path / "out"))
        del manifest["files"][evil]
        manifest["id"] = manifest_id(manifest)
        path.write_text(json.dumps(manifest))


def test_wrong_base_is_refused_and_left_untouched(run, tmp_path, bert_tokenizer):
    run_dir, _, _ = run
    package_edit(run_dir, str(tmp_path / "out"))
    other = tiny_bert(bert_tokenizer.vocab_size, layers=2, seed=7)
    before = _state(other)
    with pytest.raises(ValueError, match="different base model"):
        apply_edit(other, str(tmp_path / "out"))
    assert _same(other, before) and not getattr(other.config, "memedit_chain", None)


def test_stacked_edits_revert_one_level_at_a_time(run, base_dir, tmp_path):
    run_dir, edited_a, base_state = run
    package_edit(run_dir, str(tmp_path / "a"))
    model = apply_edit(AutoModelForMaskedLM.from_pretrained(base_dir), str(tmp_path / "a"))
    # Edit B is made on top of A.
    edited_b = _state(_make_run(str(tmp_path / "run_b"), model, seed=1))
    manifest_b = package_edit(str(tmp_path / "run_b"), str(tmp_path / "b"), base_model=model)
    assert len(manifest_b["chain"]) == 1

    fresh = AutoModelForMaskedLM.from_pretrained(base_dir)
    with pytest.raises(ValueError, match="order they were made"):
        apply_edit(fresh, str(tmp_path / "b"))
    apply_edit(fresh, str(tmp_path / "a"))
    apply_edit(fresh, str(tmp_path / "b"))
    assert _same(fresh, edited_b)
    with pytest.raises(ValueError, match="revert the later edits first"):
        revert_edit(fresh, str(tmp_path / "a"))
    revert_edit(fresh, str(tmp_path / "b"))
    assert _same(fresh, edited_a)
    revert_edit(fresh, str(tmp_path / "a"))
    assert _same(fresh, base_state)


def test_model_card_metadata_and_content(run, tmp_path):
    run_dir, _, _ = run
    package_edit(run_dir, str(tmp_path / "out"), repo_id="me/norway-edit", license="apache-2.0")
    text = (tmp_path / "out" / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["license"] == "apache-2.0" and "hf_memedit" in front["tags"]
    assert front["model-index"][0]["results"][0]["dataset"]["name"] == "geo_mod (m = 2)"
    values = {m["type"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
    assert values["a_m"] == 75.0 and values["retention"] == 90.0
    assert "| Norway | P36 | Oslo | Lima | yes |" in text
    assert 'apply_edit(model, "me/norway-edit")' in text
    # This run's config predates recorded key constraints: the card names the ball and claims nothing more.
    assert "- **Constraint:** ‖θ − θ0‖∞ ≤ δ = 0.01.\n" in text


def test_a_key_constrained_edit_names_its_whole_set_in_results_manifest_and_card(tmp_path, real_bert_dir):
    """An edit kept in the L∞ box ∩ the preserved keys' null space says so in results.json, in the manifest's
    `constraint` and on the card: a shared edit does not pass for a plain L∞ edit."""
    from hf_memedit.cli import parse
    from hf_memedit.experiments import run_edit

    job, args, _ = parse(
        "edit",
        [
            "--config",
            str(ROOT / "trainer_configs" / "bert_tiny_ftm.yaml"),
            "--output_dir",
            str(tmp_path / "run"),
            "--max_steps",
            "4",
            "--key_constraint",
            "nullspace",
            "--nullspace_energy",
            "0.9",
            "--preserve_corpus",
            "benchmark",
            "--preserve_keys_file",
            str(tmp_path / "keys.safetensors"),
            "--eval_before_edit",
            "false",
            "--disable_tqdm",
            "true",
        ],
    )
    run_edit(job, args)
    config = json.loads((tmp_path / "run" / "results.json").read_text())["config"]
    assert config["key_constraint"] == "nullspace" and config["nullspace_energy"] == 0.9
    manifest = package_edit(str(tmp_path / "run"), str(tmp_path / "out"))
    assert manifest["constraint"] == {
        "norm": "linf",
        "delta": 1e-2,
        "key_constraint": "nullspace",
        "nullspace_energy": 0.9,
        "preserve_corpus": "benchmark",
        "preserve_corpus_samples": 256,
        "blocks": [0],
    }
    assert read_manifest(str(tmp_path / "out"))["constraint"] == manifest["constraint"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert (
        "- **Constraint:** ‖θ − θ0‖∞ ≤ δ = 0.01 ∩ null space of the preserved keys (0.9 of their energy removed; "
        "keys from the benchmark's unmodified facts set aside for preservation)."
    ) in card


@pytest.mark.slow
def test_push_to_a_loopback_hub_download_and_apply(run, base_dir, tmp_path, bert_tokenizer, monkeypatch):
    run_dir, edited_state, _ = run
    edited = AutoModelForMaskedLM.from_pretrained(base_dir)
    edited.load_state_dict(edited_state)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with FakeHub() as hub:
        url = push_edit(run_dir, "me/edit", format="delta", token="hf_secret", endpoint=hub.endpoint, private=True)
        assert url == f"{hub.endpoint}/me/edit" and hub.private["model/me/edit"]
        assert {MANIFEST_NAME, "README.md", "memedit_edit.safetensors"} <= set(hub.repos["model/me/edit"])
        assert "Bearer hf_secret" in hub.tokens_seen

        model = AutoModelForMaskedLM.from_pretrained(base_dir)
        apply_edit(model, "me/edit", token="hf_secret", endpoint=hub.endpoint)
        assert evaluate_facts(model, bert_tokenizer, FACTS) == evaluate_facts(edited, bert_tokenizer, FACTS)
        assert _same(model, edited_state)
        # EditModel.from_pretrained takes the Hub id too, as PEFT's from_pretrained does.
        edit = EditModel.from_pretrained(
            AutoModelForMaskedLM.from_pretrained(base_dir), "me/edit", token="hf_secret", endpoint=hub.endpoint
        )
        assert _same(edit.merge_and_unload(), edited_state)

        # The CLI pushes the same way, and a benchmark export goes up as a dataset repo.
        main(
            [
                "push",
                run_dir,
                "--repo_id",
                "me/edit-full",
                "--format",
                "full",
                "--endpoint",
                hub.endpoint,
                "--token",
                "t",
            ]
        )
        assert "model.safetensors" in hub.repos["model/me/edit-full"]
        export = tmp_path / "export"
        export.mkdir()
        (export / "README.md").write_text("---\nconfigs: []\n---\n")
        push_folder(str(export), "me/bench", repo_type="dataset", endpoint=hub.endpoint, token="t")
        assert "README.md" in hub.repos["dataset/me/bench"]


def test_memedit_eval_refuses_a_hostile_package_in_one_line(tmp_path, real_bert_dir):
    """`memedit eval --edit_dir` applies an edit through EditModel.from_pretrained, so through the one check of
    hub.verify: a resealed package holding NaN stops the command with one line, and nothing is written."""
    from safetensors.torch import load_file, save_file

    from hf_memedit.files import file_sha256, tensor_sha256

    run_dir, package = tmp_path / "run", tmp_path / "pkg"
    _make_run(str(run_dir), AutoModelForMaskedLM.from_pretrained(real_bert_dir), seed=0)
    package_edit(str(run_dir), str(package))
    tensors = load_file(package / "memedit_edit.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, package / "memedit_edit.safetensors", metadata={"format": "pt"})
    manifest = json.loads((package / MANIFEST_NAME).read_text())  # resealed, as anyone can
    manifest["tensors"][name]["sha256"] = tensor_sha256(tensors[name])
    manifest["files"]["memedit_edit.safetensors"] = file_sha256(package / "memedit_edit.safetensors")
    manifest["id"] = manifest_id(manifest)
    (package / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(SystemExit, match=f"memedit eval: error: .*'{name}' holds NaN or infinite values"):
        main(
            [
                "eval",
                "--config",
                str(ROOT / "trainer_configs" / "bert_tiny_ftm.yaml"),
                "--output_dir",
                str(tmp_path / "out"),
                "--edit_dir",
                str(package),
                "--eval_name",
                "hostile",
                "--disable_tqdm",
                "true",
            ]
        )
    assert not (tmp_path / "out" / "eval" / "hostile" / "results.json").exists()
