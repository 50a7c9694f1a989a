"""Test helpers: tiny random models built from configs, facts with multi-token objects."""

from __future__ import annotations

import copy
import functools
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# Facts with objects of 1 to 3 word pieces under the bert-base-uncased vocabulary.
FACTS = [
    {"text": "The capital of France is [Y].", "object": "Paris"},
    {"text": "[Y] is the capital of Canada.", "object": "Ottawa"},
    {"text": "The largest city of Ontario is [Y].", "object": "Kitchener-Waterloo"},
    {"text": "The capital of Azerbaijan is [Y].", "object": "Baku"},
    {"text": "The river of Paris is the [Y].", "object": "Seine"},
    {"text": "The capital of Peru is [Y].", "object": "Lima"},
    {"text": "The capital of Norway is [Y].", "object": "Oslo"},
    {"text": "The capital of Greece is [Y].", "object": "Athens"},
]


V = 30522  # the bert-base-uncased vocabulary of the real tokenizer used to collate facts
SMALL = dict(hidden_size=16, num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)


NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _decoder(config_class, n: int, vocab: int, **kw):
    """A config of a decoder that takes Llama's argument names: 2 heads sharing 1 key/value head."""
    return config_class(vocab_size=vocab, num_hidden_layers=n, num_key_value_heads=1, **SMALL, **kw)


def _tiny_models():
    """model_type -> (n, vocab) -> a tiny random LM without dropout (the fast paths run frozen blocks without
    it, so the straightforward loop they are compared with must too)."""
    import transformers as tf

    return {
        # Masked LMs
        "bert": lambda n, v: tf.BertForMaskedLM(
            tf.BertConfig(vocab_size=v, num_hidden_layers=n, **SMALL, **NO_DROPOUT)
        ),
        "roberta": lambda n, v: tf.RobertaForMaskedLM(
            tf.RobertaConfig(
                vocab_size=v,
                num_hidden_layers=n,
                pad_token_id=0,
                **{**SMALL, "max_position_embeddings": 70},
                **NO_DROPOUT,
            )
        ),
        "xlm-roberta": lambda n, v: tf.XLMRobertaForMaskedLM(
            tf.XLMRobertaConfig(
                vocab_size=v,
                num_hidden_layers=n,
                pad_token_id=0,
                **{**SMALL, "max_position_embeddings": 70},
                **NO_DROPOUT,
            )
        ),
        "electra": lambda n, v: tf.ElectraForMaskedLM(
            tf.ElectraConfig(vocab_size=v, num_hidden_layers=n, embedding_size=16, **SMALL, **NO_DROPOUT)
        ),
        "distilbert": lambda n, v: tf.DistilBertForMaskedLM(
            tf.DistilBertConfig(
                vocab_size=v,
                n_layers=n,
                dim=16,
                n_heads=2,
                hidden_dim=32,
                max_position_embeddings=64,
                dropout=0.0,
                attention_dropout=0.0,
            )
        ),
        "albert": lambda n, v: tf.AlbertForMaskedLM(
            tf.AlbertConfig(vocab_size=v, num_hidden_layers=n, embedding_size=8, **SMALL, **NO_DROPOUT)
        ),
        "deberta-v2": lambda n, v: tf.DebertaV2ForMaskedLM(
            tf.DebertaV2Config(
                vocab_size=v,
                num_hidden_layers=n,
                relative_attention=True,
                pos_att_type=["c2p", "p2c"],
                position_buckets=8,
                **SMALL,
                **NO_DROPOUT,
            )
        ),
        "modernbert": lambda n, v: tf.ModernBertForMaskedLM(
            tf.ModernBertConfig(
                vocab_size=v,
                num_hidden_layers=n,
                hidden_size=16,
                intermediate_size=32,
                num_attention_heads=2,
                max_position_embeddings=64,
                global_attn_every_n_layers=2,
                local_attention=4,
                pad_token_id=0,
                bos_token_id=None,
                eos_token_id=None,
                cls_token_id=None,
                sep_token_id=None,
            )
        ),
        # Causal LMs
        "gpt2": lambda n, v: tf.GPT2LMHeadModel(
            tf.GPT2Config(
                vocab_size=v,
                n_layer=n,
                n_embd=16,
                n_head=2,
                n_positions=64,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
            )
        ),
        "llama": lambda n, v: tf.LlamaForCausalLM(_decoder(tf.LlamaConfig, n, v)),
        "mistral": lambda n, v: tf.MistralForCausalLM(_decoder(tf.MistralConfig, n, v)),
        "gemma": lambda n, v: tf.GemmaForCausalLM(_decoder(tf.GemmaConfig, n, v, head_dim=8)),
        "olmo2": lambda n, v: tf.Olmo2ForCausalLM(_decoder(tf.Olmo2Config, n, v, pad_token_id=0, eos_token_id=None)),
        "granite": lambda n, v: tf.GraniteForCausalLM(_decoder(tf.GraniteConfig, n, v)),
        "stablelm": lambda n, v: tf.StableLmForCausalLM(_decoder(tf.StableLmConfig, n, v)),
        "qwen2": lambda n, v: tf.Qwen2ForCausalLM(_decoder(tf.Qwen2Config, n, v)),
        "qwen3": lambda n, v: tf.Qwen3ForCausalLM(_decoder(tf.Qwen3Config, n, v, head_dim=8)),
        # Sliding windows shorter than the longest fact (30 tokens), so the alternating layer types matter, and
        # longer than any padding (float64 attention turns an all-masked row into NaN).
        "gemma2": lambda n, v: tf.Gemma2ForCausalLM(_decoder(tf.Gemma2Config, n, v, head_dim=8, sliding_window=24)),
        "gemma3_text": lambda n, v: tf.Gemma3ForCausalLM(
            _decoder(tf.Gemma3TextConfig, n, v, head_dim=8, sliding_window=24, sliding_window_pattern=2)
        ),
        "mixtral": lambda n, v: tf.MixtralForCausalLM(
            _decoder(
                tf.MixtralConfig, n, v, num_local_experts=4, num_experts_per_tok=2, experts_implementation="eager"
            )
        ),
        "phi3": lambda n, v: tf.Phi3ForCausalLM(_decoder(tf.Phi3Config, n, v, pad_token_id=0, eos_token_id=None)),
        "gpt_neox": lambda n, v: tf.GPTNeoXForCausalLM(
            tf.GPTNeoXConfig(
                vocab_size=v,
                num_hidden_layers=n,
                **SMALL,
                bos_token_id=None,
                eos_token_id=None,
            )
        ),
        "gptj": lambda n, v: tf.GPTJForCausalLM(
            tf.GPTJConfig(
                vocab_size=v,
                n_layer=n,
                n_embd=16,
                n_head=2,
                n_positions=64,
                rotary_dim=4,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                bos_token_id=None,
                eos_token_id=None,
            )
        ),
        "falcon": lambda n, v: tf.FalconForCausalLM(
            tf.FalconConfig(
                vocab_size=v,
                num_hidden_layers=n,
                hidden_size=16,
                num_attention_heads=2,
                max_position_embeddings=64,
                bos_token_id=None,
                eos_token_id=None,
            )
        ),
        "opt": lambda n, v: tf.OPTForCausalLM(
            tf.OPTConfig(
                vocab_size=v,
                num_hidden_layers=n,
                hidden_size=16,
                ffn_dim=32,
                num_attention_heads=2,
                max_position_embeddings=64,
                word_embed_proj_dim=8,
                dropout=0.0,
                pad_token_id=0,
                bos_token_id=None,
                eos_token_id=None,
            )
        ),
    }


