"""A facts file edited through the one pipeline: `memedit edit --facts` and `edit_facts` give the same edit; the
report's fields; keep prompts with θ0's answers; bad input and --dry_run touch nothing."""

import json
import os
import re

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from hf_memedit import FactsFileError, edit_facts, read_facts
from hf_memedit.benchmarks.common import MODIFIED_TEST, MODIFIED_TRAIN, UNMODIFIED_TEST, UNMODIFIED_TRAIN
from hf_memedit.cli import main, parse
from hf_memedit.evaluation.results import ResultsRecord
from hf_memedit.evaluation.scoring import STOP_RULE
from hf_memedit.experiments import FACTS_RECIPE, FactsFile
from hf_memedit.experiments.facts_source import QUESTIONS, with_fallback_keep
from hf_memedit.facts import FALLBACK_KEEP, MODIFIED_PARAPHRASE

from .helpers import ROOT, save_tiny_llama, tiny_bert


CHAT = "{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
FACTS = [
    {
        "prompt": "The capital of {} is",
        "subject": "France",
        "target": "Lima",
        "true": "Paris",
        "paraphrases": ["France has its capital in", "[Y] is the capital of France."],
        "question": "What is the capital of France?",
    },
    {
        "prompt": "The capital of {} is",
        "subject": "Norway",
        "target": "Athens",
        "true": "Oslo",
        "keep": ["The capital of Greece is", "The capital of Canada is", "The river of Paris is the"],
    },
    {"prompt": "The river of {} is the", "subject": "Paris", "target": "Ottawa", "true": "Seine"},
    {"prompt": "The capital of {} is", "subject": "Peru", "target": "Baku", "true": "Lima"},
]
# Small and fast: the recipe's objective, keys and scores, on a tiny model's block 1 with few steps and samples.
FAST = {
    "edit_blocks": ["1"],
    "max_steps": 8,
    "per_device_train_batch_size": 4,
    "preserve_corpus_samples": 16,
    "preserve_corpus_length": 16,
    "per_device_eval_batch_size": 16,
    "disable_tqdm": True,
}


def as_argv(options: dict) -> list[str]:
    argv = []
    for name, value in options.items():
        argv += [
            f"--{name}",
            *(
                map(str, value)
                if isinstance(value, list)
                else [str(value).lower() if isinstance(value, bool) else str(value)]
            ),
        ]
    return argv


pytestmark = pytest.mark.usefixtures("isolated_hf_home")


@pytest.fixture
def model_dir(tmp_path, bpe_tokenizer):
    """A random Llama with the tests' BPE tokenizer and a chat template."""
    return save_tiny_llama(tmp_path / "base", bpe_tokenizer, CHAT)


@pytest.fixture
def facts_file(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in FACTS), encoding="utf-8")
    return str(path)


def test_keep_prompts_are_made_where_a_record_gives_none():
    records, made = with_fallback_keep(read_facts(FACTS))
    by_subject = {r.subject: [k.prompt for k in r.keep] for r in records}
    # France's prompt with the other subjects, never one the edit changes (Norway's and Peru's are edited facts)
    assert by_subject["France"] == ["The capital of Paris is [Y]"]
    assert by_subject["Norway"] == [f"{p} [Y]" for p in FACTS[1]["keep"]]  # the record's own, untouched
    assert by_subject["Paris"] == [f"The river of {s} is the [Y]" for s in ("France", "Norway", "Peru")]
    assert made == 1 + 0 + 3 + 1 and all(len(keep) <= FALLBACK_KEEP for keep in by_subject.values())


def test_fallback_keep_sets_how_many_keep_prompts_are_made_and_0_makes_none():
    by_limit = {limit: with_fallback_keep(read_facts(FACTS), limit) for limit in (0, 1)}
    assert by_limit[0][1] == 0 and [len(r.keep) for r in by_limit[0][0]] == [0, 3, 0, 0]  # the file's own only
    assert by_limit[1][1] == 3 and [len(r.keep) for r in by_limit[1][0]] == [1, 3, 1, 1]
    with pytest.raises(ValueError, match="^fallback_keep is an option of a facts file"):
        parse("edit", ["--fallback_keep", "0"])
    with pytest.raises(ValueError, match="^fallback_keep must be 0 \\(none\\) or more, got -1"):
        parse("edit", ["--facts", "facts.jsonl", "--fallback_keep", "-1"])


