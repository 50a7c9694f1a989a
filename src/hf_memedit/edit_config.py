"""`EditConfig`: every knob of a constrained edit: `TrainingArguments`, and two groups that validate themselves,
`ConstraintArguments` (the ball and the key constraint) and `PreservationArguments` (the preservation mix)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from .blocks import BlockSelectorConfig, parse_block_spec
from .preservation import PRESERVE_OBJECTIVES
from .projection import KEY_CONSTRAINTS, L2_SCOPES, NORMS, validate_constraint, validate_delta


@dataclass
class ConstraintArguments:
    """Where θ may move: the norm ball around θ0 (`hf_memedit.projection`), intersected with a constraint on the
    preserved keys (`hf_memedit.keys`); validated together, recorded and described by `constraint_record` and
    `describe_constraint`."""

    _argument_group_name = "constraint (ConstraintArguments)"  # its heading in `memedit <command> --help`

    norm: str = field(
        default="linf",
        metadata={
            "help": "Norm of the constraint ||θ − θ0|| ≤ δ: 'linf' (clamp, the paper's most stable), "
            "'l2' (rescale), 'fisher' (Σ Fᵢ Δᵢ² ≤ δ with the diagonal Fisher F on unmodified facts; "
            "the trainer needs fisher_dataset), or 'none' for unconstrained fine-tuning.",
            "choices": list(NORMS),
        },
    )
    delta: float | None = field(
        default=1e-3,
        metadata={"help": "Radius δ > 0 of the norm ball around θ0. Must be unset (null) with norm 'none'."},
    )
    l2_scope: str = field(
        default="global",
        metadata={
            "help": "For norm 'l2': 'global' bounds all trainable parameters together (the paper's θ); "
            "'per_tensor' bounds each tensor separately.",
            "choices": list(L2_SCOPES),
        },
    )
    fisher_samples: int = field(
        default=256,
        metadata={
            "help": "norm 'fisher': how many unmodified facts estimate the diagonal Fisher (one backward each)."
        },
    )
    key_constraint: str = field(
        default="none",
        metadata={
            "help": "A constraint on the preserved keys (the edited linear layers' inputs on preserve_corpus; "
            "hf_memedit.keys), intersected with the norm ball: 'nullspace' (AlphaEdit: updates only along the "
            "directions the keys barely use), 'output' (E‖ΔW k‖² ≤ output_rho·E‖W0 k‖² per layer) or 'none'. "
            "Biases and norms of the edited modules then stay at θ0.",
            "choices": list(KEY_CONSTRAINTS),
        },
    )
    nullspace_threshold: float = field(
        default=2e-2,
        metadata={
            "help": "key_constraint nullspace: keep the eigen-directions of E[k kᵀ] with eigenvalue below this "
            "(AlphaEdit's 2e-2)."
        },
    )
    nullspace_energy: float | None = field(
        default=None,
        metadata={
            "help": "key_constraint nullspace, instead of the threshold: remove the largest directions holding "
            "this share of E[k kᵀ]'s trace (e.g. 0.99)."
        },
    )
    output_rho: float = field(
        default=1e-2, metadata={"help": "key_constraint output: the bound ρ of E‖ΔW k‖² ≤ ρ·E‖W0 k‖² per layer."}
    )
    preserve_corpus: str = field(
        default="samples",
        metadata={
            "help": "Where the preserved keys come from: 'samples' (the model's own seeded samples: data-free, "
            "causal LMs), 'benchmark' (the unmodified facts set aside by preserve_fraction), or a datasets "
            "folder, data file (.jsonl/.csv/.parquet/.txt) or Hub id (e.g. wikitext where the Hub is reachable)."
        },
    )
    preserve_corpus_column: str = field(
        default="text", metadata={"help": "The text column of a datasets preserve_corpus."}
    )
    preserve_corpus_samples: int = field(
        default=256,
        metadata={"help": "How many texts of preserve_corpus (or samples of the model) the keys are taken over."},
    )
    preserve_corpus_length: int = field(
        default=64, metadata={"help": "Tokens per sample of preserve_corpus 'samples'."}
    )
    preserve_keys_file: str | None = field(
        default=None,
        metadata={
            "help": "safetensors file of the preserved keys: read when it exists (refused unless made for this "
            "model, layers and corpus), else written. Default: named by those hashes under HF_HOME/hf_memedit/keys."
        },
    )
    projection_iterations: int = field(
        default=100,
        metadata={
            "help": "The cap on Dykstra's iterations when a key constraint meets a ball it is not exact with; a "
            "projection that reaches it is counted (`dykstra_capped` in the logs) and warned about once."
        },
    )
    projection_tolerance: float = field(
        default=1e-6,
        metadata={
            "help": "When the ball ∩ key set projection stops. nullspace: once the duality gap certifies ½‖result − "
            "target‖² within this share of its minimum (the result within √tolerance × the distance projected of "
            "the nearest point; with linf each weight row on its own certificate, the tensor then within twice "
            "this share). output: once a Dykstra iteration moves its iterate and correction terms by at most this × "
            "the distance projected. The result is then scaled toward θ0 into the ball: it lies in both sets."
        },
    )

    def validate_constraint(self) -> None:
        self.delta = validate_constraint(self.norm, self.delta, self.l2_scope)
        if self.key_constraint not in KEY_CONSTRAINTS:
            raise ValueError(
                f"Unknown key_constraint {self.key_constraint!r}: choose one of {', '.join(KEY_CONSTRAINTS)}."
            )
        validate_delta(self.nullspace_threshold, "nullspace_threshold")
        validate_delta(self.output_rho, "output_rho")
        validate_delta(self.projection_tolerance, "projection_tolerance")
        if self.nullspace_energy is not None and not 0 < self.nullspace_energy < 1:
            raise ValueError(f"nullspace_energy must lie in (0, 1), got {self.nullspace_energy}.")
        for name in ("preserve_corpus_samples", "preserve_corpus_length", "projection_iterations", "fisher_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")


@dataclass
class PreservationArguments:
    """What every batch mixes in to keep the model's other knowledge (`hf_memedit.preservation`), and which
    unmodified facts it may take them from."""

    _argument_group_name = "preservation (PreservationArguments)"

    preserve_objective: str = field(
        default="none",
        metadata={
            "help": "What every batch mixes in to keep the model's other knowledge (hf_memedit.preservation): 'none'; "
            "'evidence' (the unmodified facts' evidence with their benchmark objects: the paper's FTA, what "
            "setting fta selects); 'answers' (evidence of unmodified facts θ0 predicts right, labelled with "
            "θ0's own answer: it keeps behaviour instead of teaching labels); 'kl' (the unmodified evidence, "
            "with KL(θ0 ‖ θ) of the next-token distribution at its object positions as the loss; batches "
            "holding such rows run without dropout, as θ0's reference does, so θ0 is a fixed point of the term).",
            "choices": list(PRESERVE_OBJECTIVES),
        },
    )
    preserve_ratio: float = field(
        default=1.0,
        metadata={
            "help": "Preservation facts per edit fact in every batch (1: as many as the edit's, the paper's FTA)."
        },
    )
    preserve_weight: float = field(
        default=1.0,
        metadata={
            "help": "Loss weight λ of each preservation fact's object tokens (edit facts weigh 1): the loss is "
            "(Σ CE_edit + λ Σ CE_preserve) / all object tokens."
        },
    )
    preserve_same_relation: bool = field(
        default=True,
        metadata={
            "help": "preserve_objective 'answers' / 'kl': draw each edit fact's neighbours from its own relation, "
            "where a new object most easily leaks."
        },
    )
    preserve_risk: float = field(
        default=0.0,
        metadata={
            "help": "Share of each edit fact's neighbours drawn by risk instead of uniformly: in proportion to "
            "θ0's probability of that fact's new object (its first token) on the neighbour's prompt, the "
            "neighbours a new object would most readily take over (hf_memedit.preservation.neighbour_risk; "
            "one extra pass of θ0 over them). 0: all uniform; 1: all by risk."
        },
    )
    preserve_fraction: float = field(
        default=0.5,
        metadata={
            "help": "When preservation data comes from the benchmark (FTA, 'answers', norm fisher), the share "
            "of unmodified facts (a seeded hash of the uuid) it may use; locality is then scored only on the "
            "others whose subjects it never touched. 0 uses all facts for both, flagged as not disjoint."
        },
    )

    def validate_preservation(self) -> None:
        if self.preserve_objective not in PRESERVE_OBJECTIVES:
            raise ValueError(
                f"Unknown preserve_objective {self.preserve_objective!r}: "
                f"choose one of {', '.join(PRESERVE_OBJECTIVES)}."
            )
        if not self.preserve_ratio > 0:
            raise ValueError(
                f"preserve_ratio must be positive (preservation facts per edit fact), got {self.preserve_ratio}."
            )
        if not self.preserve_weight > 0:
            raise ValueError(
                f"preserve_weight must be positive, got {self.preserve_weight}: "
                "for no preservation set preserve_objective none."
            )
        if not 0 <= self.preserve_risk <= 1:
            raise ValueError(
                f"preserve_risk must lie in [0, 1] (the share of neighbours drawn by risk), got {self.preserve_risk}."
            )
        if not 0 <= self.preserve_fraction < 1:
            raise ValueError(f"preserve_fraction must lie in [0, 1), got {self.preserve_fraction}.")


@dataclass
class EditConfig(ConstraintArguments, PreservationArguments, TrainingArguments):
    """Arguments of `ConstrainedEditTrainer`: `TrainingArguments`, the constraint (where and how far θ may move) and
    the preservation mix, plus what and how the edit trains.

    Loadable from YAML with `HfArgumentParser(EditConfig).parse_yaml_file(path)`. Unconstrained
    fine-tuning (the paper's δ = ∞) is spelled `norm: none`, never by a huge δ.
    """

    _argument_group_name = "edit (EditConfig: TrainingArguments, the constraint and the preservation mix)"

    edit_blocks: list[str] = field(
        default_factory=lambda: ["0"],
        metadata={
            "help": "Blocks to edit: indices (0 = first, -1 = last), 'all', 'embeddings', or a mix "
            "(e.g. 'embeddings' '0'). Everything else is frozen."
        },
    )
    edit_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Train only these submodules of the selected blocks: paths relative to a block, or "
            "'mlp_out' (its MLP output projection; edit_blocks 0 + edit_modules mlp_out is FT-L as ROME and "
            "EasyEdit run it). Default: whole blocks."
        },
    )
    stop_at_loss: float | None = field(
        default=None,
        metadata={"help": "Stop training once a step's loss falls below this (FT-L's early stop; EasyEdit: 1e-2)."},
    )
    eos_target: bool = field(
        default=False,
        metadata={
            "help": "Causal LMs: append the EOS token to every training target, so the edited model stops after "
            "the new object (LocFT-BF; 'The Mirage of Model Editing')."
        },
    )
    target_suffix: str | None = field(
        default=None,
        metadata={
            "help": "Causal LMs: text written after the new object of every edit row and trained with it (e.g. "
            "'.'), so the edited model ends its answer there as a sentence does, where without it the answer "
            "runs on ('Vanuatu, and it's a city'). Preservation rows (any objective) are left as they are. None: the "
            "object only."
        },
    )
    loss_reduction: str = field(
        default="token",
        metadata={
            "help": "'token': cross-entropy summed over the batch's object tokens / their number (exact under "
            "gradient accumulation); 'sequence': the mean over facts of each fact's mean token loss (LocFT-BF's).",
            "choices": ["token", "sequence"],
        },
    )
    skip_below_loss: float | None = field(
        default=None,
        metadata={
            "help": "Skip the update of a batch whose loss is already below this (LocFT-BF: 1e-2): no gradient, "
            "so Adam leaves every parameter and its moments alone."
        },
    )
    stop_at_epoch_loss: float | None = field(
        default=None,
        metadata={"help": "Stop once an epoch's mean batch loss falls below this (LocFT-BF's early stop: 1e-2)."},
    )
    blocks_path: str | None = field(
        default=None,
        metadata={
            "help": "Only for architectures not in hf_memedit's table: dotted path, relative to "
            "model.base_model, of the nn.ModuleList of Transformer blocks."
        },
    )
    embeddings_paths: list[str] | None = field(
        default=None,
        metadata={"help": "Only with blocks_path: paths of the embedding modules, relative to model.base_model."},
    )
    generation_eval: bool = field(
        default=False,
        metadata={
            "help": "Causal LMs: also score A_M, A_F\\S and retention by greedy generation until EOS, newline "
            "or period with normalised exact match (gen_a_m, gen_retention), and the same answers stopped at a "
            "comma too (gen_a_m_comma, gen_retention_comma: LocFT-BF's rule), beside the teacher-forced scores; each "
            "edited fact's answer is recorded (results.json `generated`)."
        },
    )
    drift_eval: bool = field(
        default=False,
        metadata={
            "help": "Causal LMs: also report general drift, the mean next-token KL(θ0 ‖ θ) and the perplexity "
            "ratio on 32 held-out samples of θ0 (seed + 1: never the keys' samples)."
        },
    )
    eval_before_edit: bool = field(
        default=True,
        metadata={
            "help": "When the eval dataset holds benchmark splits, evaluate θ0 on them before training, "
            "so evaluations report A_F before, retention and agreement (costs one evaluation)."
        },
    )
    prefix_cache: bool = field(
        default=True,
        metadata={
            "help": "Compute the hidden states entering the lowest edited block once per fact and train and "
            "evaluate only the blocks from there on (hf_memedit.fast_paths.prefix). The frozen blocks below then run "
            "without dropout. Used when nothing below that block trains (not for embeddings or ALBERT)."
        },
    )
    prefix_cache_dtype: str = field(
        default="auto",
        metadata={
            "help": "Storage dtype of the prefix cache: 'auto' (the model's), 'float32', or 'float16'/'bfloat16' "
            "(half the memory, rounding the cached states).",
            "choices": ["auto", "float32", "float16", "bfloat16"],
        },
    )
    object_logits_only: bool = field(
        default=True,
        metadata={
            "help": "Compute the LM head, and the last block's query and attention-output projections and "
            "feed-forward, only at the object positions in training (same loss, less work; dropout there then "
            "draws other random numbers than the full computation); needs the architecture in hf_memedit's "
            "block table."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace an earlier run in output_dir (its edit, results and checkpoints are removed first; a "
            "saved FT model is kept and reused only when its inputs match). Without it such a folder is refused."
        },
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Kept False: the fact collator needs the text and object columns."},
    )

    def __post_init__(self):
        self.validate_constraint()
        self.validate_preservation()
        self.edit_blocks = [str(block) for block in parse_block_spec(self.edit_blocks)]
        if self.target_suffix is not None and not self.target_suffix.strip(" \t"):
            raise ValueError(
                f"target_suffix {self.target_suffix!r} writes nothing after the object: give text such as '.', or "
                "leave it out."
            )
        if self.loss_reduction not in ("token", "sequence"):
            raise ValueError(f"Unknown loss_reduction {self.loss_reduction!r}: choose token or sequence.")
        for name in ("skip_below_loss", "stop_at_epoch_loss", "stop_at_loss"):
            if getattr(self, name) is not None:
                validate_delta(getattr(self, name), name)
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}.")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.deepspeed:
            raise ValueError(
                "ConstrainedEditTrainer does not support DeepSpeed: ZeRO partitions the parameters the "
                "projection must see whole, and its optimizer bypasses the step hook. Use DDP instead."
            )
        if not self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
            # A multi-process launch on a machine without an accelerator: DDP over gloo on the CPU
            # (transformers would otherwise run each process alone).
            self.use_cpu = True
        if self.use_cpu or not torch.accelerator.is_available():
            self.dataloader_pin_memory = (
                False  # pinned memory serves copies to an accelerator; torch warns without one
            )
        super().__post_init__()
        if self.fsdp:  # checked on transformers' normalised fsdp_config
            self._check_fsdp()

    def _check_fsdp(self) -> None:
        """FSDP2 shards the parameters: the L∞ box projects each shard, the L2 ball all-reduces one norm. The Fisher
        ellipsoid and the key constraints need whole tensors, and FSDP1's flat parameters hide the tensors."""
        version = int((self.fsdp_config or {}).get("version", 1))
        if version != 2:
            raise ValueError(
                "ConstrainedEditTrainer supports FSDP2 only (fsdp_config: {fsdp_version: 2}): FSDP1 flattens the "
                "parameters, so the projection cannot find its tensors. Or use DDP (accelerate launch --multi_gpu)."
            )
        if self.save_strategy != "no":
            raise ValueError(
                "Under FSDP, checkpoints during the edit are not supported yet (θ0 and the trained tensors would need "
                "gathering from every rank): set save_strategy: no. The finished edit is still saved whole."
            )
        if self.norm == "fisher" or self.key_constraint != "none":
            raise ValueError(
                f"Under FSDP, norm {self.norm!r} with key_constraint {self.key_constraint!r} is refused: the "
                "Fisher and preserved-key projections work on whole tensors, which FSDP shards across ranks. Use "
                "norm linf, l2 or none without a key constraint, or DDP when the edited blocks fit on one device."
            )

    def block_selector_config(self) -> BlockSelectorConfig:
        return BlockSelectorConfig(
            blocks=list(self.edit_blocks),
            blocks_path=self.blocks_path,
            embeddings_paths=self.embeddings_paths,
            modules=list(self.edit_modules) if self.edit_modules else None,
        )


def constraint_record(config: Mapping[str, Any]) -> dict[str, Any]:
    """The fields that define the set an edit was kept in, from an EditConfig's fields or a run's recorded config.

    A run's results.json, the manifest's `constraint` and the card all say this, so a shared edit names its key
    constraint as well as its ball. A config recorded before key constraints were recorded has no `key_constraint`
    here: unknown, never claimed to be none.
    """
    norm = config.get("norm") or "none"
    record: dict[str, Any] = {"norm": norm, "delta": config.get("delta")}
    if norm == "l2":
        record["l2_scope"] = config.get("l2_scope", "global")
    key = config.get("key_constraint")
    if key is None:
        return record
    record["key_constraint"] = key
    if key == "nullspace":
        if config.get("nullspace_energy") is not None:
            record["nullspace_energy"] = config["nullspace_energy"]
        else:
            record["nullspace_threshold"] = config.get("nullspace_threshold")
    elif key == "output":
        record["output_rho"] = config.get("output_rho")
    if key != "none":
        record.update(
            preserve_corpus=config.get("preserve_corpus"),
            preserve_corpus_samples=config.get("preserve_corpus_samples"),
        )
    return record


def describe_constraint(record: Mapping[str, Any]) -> str:
    """A `constraint_record` as one line, for the edit summary and the model card."""
    norm, delta = record.get("norm") or "none", record.get("delta")
    if norm == "none":
        text = "no norm bound (unconstrained)"
    else:
        distance = {"linf": "‖θ − θ0‖∞", "l2": "‖θ − θ0‖₂", "fisher": "Σ Fᵢ (θᵢ − θ0ᵢ)²"}[norm]
        text = f"{distance} ≤ δ = {delta:g}"
    if record.get("l2_scope") == "per_tensor":
        text += " per tensor"
    if record.get("key_constraint") == "nullspace":
        kept = (
            f"{record['nullspace_energy']:g} of their energy removed"
            if record.get("nullspace_energy") is not None
            else f"eigenvalues below {record['nullspace_threshold']:g} kept"
        )
        text += f" ∩ null space of the preserved keys ({kept}; keys from {_keys_source(record)})"
    elif record.get("key_constraint") == "output":
        text += (
            " ∩ output ellipsoid on the preserved keys (ρ = "
            f"{record['output_rho']:g}; keys from {_keys_source(record)})"
        )
    if record.get("blocks"):
        text += f", blocks {', '.join(str(block) for block in record['blocks'])}"
    return text


def _keys_source(record: Mapping[str, Any]) -> str:
    corpus, samples = record.get("preserve_corpus"), record.get("preserve_corpus_samples")
    if corpus == "samples":
        return f"{samples} of the model's own samples"
    if corpus == "benchmark":
        return "the benchmark's unmodified facts set aside for preservation"
    return f"{samples} texts of {corpus}"
