"""A shared edit can be trusted (issue #43): attacks by the publisher of a hostile package, and mistakes of the
user who applies one. Each attack builds a real package, changes it and reseals it as anyone can (the file
hashes and the id are recomputed), then shows the refusal, one line, with the model bit-identical to before
the call and the folders untouched."""

import json
import os
import shutil
import tempfile

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForMaskedLM

from hf_memedit import BlockSelectorConfig, EditModel, get_edit_model
from hf_memedit.evaluation.results import ResultsRecord
from hf_memedit.files import file_sha256, tensor_sha256
from hf_memedit.hub import apply_edit, package_edit, revert_edit
from hf_memedit.hub.manifest import MANIFEST_NAME, ManifestError, manifest_id, read_manifest, safe_path
from hf_memedit.model import BASE_WEIGHTS_NAME, WEIGHTS_NAME
from hf_memedit.run_folder import LOCK_NAME, claim_run_folder, seal_run

from .helpers import make_run_folder, tiny_bert


EMBEDDINGS = "bert.embeddings.word_embeddings.weight"
LM_BIAS = "cls.predictions.bias"
LAYER_NORM = "bert.encoder.layer.1.output.LayerNorm.weight"
QUERY = "bert.encoder.layer.1.attention.self.query.weight"


@pytest.fixture
def base(tmp_path):
    """A tiny BERT (2 blocks, vocabulary 100) saved as safetensors: the base model."""
    folder = tmp_path / "base"
    tiny_bert(100, layers=2, seed=1).save_pretrained(folder)
    return str(folder)


def load(base, **kwargs):
    return AutoModelForMaskedLM.from_pretrained(base, **kwargs)


@pytest.fixture
def run(tmp_path, base):
    make_run_folder(str(tmp_path / "run"), load(base), seed=0)
    return str(tmp_path / "run")


@pytest.fixture
def package(run, tmp_path):
    package_edit(run, str(tmp_path / "pkg"))
    return str(tmp_path / "pkg")


# ---------------------------------------------------------- the publisher of a hostile package


def rewrite(folder, name, change):
    """Change the tensors of a package file in place."""
    path = os.path.join(folder, name)
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return tensors


def reseal(folder, change=None):
    """What anyone can do: change the manifest, then recompute every file's sha256 and the id."""
    path = os.path.join(folder, MANIFEST_NAME)
    manifest = json.load(open(path))
    if change:
        change(manifest)
    manifest["files"] = {
        os.path.relpath(os.path.join(root, name), folder): file_sha256(os.path.join(root, name))
        for root, _, names in os.walk(folder)
        for name in names
        if name != MANIFEST_NAME
    }
    manifest["id"] = manifest_id(manifest)
    open(path, "w").write(json.dumps(manifest, indent=2))
    return manifest


def declare(manifest, name, after, base):
    """Declare `name` in the manifest as an honest publisher would (its hashes and its true change)."""
    change = after.double() - base.double()
    manifest["tensors"][name] = {
        "shape": list(after.shape),
        "dtype": str(after.dtype).removeprefix("torch."),
        "sha256": tensor_sha256(after),
        "max_abs_delta": float(change.abs().max()),
        "l2_delta": float(change.norm()),
    }
    manifest["base_model"]["tensors"][name] = tensor_sha256(base)


# ---------------------------------------------------------- what must not change on a refusal


def model_state(model):
    return (
        {name: value.detach().clone() for name, value in model.state_dict().items()},
        list(getattr(model.config, "memedit_chain", None) or []),
        [param.requires_grad for param in model.parameters()],
    )


def same_model(model, state) -> bool:
    values, chain, grads = state
    now_values, now_chain, now_grads = model_state(model)
    return all(torch.equal(now_values[n], values[n]) for n in values) and now_chain == chain and now_grads == grads


def tree(*folders):
    return {
        os.path.join(root, name): open(os.path.join(root, name), "rb").read()
        if not os.path.islink(os.path.join(root, name))
        else os.readlink(os.path.join(root, name))
        for folder in folders
        for root, _, names in os.walk(folder)
        for name in names
    }