def test_an_edit_without_fallback_keep_prompts_keeps_and_scores_only_the_files_own(model_dir):
    """The measurement's switch: with fallback_keep 0 the records' own keep prompts are the only unmodified facts
    (Norway's two the edit does not change), and the record says so."""
    reports = {}
    for limit in (None, 0):
        model, tokenizer = LlamaForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
        options = {**FAST, "max_steps": 2, "generation_eval": False, "drift_eval": False}
        _, reports[limit] = edit_facts(model, tokenizer, FACTS, fallback_keep=limit, **options)
    made, none = reports[None], reports[0]
    assert made.benchmark["fallback_keep"] == made.config["fallback_keep"] == 10
    assert none.benchmark["fallback_keep"] == none.config["fallback_keep"] == 0
    assert made.benchmark["fallback_keep_prompts"] == 5 and none.benchmark["fallback_keep_prompts"] == 0
    # every keep prompt either trains the preservation term or is scored: 2 in all without the made ones
    kept = {limit: r.locality["n_preservation_facts"] + r.locality["n_locality_facts"] for limit, r in reports.items()}
    assert kept[0] == 2 < kept[None]
    model, tokenizer = LlamaForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    bare = [f for f in FACTS if "keep" not in f]
    with pytest.raises(FactsFileError, match="give 0, fallback_keep 0 made 0, .*or let fallback_keep make some"):
        edit_facts(model, tokenizer, bare, fallback_keep=0, **FAST)
    # what the file gave was left out (here: a phrasing the edit changes), and none could be made
    only = [{**FACTS[2], "keep": ["The river of Paris is the"]}]
    with pytest.raises(FactsFileError, match="the records give 1, fallback_keep 10 made 0, 1 left out: phrasings"):
        edit_facts(model, tokenizer, only, **FAST)


def test_the_facts_source_labels_keep_prompts_with_theta0s_greedy_answers(model_dir):
    from hf_memedit.evaluation.scoring import generate_answers

    model, tokenizer = LlamaForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    splits = FactsFile(FACTS).splits(model, tokenizer)
    assert (
        splits[MODIFIED_TRAIN]["text"]
        == splits[MODIFIED_TEST]["text"]
        == [
            "The capital of France is [Y]",
            "The capital of Norway is [Y]",
            "The river of Paris is the [Y]",
            "The capital of Peru is [Y]",
        ]
    )
    # the object-first paraphrase cannot be scored by a causal LM whose tokenizer adds no BOS: dropped, logged
    assert splits[MODIFIED_PARAPHRASE]["text"] == ["France has its capital in [Y]"]
    keep = splits[UNMODIFIED_TEST]
    assert list(keep) == list(splits[UNMODIFIED_TRAIN]) and len(keep) > 0
    assert "The river of Paris is the [Y]" not in keep["text"]  # Norway's keep prompt is a fact the edit changes
    assert keep["subject"] == keep["text"]  # each keep prompt is set on one side of the locality split by itself
    answers = generate_answers(model, tokenizer, [{**row, "object": ""} for row in keep], extra_tokens=8)
    assert keep["object"] == answers and all(keep["object"])
    assert splits[QUESTIONS]["text"] == ["Q: What is the capital of France?\nA:[Y]"] and splits[QUESTIONS][
        "object"
    ] == ["Lima"]
    # train_on_paraphrases: the paraphrases train, and nothing is held out
    trained = FactsFile(FACTS, train_on_paraphrases=True).splits(model, tokenizer)
    assert len(trained[MODIFIED_TRAIN]) == 5 and len(trained[MODIFIED_PARAPHRASE]) == 0