def _seeded(build, n: int, vocab: int = V, seed: int = 0):
    torch.manual_seed(seed)
    return build(n, vocab)


# One tiny random model per architecture of the block table, by its model_type: TINY[type](n blocks, vocab=V).
TINY = {name: functools.partial(_seeded, build) for name, build in _tiny_models().items()}
MASKED = ["albert", "bert", "deberta-v2", "distilbert", "electra", "modernbert", "roberta", "xlm-roberta"]


def tiny_bert(vocab_size: int, layers: int = 3, dropout: float = 0.0, seed: int = 0):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertForMaskedLM(config)


def assert_in_linf_ball(param: torch.Tensor, theta0: torch.Tensor, delta: float, name: str = "") -> None:
    """|θ − θ0| ≤ δ up to the float32 rounding of θ0 ± δ (half an ulp of |θ0| + δ, twice)."""
    slack = 2 * torch.finfo(torch.float32).eps * (theta0.abs() + delta)
    excess = ((param.detach() - theta0).abs() - delta - slack).max().item()
    assert excess <= 0, f"{name}: |θ − θ0| exceeds δ={delta} by {excess}"


def assert_agree_up_to_reordering(actual: dict, expected: dict, ulps: int = 256) -> None:
    """Two computations of the same tensors (one forward or backward pass) that differ only in the
    order of their sums: every entry agrees to `ulps` units in the last place of the largest entry.

    The scale is the largest entry of all tensors, not of each: rounding errs in proportion to the
    terms summed, and some gradients are zero up to rounding (a key bias shifts every attention score
    alike), so their own scale is noise. Not for weights after Adam steps, which amplify such noise.
    """
    assert actual.keys() == expected.keys() and expected
    first = next(iter(expected.values()))
    tolerance = ulps * torch.finfo(first.dtype).eps * max(value.abs().max().item() for value in expected.values())
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=0, atol=tolerance, msg=name)