def refused(call, match, model, *folders, error=ManifestError) -> str:
    """`call()` raises `error` (one line matching `match`); the model and the folders are as they were."""
    state, files = model_state(model), tree(*folders)
    with pytest.raises(error, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    assert same_model(model, state), "the model changed although the call was refused"
    assert tree(*folders) == files, "a folder changed although the call was refused"
    return str(info.value)


# ---------------------------------------------------------- 1. revert writes only what is declared, all or nothing


@pytest.mark.parametrize(
    "extra", [(EMBEDDINGS, torch.zeros(1, 16)), ("bert.encoder.layer.1.attention.self.zzz", torch.zeros(1))]
)
def test_a_base_file_with_undeclared_tensors_is_refused_by_apply_and_revert(extra, package, base, run):
    """Probes p5.py 5b/5c, p5d.py: revert copied an extra zero tensor over the embeddings (broadcast), or raised a
    KeyError half way, leaving the model half reverted."""
    name, value = extra
    rewrite(package, BASE_WEIGHTS_NAME, lambda tensors: tensors.__setitem__(name, value))
    manifest = reseal(package)
    model = load(base)
    refused(
        lambda: apply_edit(model, package),
        f"{BASE_WEIGHTS_NAME} in .* holds '{name}', which its manifest does not declare",
        model,
        package,
    )
    # A model that carries this package (its edited values, its id on the chain): revert checks all of it first.
    edited = EditModel.from_pretrained(model, os.path.join(run, "edit")).merge_and_unload()
    edited.config.memedit_chain = [manifest["id"]]
    refused(lambda: revert_edit(edited, package), "which its manifest does not declare", edited, package)


def test_a_tensor_edited_without_a_declared_base_is_refused(package, base):
    """Probe p5.py 5a: a tensor in `tensors` but not in `base_model.tensors` was applied and stayed after revert."""
    after = rewrite(
        package, WEIGHTS_NAME, lambda tensors: tensors.__setitem__(LM_BIAS, load(base).state_dict()[LM_BIAS] + 3)
    )
    reseal(
        package,
        lambda m: (
            declare(m, LM_BIAS, after[LM_BIAS], load(base).state_dict()[LM_BIAS])
            or m["base_model"]["tensors"].pop(LM_BIAS)
        ),
    )
    model = load(base)
    refused(
        lambda: apply_edit(model, package), "`tensors` and `base_model.tensors` name different tensors", model, package
    )


@pytest.mark.parametrize("call", ["apply", "revert"])
def test_a_write_that_fails_puts_the_model_back(call, package, base):
    model = load(base)
    if call == "revert":
        apply_edit(model, package)
    state = model_state(model)
    params = dict(model.named_parameters())
    names = sorted(read_manifest(package)["tensors"])

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    params[names[5]].copy_ = broken  # the sixth write fails, after five succeeded
    with pytest.raises(RuntimeError, match="device lost"):
        (apply_edit if call == "apply" else revert_edit)(model, package)
    del params[names[5]].copy_
    assert same_model(model, state)


# ---------------------------------------------------------- 3. a package changes only what it declares


def test_an_undeclared_tensor_in_the_edit_file_is_refused(package, base):
    """Probe p1.py 1a."""
    rewrite(package, WEIGHTS_NAME, lambda tensors: tensors.__setitem__(EMBEDDINGS, torch.zeros(100, 16)))
    reseal(package)
    model = load(base)
    refused(
        lambda: apply_edit(model, package),
        f"holds '{EMBEDDINGS}', which its manifest does not declare",
        model,
        package,
    )


@pytest.mark.parametrize("target", [EMBEDDINGS, LM_BIAS])
def test_a_declared_tensor_outside_the_declared_blocks_is_refused(target, package, base):
    """Probe p1.py 1b: a manifest declaring block 1 and δ = 0.01 applied the embeddings and the LM bias set to 5."""
    original = load(base).state_dict()[target]
    after = rewrite(package, WEIGHTS_NAME, lambda tensors: tensors.__setitem__(target, original * 0 + 5))
    rewrite(package, BASE_WEIGHTS_NAME, lambda tensors: tensors.__setitem__(target, original.clone()))

    def lie(manifest):
        declare(manifest, target, after[target], original)
        manifest["tensors"][target].update(max_abs_delta=0.001, l2_delta=0.001)

    reseal(package, lie)
    model = load(base)
    refused(
        lambda: apply_edit(model, package), f"changes '{target}', outside the blocks 1 it declares", model, package
    )


def test_a_tensor_outside_the_declared_modules_is_refused(base, tmp_path):
    """An edit narrowed to block 1's MLP output projection (FT-L) declares it: block 1's query is out of scope."""
    make_run_folder(str(tmp_path / "run"), load(base), seed=0, modules=["mlp_out"])
    manifest = package_edit(str(tmp_path / "run"), str(tmp_path / "pkg"))
    assert manifest["constraint"]["modules"] == ["mlp_out"]
    original = load(base).state_dict()[QUERY]
    after = rewrite(str(tmp_path / "pkg"), WEIGHTS_NAME, lambda tensors: tensors.__setitem__(QUERY, original + 1e-3))
    rewrite(str(tmp_path / "pkg"), BASE_WEIGHTS_NAME, lambda tensors: tensors.__setitem__(QUERY, original.clone()))
    reseal(str(tmp_path / "pkg"), lambda m: declare(m, QUERY, after[QUERY], original))
    model = load(base)
    refused(
        lambda: apply_edit(model, str(tmp_path / "pkg")),
        rf"changes '{QUERY}', outside the blocks 1 \(modules mlp_out\)",
        model,
        str(tmp_path / "pkg"),
    )


def test_a_change_beyond_the_declared_bound_is_refused(package, base):
    """Declared honestly (its true max_abs_delta) but outside the L∞ box the manifest claims."""
    original = load(base).state_dict()[LAYER_NORM]
    after = rewrite(package, WEIGHTS_NAME, lambda tensors: tensors.__setitem__(LAYER_NORM, original + 0.5))
    reseal(package, lambda m: declare(m, LAYER_NORM, after[LAYER_NORM], original))
    model = load(base)
    refused(
        lambda: apply_edit(model, package),
        r"changes by up to 0\.5, beyond its declared bound ‖θ − θ0‖∞ ≤ δ = 0\.01",
        model,
        package,
    )


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_a_change_outside_a_declared_l2_ball_is_refused(scope, package, base):
    def claim_l2(manifest):
        manifest["constraint"].update(norm="l2", delta=1e-3, l2_scope=scope)

    reseal(package, claim_l2)
    model = load(base)
    refused(lambda: apply_edit(model, package), "beyond its declared bound δ = 0.001", model, package)


def test_a_false_max_abs_delta_is_refused(package, base):
    def understate(manifest):
        manifest["tensors"][LAYER_NORM]["max_abs_delta"] /= 10

    reseal(package, understate)
    model = load(base)
    refused(
        lambda: apply_edit(model, package),
        f"'{LAYER_NORM}' changes by up to .* but its manifest declares max_abs_delta",
        model,
        package,
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_refused(bad, package, base):
    """Probe p1.py 1d: NaN and Inf were applied."""

    def poison(tensors):
        tensors[LAYER_NORM] = tensors[LAYER_NORM].clone()
        tensors[LAYER_NORM][0] = bad

    after = rewrite(package, WEIGHTS_NAME, poison)
    reseal(package, lambda m: m["tensors"][LAYER_NORM].update(sha256=tensor_sha256(after[LAYER_NORM])))
    model = load(base)
    refused(lambda: apply_edit(model, package), f"'{LAYER_NORM}' holds NaN or infinite values", model, package)
    refused(lambda: EditModel.from_pretrained(model, package), "holds NaN or infinite values", model, package)


@pytest.mark.parametrize("kind", ["shape", "dtype"])
def test_shape_and_dtype_errors_are_refused_before_any_write(kind, package, base):
    """Verified sound by the review (p1.py 1c), kept so: the third tensor in order is wrong."""
    victim = sorted(load_file(os.path.join(package, WEIGHTS_NAME)))[2]

    def damage(tensors):
        tensors[victim] = tensors[victim][:-1].clone() if kind == "shape" else tensors[victim].half()

    after = rewrite(package, WEIGHTS_NAME, damage)
    reseal(
        package,
        lambda m: m["tensors"][victim].update(sha256=tensor_sha256(after[victim]), shape=list(after[victim].shape)),
    )
    model = load(base)
    refused(lambda: apply_edit(model, package), "the edit was made for another model", model, package)


# ---------------------------------------------------------- 4. EditModel.from_pretrained (memedit eval --edit_dir)


def test_from_pretrained_reads_the_manifest_and_round_trips(package, base):
    """Probe p1e.py: from_pretrained loaded a package whose config was widened to [1, "embeddings"] and
    that held NaN."""
    base_state = model_state(load(base))
    model = load(base)
    edit = EditModel.from_pretrained(model, package)
    manifest = read_manifest(package)
    assert model.config.memedit_chain == [manifest["id"]]
    assert all(
        torch.equal(model.state_dict()[n], v) for n, v in load_file(os.path.join(package, WEIGHTS_NAME)).items()
    )
    edit.unload()
    assert same_model(model, base_state)  # the exact base again, and off the chain

    config = os.path.join(package, "memedit_config.json")
    widened = {**json.load(open(config)), "blocks": [1, "embeddings"]}
    open(config, "w").write(json.dumps(widened))
    refused(
        lambda: EditModel.from_pretrained(model, package),
        "memedit_config.json in .* does not match the manifest's sha256",
        model,
        package,
    )
    reseal(package)
    refused(
        lambda: EditModel.from_pretrained(model, package),
        r"memedit_config.json in .* selects .* but its manifest declares",
        model,
        package,
    )


def test_from_pretrained_refuses_a_run_edit_that_diverged(base, tmp_path):
    edit = get_edit_model(load(base), BlockSelectorConfig(blocks=["1"]))
    with torch.no_grad():
        edit.trainable_parameters()[LAYER_NORM][0] = float("nan")
    edit.save_pretrained(tmp_path / "edit")
    model = load(base)
    refused(
        lambda: EditModel.from_pretrained(model, tmp_path / "edit"),
        "holds NaN or infinite values",
        model,
        str(tmp_path / "edit"),
    )


def test_from_pretrained_takes_only_delta_packages(run, base, tmp_path):
    package_edit(run, str(tmp_path / "full"), format="full", base_model=load(base))
    model = load(base)
    refused(
        lambda: EditModel.from_pretrained(model, str(tmp_path / "full")), "is a 'full' package, .*apply_edit", model
    )


# ---------------------------------------------------------- 5. locks never follow a link


def test_a_symlinked_or_special_lock_file_is_refused_and_its_target_kept(tmp_path):
    """Probe p3.py: a `.memedit.lock` linking to a user's file was truncated although the run was refused."""
    victim = tmp_path / "victim.txt"
    victim.write_text("IMPORTANT USER DATA\n")
    folder = tmp_path / "run"
    folder.mkdir()
    os.symlink(victim, folder / LOCK_NAME)
    with pytest.raises(ValueError, match="is a symbolic link: remove it"):
        with claim_run_folder(str(folder), overwrite=False, resuming=False):
            pass
    assert victim.read_text() == "IMPORTANT USER DATA\n"
    os.unlink(folder / LOCK_NAME)
    os.mkfifo(folder / LOCK_NAME)  # opening a FIFO would block: refused at once instead
    with pytest.raises(ValueError, match="is not a regular file"):
        with claim_run_folder(str(folder), overwrite=False, resuming=False):
            pass


# ---------------------------------------------------------- 6. no folder is lost


def test_overwrite_refuses_a_git_clone_and_a_project_holding_a_manifest(package, run, tmp_path):
    """Probe p6b.py 6f/6g: overwrite=True deleted a git clone's .git and NOTES.md, and a project's src/."""
    os.makedirs(os.path.join(package, ".git"))
    open(os.path.join(package, ".git", "HEAD"), "w").write("ref: refs/heads/main\n")
    open(os.path.join(package, "NOTES.md"), "w").write("my notes")
    files = tree(package)
    with pytest.raises(ValueError, match=r"holds an earlier package and other things \(.git, NOTES.md\): refused"):
        package_edit(run, package, overwrite=True)
    assert tree(package) == files

    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("code")
    (project / MANIFEST_NAME).write_text("not even json")
    files = tree(str(project))
    with pytest.raises(ValueError, match="is not an intact earlier package, so nothing in it is replaced"):
        package_edit(run, str(project), overwrite=True)
    assert tree(str(project)) == files

    shutil.rmtree(os.path.join(package, ".git"))
    os.unlink(os.path.join(package, "NOTES.md"))
    package_edit(run, package, overwrite=True)  # a package alone is still replaced
    assert read_manifest(package)["format"] == "delta"


def test_package_reads_the_run_under_its_lock_and_through_its_seal(run, base, tmp_path, monkeypatch):
    """Probe p6b.py 6e: a package made while another run wrote the run folder held run B's tensors with run A's
    facts, and applied cleanly."""
    with claim_run_folder(run, overwrite=False, resuming=True):  # a run writes the folder
        with pytest.raises(ValueError, match="is being written by a run: wait for it to finish"):
            package_edit(run, str(tmp_path / "pkg"))
    assert not os.path.exists(tmp_path / "pkg")

    # A writer that ignores the lock swaps edit/ for another run's between the seal being read and the files.
    make_run_folder(str(tmp_path / "other"), load(base), seed=1)
    import hf_memedit.run_folder as run_folder

    read_json = run_folder.read_json

    def seal_then_swap(*args, **kwargs):
        sealed = read_json(*args, **kwargs)
        shutil.rmtree(os.path.join(run, "edit"))
        shutil.copytree(str(tmp_path / "other" / "edit"), os.path.join(run, "edit"))
        return sealed

    monkeypatch.setattr(run_folder, "read_json", seal_then_swap)
    with pytest.raises(ValueError, match="is not one consistent run: edit/memedit_edit.safetensors changed"):
        package_edit(run, str(tmp_path / "pkg"))
    assert not os.path.exists(tmp_path / "pkg")


def test_an_interrupted_overwrite_is_recovered(package, run, tmp_path):
    """A crash between the two renames of an overwrite left the old package in `.replaced-*`, the new one in
    `.staging-*`, and no target: the next call puts the old one back (and removes the rest) before it decides."""
    files = tree(package)
    aside = tempfile.mkdtemp(prefix=".replaced-pkg-", dir=tmp_path)
    os.replace(package, os.path.join(aside, "folder"))
    staging = tempfile.mkdtemp(prefix=".staging-pkg-", dir=tmp_path)
    open(os.path.join(staging, "half-written"), "w").write("x")
    with pytest.raises(ValueError, match="holds an earlier package: pass overwrite=True"):
        package_edit(run, package)
    assert tree(package) == files and not os.path.exists(aside) and not os.path.exists(staging)
    package_edit(run, package, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["base", "pkg", "run"]


# ---------------------------------------------------------- 7. the base is identified by its config too


def test_the_same_weights_under_another_config_are_refused(package, base):
    """Probe p2b.py: the same weights with hidden_act=relu and layer_norm_eps=0.5 were accepted."""
    model = load(base, hidden_act="relu", layer_norm_eps=0.5)
    refused(
        lambda: apply_edit(model, package),
        r"made for a different base model: its base has hidden_act='gelu', this "
        r"model hidden_act='relu' \(2 config field\(s\) differ\)",
        model,
        package,
    )
    other = tiny_bert(100, layers=2, seed=7)  # same config, other weights
    refused(lambda: apply_edit(other, package), "was made for a different base model", other, package)


# ---------------------------------------------------------- also seen


def test_packaging_a_run_that_diverged_is_refused(run, tmp_path):
    """Probe p1f.py: a run whose edit held NaN/Inf was packaged with no warning, a manifest that was not strict
    JSON and a card saying max |Δ| = nan."""
    edit_file = os.path.join(run, "edit", WEIGHTS_NAME)
    tensors = load_file(edit_file)
    tensors[LAYER_NORM][0] = float("nan")
    save_file(tensors, edit_file, metadata={"format": "pt"})
    seal_run(run)
    with pytest.raises(ValueError, match=f"holds NaN or infinite values in '{LAYER_NORM}': the training diverged"):
        package_edit(run, str(tmp_path / "pkg"))
    assert not os.path.exists(tmp_path / "pkg")


def test_a_manifest_is_strict_json(package, base):
    path = os.path.join(package, MANIFEST_NAME)
    assert "NaN" not in open(path).read()
    manifest = json.load(open(path))
    manifest["metrics"]["a_m"] = float("nan")
    manifest["id"] = "0" * 64
    open(path, "w").write(json.dumps(manifest))  # Python writes NaN unless told not to
    model = load(base)
    refused(lambda: apply_edit(model, package), "holds NaN, which is not JSON", model, package)


MALFORMED = {
    "no tensors": (lambda m: m.pop("tensors"), "lacks `tensors`"),
    "tensors not an object": (lambda m: m.update(tensors=[1, 2]), r"`tensors` is \[1, 2\], not dict"),
    "entry without sha256": (lambda m: m["tensors"][LAYER_NORM].pop("sha256"), f"lacks `tensors.{LAYER_NORM}.sha256`"),
    "no base config": (lambda m: m["base_model"].pop("config"), "lacks `base_model.config`"),
    "wrong config hash": (
        lambda m: m["base_model"].update(config_sha256="0" * 64),
        "is not the hash of `base_model.config`",
    ),
    "chain of numbers": (lambda m: m.update(chain=[1]), "`chain` is not a list of manifest ids"),
    "unknown format": (lambda m: m.update(format="onnx"), "has format 'onnx', which hf_memedit does not write"),
    "unknown norm": (lambda m: m["constraint"].update(norm="l3"), "declares the norm 'l3'"),
    "modules not paths": (
        lambda m: m["constraint"].update(modules=[3]),
        "`constraint.modules` is not a list of module paths",
    ),
    "blocks not a selection": (
        lambda m: m["constraint"].update(blocks=["head"]),
        r"blocks \['head'\] are not a block selection",
    ),
    "version as text": (lambda m: m.update(version="1"), "has version '1', which no hf_memedit wrote"),
    "version 1": (lambda m: m.update(version=1), "version 1 manifest .* re-package the edit from its run folder"),
    "a newer version": (
        lambda m: m.update(version=99),
        "newer than the version 2 this hf_memedit reads: upgrade hf_memedit",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_manifest_is_one_line(case, package, base):
    """Resealed but malformed manifests raised KeyError / AttributeError; an unknown format was called "a PEFT
    adapter"; version "1" advised an upgrade."""
    change, match = MALFORMED[case]
    reseal(package, change)
    model = load(base)
    message = refused(lambda: apply_edit(model, package), match, model, package)
    assert ("upgrade" in message) == (case == "a newer version") and "PEFT" not in message


def test_a_file_that_is_not_safetensors_is_one_line(package, base):
    open(os.path.join(package, WEIGHTS_NAME), "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    reseal(package)
    model = load(base)
    refused(
        lambda: apply_edit(model, package), f"{WEIGHTS_NAME} in .* is not a readable safetensors file", model, package
    )


def test_a_shared_package_holds_no_local_paths(run, base, tmp_path):
    """The base's repo_id and the run's model_name_or_path were local absolute paths in the pushed manifest
    and card."""
    for format in ("delta", "full"):
        manifest = package_edit(run, str(tmp_path / format), format=format, base_model=load(base))
        assert manifest["base_model"]["repo_id"] is None and manifest["base_model"]["revision"] is None
        assert manifest["config"]["model_name_or_path"] == "<local>"
        for path, data in tree(str(tmp_path / format)).items():
            assert str(tmp_path).encode() not in data, path
    card = open(tmp_path / "delta" / "README.md").read()
    assert f"a local bert model (config sha256 {manifest['base_model']['config_sha256'][:12]})" in card

    record = ResultsRecord.load(run)  # a base named by its Hub id keeps it, with its revision
    record.config.update(model_name_or_path="me/tiny-bert", revision="abc123", target_suffix=".")
    record.save(run)
    seal_run(run)
    manifest = package_edit(run, str(tmp_path / "hub"))
    assert manifest["base_model"]["repo_id"] == "me/tiny-bert" and manifest["base_model"]["revision"] == "abc123"
    assert manifest["config"]["target_suffix"] == "."  # text the edit trained on, not a local path
    assert "https://huggingface.co/me/tiny-bert" in open(tmp_path / "hub" / "README.md").read()


def test_a_file_reached_through_a_symlinked_folder_is_refused(package, base):
    """Probe p3.py: a `files` entry through a symlink to /etc was read and hashed."""
    outside = os.path.dirname(package)
    os.symlink(outside, os.path.join(package, "sys"))
    open(os.path.join(outside, "secret"), "w").write("x")

    def point_outside(manifest):
        manifest["files"] = {**manifest["files"], "sys/secret": file_sha256(os.path.join(outside, "secret"))}
        manifest["id"] = manifest_id(manifest)

    path = os.path.join(package, MANIFEST_NAME)
    manifest = json.load(open(path))
    point_outside(manifest)
    open(path, "w").write(json.dumps(manifest))
    model = load(base)
    refused(
        lambda: apply_edit(model, package),
        "'sys/secret', whose folder in .* is a link to .*, outside the package",
        model,
    )
    with pytest.raises(ManifestError, match="outside the package"):
        safe_path(package, "sys/secret")


def test_an_edit_of_offloaded_weights_is_refused_in_one_line(tmp_path):
    """A model whose device_map offloads the edited block holds no values there to check or write (meta)."""
    from transformers import AutoModelForCausalLM

    from .helpers import TINY

    TINY["llama"](2, vocab=100).save_pretrained(tmp_path / "base")
    edit = get_edit_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), BlockSelectorConfig(blocks=["1"]))
    with torch.no_grad():
        for param in edit.trainable_parameters().values():
            param.add_(1e-3)
    edit.save_pretrained(tmp_path / "edit")
    placement = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    placed = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", device_map=placement, offload_folder=str(tmp_path / "off")
    )
    with pytest.raises(ValueError, match="which the device_map offloads .* give the edited blocks a device"):
        EditModel.from_pretrained(placed, tmp_path / "edit")