def test_a_record_without_true_is_scored_against_theta0s_own_answer(model_dir, bert_tokenizer):
    """`true` is optional: the old object, scored before the edit, is then θ0's greedy answer to the prompt (an empty
    one crashed the before-edit evaluation); a masked LM cannot answer for itself, so it is refused in one line."""
    from hf_memedit.evaluation.scoring import generate_answers

    model, tokenizer = LlamaForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    records = [{k: v for k, v in fact.items() if k != "true"} for fact in FACTS]
    splits = FactsFile(records).splits(model, tokenizer)
    answers = generate_answers(
        model, tokenizer, [{**row, "object": ""} for row in splits[MODIFIED_TEST]], extra_tokens=8
    )
    assert splits[MODIFIED_TEST]["original_object"] == answers and all(answers)
    assert splits[MODIFIED_TRAIN]["original_object"] == answers  # every row of a fact carries it
    assert splits[MODIFIED_PARAPHRASE]["original_object"] == answers[:1]  # France's paraphrase
    bert = tiny_bert(len(bert_tokenizer))
    with pytest.raises(FactsFileError, match=r"gives no `true` object, and a masked LM cannot answer .* add `true`"):
        FactsFile(records).splits(bert, bert_tokenizer)


@pytest.mark.slow
def test_the_cli_and_edit_facts_give_the_same_edit_and_the_report(tmp_path, model_dir, facts_file, capsys):
    main(
        [
            "edit",
            "--facts",
            facts_file,
            "--model_name_or_path",
            model_dir,
            "--output_dir",
            str(tmp_path / "cli"),
            *as_argv(FAST),
        ]
    )
    screen = capsys.readouterr().out
    cli = ResultsRecord.load(tmp_path / "cli")
    model, tokenizer = LlamaForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    edit, report = edit_facts(model, tokenizer, facts_file, output_dir=str(tmp_path / "py"), **FAST)
    # The same edit: the same weights saved, the same figures.
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "cli" / "edit" / "memedit_edit.safetensors")
    for name, tensor in load_file(tmp_path / "py" / "edit" / "memedit_edit.safetensors").items():
        torch.testing.assert_close(tensor, saved[name], rtol=1e-5, atol=1e-6, msg=name)
    assert edit.trainable_parameters()
    numbers = {k for k, v in cli.metrics.items() if isinstance(v, float)}
    for key in numbers:
        assert report.metrics[key] == pytest.approx(cli.metrics[key], abs=1e-6), key
    # The recipe applied to both (the CLI without --config uses it too).
    for key in ("preserve_objective", "key_constraint", "norm", "delta"):
        assert report.config[key] == cli.config[key] == FACTS_RECIPE[key], key
    # The report's fields: efficacy (teacher-forced, generation), generalisation, neighbourhood kept, drift, questions.
    metrics = cli.metrics
    for key in (
        "a_m",
        "gen_a_m",
        "gen_a_m_comma",
        "paraphrase_a_m",
        "gen_paraphrase_a_m",
        "agreement",
        "a_fs_before",
        "gen_a_fs_before",
        "drift_kl",
        "perplexity_ratio",
        "question_a_m",
        "gen_question_a_m",
    ):
        assert key in metrics and metrics[key] is not None, key
    # Neighbourhood kept: of the keep prompts θ0 itself answers so (a random model: maybe none), the share kept.
    assert {"retention", "n_known", "gen_retention", "gen_n_known"} <= set(metrics) and metrics["n_unmodified"] > 0
    assert metrics["n_modified"] == 4 and metrics["n_paraphrases"] == 1 and metrics["n_questions"] == 1
    assert cli.benchmark["name"] == "facts" and cli.benchmark["m"] == 4 and cli.config["benchmark"] == "facts"
    assert cli.scoring["by greedy generation"] == STOP_RULE and "generalisation" in cli.scoring
    assert [f["new"] for f in cli.facts] == ["Lima", "Athens", "Ottawa", "Baku"]
    assert all(isinstance(f["generated_before"], str) and isinstance(f["generated"], str) for f in cli.facts)
    assert "question_answer" in cli.facts[0] and "question_answer" not in cli.facts[1]
    markdown = (tmp_path / "cli" / "results.md").read_text()
    for text in (
        "generalisation: paraphrases the edit never saw",
        "How it was scored",
        STOP_RULE,
        "| generated before the edit |",
        "question: before → after",
        "perplexity ratio",
    ):
        assert text in markdown, text
    assert "how it was scored:" in screen and "asked as a question" in screen and STOP_RULE in screen