DELTA = 1e-2  # how far make_run_folder moves block 1


def make_run_folder(folder, base_model, seed: int, facts=None, modules=None):
    """A run folder as `run_edit` writes it: edit/ (block 1, or its `modules`, moved within ±δ) and results.json."""
    from hf_memedit import BlockSelectorConfig, get_edit_model
    from hf_memedit.evaluation.results import ResultsRecord
    from hf_memedit.projection import project_linf_
    from hf_memedit.run_folder import seal_run

    edit = get_edit_model(base_model, BlockSelectorConfig(blocks=["1"], modules=modules))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in edit.trainable_parameters().items():
            param.add_((torch.rand(param.shape, generator=generator) * 2 - 1) * DELTA)
            project_linf_(param, edit.theta0[name], DELTA)  # as the trainer stores it: inside the box exactly
    edit.save_pretrained(os.path.join(folder, "edit"))
    ResultsRecord(
        metrics={"a_m": 0.75, "a_fs": 0.5, "avg_acc": 0.625, "retention": 0.9, "n_modified": 2, "n_unmodified": 4},
        config={
            "model_name_or_path": base_model.name_or_path,
            "setting": "ftm",
            "norm": "linf",
            "delta": DELTA,
            "benchmark": "geo_mod",
            "m": 2,
            "model_kind": "masked",
        },
        seed=seed,
        facts=facts
        or [
            {
                "uuid": "geo-P36-NO",
                "relation": "P36",
                "subject": "Norway",
                "text": "The capital of Norway is [Y].",
                "old": "Oslo",
                "new": "Lima",
                "predicted": "lima",
                "correct": True,
            },
        ],
    ).save(folder)
    seal_run(folder)
    return edit.merge_and_unload()


def naive_greedy_correct(model, tokenizer, facts) -> list[bool]:
    """The reference for causal LMs: per fact, greedy `generate` from the prompt alone, compared
    token for token with the object. One fact at a time, no batching, no teacher forcing."""
    correct = []
    for fact in facts:
        prompt = fact["text"].split("[Y]")[0].rstrip(" ")
        prompt_ids = tokenizer(prompt)["input_ids"]
        full_ids = tokenizer(prompt + " " + fact["object"])["input_ids"]
        assert full_ids[: len(prompt_ids)] == prompt_ids, fact  # the object starts a token of its own
        object_ids = full_ids[len(prompt_ids) :]
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt_ids]),
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                max_new_tokens=len(object_ids),
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
        correct.append(out[0, len(prompt_ids) :].tolist() == object_ids)
    return correct


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_process(command: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `command` from the repository root in a session of its own; past `timeout` seconds the whole session
    (a launcher and every rank it started) is killed, and what each printed is returned with the reason."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        stderr += f"\n[killed: {' '.join(command[:6])} ... ran past its {timeout} s timeout]"
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def accelerate_launch(
    script: Path, *args: str, processes: int = 2, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu` of `script` on `processes` CPU ranks (gloo), from the repository root."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(script),
        *args,
    ]
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **(env or {}),
    }
    return run_process(command, timeout, env)


def save_tiny_llama(folder: str | os.PathLike, tokenizer, chat_template: str | None = None) -> str:
    """A random 2-block Llama (seed 0) and a copy of `tokenizer` (with `chat_template`, if given: the session's
    tokenizer is never changed), saved as safetensors in `folder`: a causal LM for the facts and stream paths."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer = copy.deepcopy(tokenizer)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    return str(folder)


def tiny_fold_compare(output_dir: str | os.PathLike, methods: list[str], options: dict | None = None, **overrides):
    """The job and arguments of the tiny relation-folds compares: 12 geo_mod facts of three relations (one fold each),
    block 1 of a 2-block Llama under L∞, two steps per point at δ 1e-3 and 3e-2."""
    from hf_memedit import EditConfig
    from hf_memedit.experiments import JobConfig

    job = JobConfig(
        model_name_or_path="tiny-llama",
        benchmark="geo_mod",
        m=12,
        compare_methods=methods,
        benchmark_options={"relations": ["P36", "P1376", "P30"], "max_facts_per_relation": 30, **(options or {})},
        relation_folds=3,
        sweep_deltas=[1e-3, 3e-2],
    )
    args = EditConfig(
        output_dir=str(output_dir),
        edit_blocks=["1"],
        norm="linf",
        delta=1e-2,
        max_steps=2,
        learning_rate=5e-2,
        report_to="none",
        disable_tqdm=True,
        per_device_train_batch_size=4,
        **overrides,
    )
    return job, args