def test_the_demo_config_with_facts_keeps_its_recipe_and_drops_its_benchmark(facts_file):
    job, args, _ = parse(
        "edit", ["--config", str(ROOT / "trainer_configs" / "demo_smollm2.yaml"), "--facts", facts_file]
    )
    assert job.facts == facts_file and args.preserve_objective == "kl" and args.edit_blocks == ["25"]
    # The recipe is the demo's, but for the block (counted from the top) and where the run goes.
    demo_job, demo_args, _ = parse("edit", ["--config", str(ROOT / "trainer_configs" / "demo_smollm2.yaml")])
    from hf_memedit import EditConfig

    recipe = EditConfig(output_dir=demo_args.output_dir, **FACTS_RECIPE)
    for key in set(FACTS_RECIPE) - {"edit_blocks"}:
        assert getattr(recipe, key) == getattr(demo_args, key), key


def test_only_memedit_edit_takes_facts(facts_file):
    for command in ("sweep", "compare", "eval"):
        with pytest.raises(
            ValueError,
            match=f"^facts are edited by `memedit edit` or `memedit stream`; `memedit {command}` runs on a benchmark",
        ):
            parse(command, ["--facts", facts_file])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--benchmark", "trex_mod"], "^--benchmark choose a benchmark's facts, and facts replace the benchmark"),
        (["--m=4", "--modify_known", "true"], "^--m, --modify_known choose a benchmark's facts"),
        (["--setting", "ft+ftm"], "^setting 'ft\\+ftm' needs a benchmark"),
    ],
)
def test_benchmark_options_beside_facts_are_refused(facts_file, extra, message):
    with pytest.raises(ValueError, match=message):
        parse("edit", ["--facts", facts_file, *extra])


BAD = {
    "empty": ("", "holds no facts"),
    "subject not in prompt": (
        '{"prompt": "The capital of Italy is", "subject": "France", "target": "Lima"}\n',
        "line 1: the subject 'France' is not in its prompt",
    ),
    "empty target": (
        '{"prompt": "The capital of {} is", "subject": "France", "target": " "}\n',
        "line 1: target is empty",
    ),
    "target is the true object": (
        '{"prompt": "The capital of {} is", "subject": "France", "target": "Paris", "true": "paris"}\n',
        "line 1: the target 'Paris' is the true object already",
    ),
    "two targets": (
        '{"prompt": "The capital of {} is", "subject": "France", "target": "Lima"}\n'
        '{"prompt": "The capital of {} is", "subject": "France", "target": "Baku"}\n',
        "line 2: the same prompt and subject as .*line 1",
    ),
    "too long": (
        json.dumps({"prompt": "The capital of {} is" + " is" * 80, "subject": "France", "target": "Lima"}) + "\n",
        "line 1: its prompt is \\d+ tokens, more than the model's context of 64",
    ),
    "unknown format": (
        '{"question": "What is the capital of France?", "answer": "Lima"}\n',
        "line 1: fits no facts format",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_in_one_line_and_touches_no_run_folder(tmp_path, model_dir, case):
    content, message = BAD[case]
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text("{}", encoding="utf-8")  # an earlier run's, which overwrite would remove
    before = sorted(os.listdir(run))
    for extra in (["--dry_run"], ["--overwrite_output_dir", "true"]):
        with pytest.raises(SystemExit) as exited:
            main(["edit", "--facts", str(path), "--model_name_or_path", model_dir, "--output_dir", str(run), *extra])
        error = str(exited.value.code)
        assert len(error.splitlines()) == 1 and error.startswith("memedit edit: error: "), error
        assert re.search(message, error), error
        assert sorted(os.listdir(run)) == before and (run / "results.json").read_text() == "{}"


def test_dry_run_prints_what_would_be_edited_and_writes_nothing(tmp_path, model_dir, facts_file, capsys):
    run = tmp_path / "run"
    main(["edit", "--facts", facts_file, "--model_name_or_path", model_dir, "--output_dir", str(run), "--dry_run"])
    out = capsys.readouterr().out
    assert (
        "4 facts to edit, 2 paraphrases" in out
        and "| 1 | France | The capital of France is [Y] | Paris → Lima |" in out
    )
    assert "5 of the keep prompts are made" in out and "Nothing was trained or written" in out
    assert not run.exists()
    main(["edit", "--facts", facts_file, "--model_name_or_path", model_dir, "--dry_run", "--fallback_keep", "0"])
    assert "keep prompts are made" not in capsys.readouterr().out and "Nothing was trained" in out
    bare = tmp_path / "bare.jsonl"  # no record gives a keep prompt and none may be made: known before any weight
    bare.write_text("".join(json.dumps(f) + "\n" for f in FACTS if "keep" not in f), encoding="utf-8")
    with pytest.raises(SystemExit, match="bare.jsonl: no keep prompt is left .*or let fallback_keep make some"):
        main(["edit", "--facts", str(bare), "--model_name_or_path", model_dir, "--dry_run", "--fallback_keep", "0"])
    with pytest.raises(ValueError, match="^--dry_run checks a facts file: give --facts FILE"):
        from hf_memedit.cli.edit import dry_run

        dry_run(parse("edit", ["--model_name_or_path", model_dir])[0])


def test_edit_facts_refuses_unknown_options(model_dir):
    model, tokenizer = LlamaForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    with pytest.raises(ValueError, match="^edit_facts got unknown options m, stepz"):
        edit_facts(model, tokenizer, FACTS, m=4, stepz=3)
    with pytest.raises(FactsFileError, match="holds no facts"):
        edit_facts(model, tokenizer, [], output_dir="never-written")
    assert not os.path.exists("never-written")


def test_the_fallback_keep_bench_scores_both_edits_on_the_same_withheld_neighbours(tmp_path, model_dir, capsys):
    """bench/fallback_keep.py: every second record's neighbours are withheld from both edits and scored after each."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fallback_keep", ROOT / "bench" / "fallback_keep.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    records = [
        {
            "requested_rewrite": {"prompt": prompt, "subject": s, "target_new": {"str": new}},
            "neighborhood_prompts": [prompt.format(n) for n in neighbours],
        }
        for prompt, s, new, neighbours in (
            ("The capital of {} is", "France", "Lima", ["Spain", "Chile", "Canada"]),
            ("The capital of {} is", "Norway", "Athens", ["Greece", "Canada", "Norway"]),  # naming the subject: out
            ("The river of {} is the", "Paris", "Ottawa", ["London"]),
        )
    ]
    edited, withheld = bench.withhold(records, 2)
    assert [len(r["neighborhood_prompts"]) for r in edited] == [3, 0, 1]
    assert [row["text"] for row in withheld] == ["The capital of Greece is [Y]", "The capital of Canada is [Y]"]
    scored, overlap = bench.unseen(edited, withheld)  # Canada's is France's keep prompt too: the edit sees it
    assert [row["text"] for row in scored] == ["The capital of Greece is [Y]"] and overlap == 1
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    bench.main(
        ["--facts", str(path), "--model_name_or_path", model_dir, "--output_dir", str(tmp_path / "runs")]
        + ["--options", json.dumps({**FAST, "max_steps": 2})]
    )
    out = capsys.readouterr().out
    table = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "fallback" not in line]
    # the default makes Norway's keep prompt from the other subjects ("The capital of Paris is"; France's is an
    # edit); 0 makes none
    assert [(cells[0].strip(), cells[1].strip()) for cells in table] == [(str(FALLBACK_KEEP), "1"), ("0", "0")]
    assert all(cells[6].strip().endswith("of 1)") for cells in table), out  # both scored on the 1 unseen prompt
    for limit in (FALLBACK_KEEP, 0):
        assert ResultsRecord.load(tmp_path / "runs" / f"fallback_keep_{limit}").benchmark["fallback_keep"] == limit
