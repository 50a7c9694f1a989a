"""Preserved keys and their constraints: the projections' properties, the cache, the corpora, the trainer."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_memedit import EditConfig
from hf_memedit.edit_trainer import ConstrainedEditTrainer
from hf_memedit.keys import KeyStatistics, collect_keys, corpus_texts, key_layers, keys_corpus, preserved_keys
from hf_memedit.projection import (
    KeyProjector,
    NormBallProjector,
    nullspace_projector,
    output_radius,
    project_fisher_,
    project_nullspace_,
    project_output_,
)

from .helpers import FACTS, TINY, tiny_bert


def _moment(n_in: int, seed: int, rank: int | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(64, n_in, generator=generator, dtype=torch.float64)
    if rank is not None:  # keys in a subspace: a true null space exists
        keys = (
            keys
            @ torch.randn(n_in, rank, generator=generator, dtype=torch.float64)
            @ torch.randn(rank, n_in, generator=generator, dtype=torch.float64)
            / n_in
        )
    return keys.T @ keys / len(keys)


def _feasible_points(project, theta0, shape, count=40, seed=0):
    """Random points of the set: projections of random points (a projection's range is the set)."""
    generator = torch.Generator().manual_seed(seed)
    points = []
    for scale in torch.logspace(-3, 1, count).tolist():
        z = theta0 + scale * torch.randn(*shape, generator=generator, dtype=torch.float64)
        project(z)
        points.append(z)
    return points


def _assert_nearest(y, p, points):
    """p is the Euclidean projection of y onto a closed convex set iff ⟨y − p, z − p⟩ ≤ 0 for every z in it."""
    for z in points:
        assert torch.sum((y - p) * (z - p)).item() <= 1e-9 * (1 + (y - p).norm().item() * (z - p).norm().item())
        assert (y - p).norm() <= (y - z).norm() + 1e-12


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n_out=st.integers(1, 5), n_in=st.integers(2, 6), transposed=st.booleans())
def test_nullspace_projection_is_exact(seed, n_out, n_in, transposed):
    moment = _moment(n_in, seed, rank=max(1, n_in // 2))
    projector = nullspace_projector(moment, threshold=1e-8)
    shape = (n_in, n_out) if transposed else (n_out, n_in)
    generator = torch.Generator().manual_seed(seed + 1)
    theta0 = torch.randn(*shape, generator=generator, dtype=torch.float64)
    y = theta0 + torch.randn(*shape, generator=generator, dtype=torch.float64)
    p = y.clone()
    project_nullspace_(p, theta0, projector, transposed)
    step = (p - theta0).T if transposed else p - theta0
    assert torch.allclose(
        step @ moment @ step.T, torch.zeros(n_out, n_out, dtype=torch.float64), atol=1e-10
    )  # ΔW k = 0
    again = p.clone()
    project_nullspace_(again, theta0, projector, transposed)
    assert torch.allclose(again, p, atol=1e-12)  # idempotent
    raw = (y - theta0).T if transposed else y - theta0
    assert torch.allclose(raw @ projector, raw @ projector.matrix(), atol=1e-12)  # ΔW @ P, through the thin factor
    _assert_nearest(
        y, p, _feasible_points(lambda z: project_nullspace_(z, theta0, projector, transposed), theta0, shape)
    )


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n_out=st.integers(1, 4), n_in=st.integers(2, 5), rho=st.floats(1e-4, 0.5))
def test_output_projection_is_exact(seed, n_out, n_in, rho):
    moment = _moment(n_in, seed)
    values, vectors = torch.linalg.eigh(moment)
    generator = torch.Generator().manual_seed(seed + 1)
    theta0 = torch.randn(n_out, n_in, generator=generator, dtype=torch.float64)
    radius = output_radius(theta0, moment, rho)
    y = theta0 + 2 * torch.randn(n_out, n_in, generator=generator, dtype=torch.float64)
    p = y.clone()
    project_output_(p, theta0, values, vectors, radius)
    step = p - theta0
    assert torch.trace(step @ moment @ step.T).item() <= radius * (1 + 1e-9)  # in the set
    again = p.clone()
    project_output_(again, theta0, values, vectors, radius)
    assert torch.allclose(again, p, atol=1e-9)  # idempotent
    _assert_nearest(
        y, p, _feasible_points(lambda z: project_output_(z, theta0, values, vectors, radius), theta0, (n_out, n_in))
    )


def _generic_nearest(y, project_all, iterations=20000):
    """A generic solver for small dimensions: Dykstra with very many iterations over the two sets' own projections."""
    x, p, q = y.clone(), torch.zeros_like(y), torch.zeros_like(y)
    for _ in range(iterations):
        a = project_all[0](x + p)
        p = x + p - a
        x = project_all[1](a + q)
        q = a + q - x
    return x


@pytest.mark.parametrize(
    "norm, kind", [("linf", "nullspace"), ("linf", "output"), ("l2", "nullspace"), ("l2", "output")]
)
def test_a_key_set_and_a_ball_compose_to_the_nearest_point_of_both(norm, kind):
    torch.manual_seed(0)
    n_out, n_in, delta = 3, 4, 0.05
    moment = _moment(n_in, 7, rank=2)
    theta0 = torch.randn(n_out, n_in, dtype=torch.float64)
    layers = {"w": ("layer", False)}
    keys = KeyProjector(kind, {"w": moment}, layers, ["w"], {"w": theta0}, threshold=1e-8, rho=1e-3)
    param = torch.nn.Parameter(theta0 + 0.3 * torch.randn(n_out, n_in, dtype=torch.float64))
    y = param.detach().clone()
    projector = NormBallProjector({"w": param}, {"w": theta0}, norm, delta, keys=keys, iterations=2000, tolerance=1e-9)
    projector.project_()
    result = param.detach().clone()
    # In the key set exactly, in the ball up to the stated tolerance.
    step = result - theta0
    if kind == "nullspace":
        assert torch.allclose(step @ moment @ step.T, torch.zeros(n_out, n_out, dtype=torch.float64), atol=1e-10)
    else:
        assert torch.trace(step @ moment @ step.T).item() <= keys.bases["w"][2] * (1 + 1e-9)
    assert projector.distance() <= delta * (1 + 1e-6)

    def ball(z):
        holder = {"w": torch.nn.Parameter(z.clone())}
        NormBallProjector(holder, {"w": theta0}, norm, delta).project_()
        return holder["w"].detach()

    def key_set(z):
        holder = {"w": torch.nn.Parameter(z.clone())}
        keys.project_(holder, {"w": theta0})
        return holder["w"].detach()

    expected = _generic_nearest(y, (ball, key_set))
    assert torch.allclose(result, expected, atol=1e-6), (result - expected).abs().max()
    again = torch.nn.Parameter(result.clone())
    NormBallProjector({"w": again}, {"w": theta0}, norm, delta, keys=keys, iterations=2000, tolerance=1e-9).project_()
    assert torch.allclose(again.detach(), result, atol=1e-8)  # idempotent


@pytest.mark.parametrize("norm, kind", [("linf", "nullspace")])  # projecting onto the subspace leaves the box
def test_an_unconverged_dykstra_still_ends_in_both_sets(norm, kind):
    """One Dykstra iteration is far from the nearest point, but the pull-in toward θ0 leaves the result in the
    ball and in the key set exactly (the measured compare points had stopped up to 14% of δ outside the box)."""
    torch.manual_seed(1)
    n_out, n_in, delta = 6, 8, 0.05
    moment = _moment(n_in, 7, rank=3)
    theta0 = torch.randn(n_out, n_in, dtype=torch.float64)
    keys = KeyProjector(kind, {"w": moment}, {"w": ("layer", False)}, ["w"], {"w": theta0}, threshold=1e-8, rho=10.0)
    param = torch.nn.Parameter(theta0 + 0.5 * torch.randn(n_out, n_in, dtype=torch.float64))
    projector = NormBallProjector({"w": param}, {"w": theta0}, norm, delta, keys=keys, iterations=1, tolerance=1e-12)
    projector.project_()
    assert projector.dykstra_excess > 0.01 * delta  # Dykstra alone had not reached the ball
    assert projector.distance() <= delta
    step = param.detach() - theta0
    if kind == "nullspace":
        assert torch.allclose(step @ moment @ step.T, torch.zeros(n_out, n_out, dtype=torch.float64), atol=1e-10)
    else:
        assert torch.trace(step @ moment @ step.T).item() <= keys.bases["w"][2] * (1 + 1e-9)
    assert step.abs().max() > 0


def test_nullspace_by_kept_energy_and_bad_thresholds():
    moment = torch.diag(torch.tensor([10.0, 1.0, 0.1, 0.001], dtype=torch.float64))
    assert nullspace_projector(moment, energy=0.99).dimensions == 2  # 0.1 + 0.001 ≤ 1% of 11.101
    assert nullspace_projector(moment, threshold=0.5).dimensions == 2
    for bad in (0.0, -1e-2):
        with pytest.raises(ValueError, match="nullspace_threshold"):
            nullspace_projector(moment, threshold=bad)
        with pytest.raises(ValueError, match="nullspace_threshold"):
            EditConfig(output_dir="x", key_constraint="nullspace", nullspace_threshold=bad)
    with pytest.raises(ValueError, match="output_rho"):
        EditConfig(output_dir="x", key_constraint="output", output_rho=0)
    with pytest.raises(ValueError, match="key_constraint"):
        EditConfig(output_dir="x", key_constraint="rome")


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n_in=st.integers(4, 9))
def test_earlier_edits_keys_join_the_null_space(seed, n_in):
    """AlphaEdit's sequential rule: with a stream's earlier edits' keys, an update in the null space kills both the
    corpus's keys and the edits', and may use every other direction (threshold rule, exact for keys in subspaces)."""
    corpus, edits = _moment(n_in, seed, rank=n_in // 3 or 1), _moment(n_in, seed + 1, rank=1)
    alone = nullspace_projector(corpus, threshold=1e-8)
    both = nullspace_projector(corpus, threshold=1e-8, edits=edits)
    span = torch.linalg.matrix_rank(torch.cat([corpus, edits], dim=1), hermitian=False, rtol=1e-8)
    assert both.dimensions == n_in - int(span) and both.dimensions < alone.dimensions
    p = both.matrix()
    assert torch.allclose(p @ p, p, atol=1e-10) and torch.allclose(p, p.T, atol=1e-10)  # an orthogonal projector
    step = torch.randn(3, n_in, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) @ p
    for moment in (corpus, edits):
        assert torch.allclose(step @ moment @ step.T, torch.zeros(3, 3, dtype=torch.float64), atol=1e-10)
    assert step.abs().max() > 0  # what is left is usable
    with pytest.raises(ValueError, match="nullspace only"):
        KeyProjector(
            "output", {"w": corpus}, {"w": ("layer", False)}, ["w"], {"w": torch.zeros(2, n_in)}, edits={"w": edits}
        )


def test_earlier_edits_keys_under_the_energy_rule_count_what_the_corpus_removed():
    """With nullspace_energy, the edits' share is of their whole energy: edits inside the corpus's removed directions
    remove nothing more (not a share of rounding noise); edits outside them remove their own directions."""
    values = torch.tensor([100.0, 90.0, 80.0] + [0.5] * 9, dtype=torch.float64)
    corpus = torch.diag(values)  # 0.9 of the energy: the first three directions
    alone = nullspace_projector(corpus, energy=0.9)
    assert alone.dimensions == 9
    inside = torch.zeros(12, 12, dtype=torch.float64)
    inside[:3, :3] = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]], dtype=torch.float64)
    assert nullspace_projector(corpus, energy=0.9, edits=inside).dimensions == 9
    outside = torch.zeros(12, 12, dtype=torch.float64)
    outside[5, 5], outside[7, 7] = 3.0, 1.0  # 0.75 and 0.25 of the edits' energy
    both = nullspace_projector(corpus, energy=0.9, edits=outside)
    assert both.dimensions == 7  # both removed: keeping either would keep more than 0.1 of the edits' energy
    assert nullspace_projector(corpus, energy=0.7, edits=outside).dimensions == 8  # 0.25 ≤ 0.3: direction 7 kept
    p = both.matrix()
    assert p[5, 5].abs() < 1e-12 and p[7, 7].abs() < 1e-12 and p[0, 0].abs() < 1e-12 and p[4, 4] > 1 - 1e-12


def test_the_trainer_keeps_the_outputs_of_edit_keys(tmp_path, bpe_tokenizer):
    """`edit_keys` (a stream's earlier edits): trained on new facts, the edited block leaves the model's logits on
    those texts unchanged, up to float rounding, while the trained fact moves; refused without the null space."""
    import datasets

    from hf_memedit.collators import FactEncoder

    model = TINY["llama"](2).eval()
    earlier = [FactEncoder(bpe_tokenizer, "causal").encode(f["text"], f["object"])["input_ids"] for f in FACTS[:1]]
    names = [name for name, _ in model.named_parameters() if name.startswith("model.layers.1.")]
    layers = key_layers(model, names)
    modules = dict(model.named_modules())
    zero = {  # [in, in] per layer
        name: torch.zeros(2 * [modules[owner].weight.shape[1]], dtype=torch.float64)
        for name, (owner, _) in layers.items()
    }
    keys = KeyStatistics(zero, 1, "given", "given")  # no corpus keys: only the earlier edits' are kept
    args = EditConfig(
        output_dir=str(tmp_path),
        edit_blocks=["1"],
        norm="linf",
        delta=5e-2,
        key_constraint="nullspace",
        nullspace_threshold=1e-9,
        learning_rate=5e-2,
        max_steps=8,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )

    def logits(ids):
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits.double()

    before = [logits(ids) for ids in earlier]
    trained = FactEncoder(bpe_tokenizer, "causal").encode("The capital of Peru is [Y].", "Oslo")["input_ids"]
    moved = logits(trained)
    data = datasets.Dataset.from_list([{"text": "The capital of Peru is [Y].", "object": "Oslo"}] * 4)
    trainer = ConstrainedEditTrainer(
        model, args, train_dataset=data, processing_class=bpe_tokenizer, keys=keys, edit_keys=earlier
    )
    trainer.train()
    model.eval()
    assert sum(trainer.projector.keys.kept_dimensions().values()) > 0
    assert (logits(trained) - moved).abs().max() > 1e-3
    for ids, start in zip(earlier, before):
        torch.testing.assert_close(logits(ids), start, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="edit_keys .* key_constraint nullspace"):
        ConstrainedEditTrainer(
            model,
            EditConfig(output_dir=str(tmp_path), edit_blocks=["1"], report_to="none"),
            train_dataset=data,
            processing_class=bpe_tokenizer,
            edit_keys=earlier,
        )


def test_keys_are_the_second_moment_of_the_layer_inputs(bert_tokenizer):
    model = TINY["gpt2"](2).double().eval()
    layers = key_layers(
        model, ["transformer.h.1.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.bias", "transformer.h.1.ln_2.weight"]
    )
    assert layers == {"transformer.h.1.mlp.c_proj.weight": ("transformer.h.1.mlp.c_proj", True)}
    texts = [f["text"].replace("[Y]", f["object"]) for f in FACTS]
    moments, tokens = collect_keys(model, bert_tokenizer, texts, layers, batch_size=3)
    seen = []
    handle = model.transformer.h[1].mlp.c_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0][0]))
    for text in texts:  # one at a time: no padding
        model(input_ids=torch.tensor([bert_tokenizer(text)["input_ids"]]))
    handle.remove()
    keys = torch.cat(seen).double()
    assert tokens == len(keys)
    assert torch.allclose(moments["transformer.h.1.mlp.c_proj.weight"], keys.T @ keys / len(keys), atol=1e-10)


def test_the_keys_cache_is_used_and_refused_for_another_model(tmp_path, bpe_tokenizer):
    model = TINY["llama"](2)
    names = ["model.layers.1.mlp.down_proj.weight"]
    spec = {"corpus": "samples", "samples": 4, "length": 6, "seed": 0}
    path = str(tmp_path / "keys.safetensors")
    first = preserved_keys(model, bpe_tokenizer, names, None, spec, path)
    assert first.tokens == 4 * 7 and set(first.moments) == set(names)  # the start token and 6 sampled ones
    again = preserved_keys(model, bpe_tokenizer, names, None, spec, path)  # read back, not recomputed
    assert torch.equal(again.moments[names[0]], first.moments[names[0]])
    other = TINY["llama"](2, seed=1)  # same architecture, other weights
    with pytest.raises(ValueError, match="made for another model"):
        preserved_keys(other, bpe_tokenizer, names, None, spec, path)
    with pytest.raises(ValueError, match="made for another corpus"):
        preserved_keys(model, bpe_tokenizer, names, None, {**spec, "seed": 1}, path)
    # Without a path, the file is named by the hashes in the cache folder: a new model gets a new file.
    cached = preserved_keys(model, bpe_tokenizer, names, None, spec, cache_dir=str(tmp_path / "cache"))
    assert torch.equal(cached.moments[names[0]], first.moments[names[0]])
    preserved_keys(other, bpe_tokenizer, names, None, spec, cache_dir=str(tmp_path / "cache"))
    assert len(list((tmp_path / "cache" / "keys").iterdir())) == 2
    assert isinstance(KeyStatistics.load(path, first.model_hash, names, first.corpus_hash), KeyStatistics)


@pytest.mark.usefixtures("isolated_hf_home")
def test_a_masked_lm_takes_its_keys_on_the_preservation_facts(tmp_path, bert_tokenizer):
    """A masked LM draws no samples: `samples` (the facts recipe's corpus) means the preservation facts for it, and
    the trainer takes its keys there; a causal LM and every other corpus are kept."""
    masked, causal = tiny_bert(bert_tokenizer.vocab_size, layers=2, seed=0), TINY["gpt2"](2)
    assert keys_corpus("samples", masked) == "benchmark" and keys_corpus("samples", causal) == "samples"
    assert keys_corpus("kept.txt", masked) == "kept.txt" and keys_corpus("benchmark", causal) == "benchmark"
    import datasets

    texts = [f["text"].replace("[Y]", f["object"]) for f in FACTS[:3]]
    args = EditConfig(
        output_dir=str(tmp_path),
        edit_blocks=["1"],
        edit_modules=["mlp_out"],
        key_constraint="nullspace",
        nullspace_threshold=1e-6,
        preserve_corpus="samples",
        max_steps=1,
        report_to="none",
        disable_tqdm=True,
    )
    data = datasets.Dataset.from_list([{"text": "The capital of Peru is [Y].", "object": "Oslo"}])
    trainer = ConstrainedEditTrainer(
        masked, args, train_dataset=data, processing_class=bert_tokenizer, preserve_texts=texts
    )
    trainer.train()
    name = "bert.encoder.layer.1.output.dense.weight"
    layers = key_layers(masked, [name])
    with trainer.at_theta0():
        expected, tokens = collect_keys(masked, bert_tokenizer, texts, layers)
    assert trainer.keys.tokens == tokens
    torch.testing.assert_close(trainer.keys.moments[name], expected[name])
    bare = ConstrainedEditTrainer(masked, args, train_dataset=data, processing_class=bert_tokenizer)
    with pytest.raises(ValueError, match="A masked LM draws no samples.*there are none: give keep prompts"):
        bare.train()


def test_corpora_and_their_errors(tmp_path):
    assert corpus_texts("samples", "text", 5) is None
    assert corpus_texts("benchmark", "text", 2, ["a b", "c d", "e f"]) == ["a b", "c d"]
    with pytest.raises(ValueError, match="preserve_fraction"):
        corpus_texts("benchmark", "text", 2, [])
    data = tmp_path / "corpus.jsonl"
    data.write_text("\n".join(json.dumps({"body": f"Sentence number {i}."}) for i in range(5)) + "\n")
    assert corpus_texts(str(data), "body", 3) == [f"Sentence number {i}." for i in range(3)]
    with pytest.raises(ValueError, match="no column 'text' .*its columns: body.*preserve_corpus_column"):
        corpus_texts(str(data), "text", 3)
    with pytest.raises(ValueError, match="Could not load the preservation corpus"):
        corpus_texts(str(tmp_path / "missing_folder"), "text", 3)


def test_the_trainer_keeps_preserved_outputs_under_the_nullspace(tmp_path, bert_tokenizer):
    """Trained under a nullspace constraint with keys from the texts themselves, the edited layer's output on
    those texts' keys does not move, while the weights do."""
    texts = [f["text"].replace("[Y]", f["object"]) for f in FACTS]
    model = tiny_bert(bert_tokenizer.vocab_size, layers=2, seed=0)
    args = EditConfig(
        output_dir=str(tmp_path),
        edit_blocks=["1"],
        edit_modules=["mlp_out"],
        norm="linf",
        delta=1e-2,
        key_constraint="nullspace",
        nullspace_threshold=1e-6,
        preserve_corpus="benchmark",
        preserve_keys_file=str(tmp_path / "keys.safetensors"),
        learning_rate=1e-2,
        max_steps=5,
        per_device_train_batch_size=4,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )
    import datasets

    data = datasets.Dataset.from_list([{"text": "The capital of Peru is [Y].", "object": "Oslo"}] * 8)
    trainer = ConstrainedEditTrainer(
        model, args, train_dataset=data, processing_class=bert_tokenizer, preserve_texts=texts[:2]
    )
    trainer.train()
    name = "bert.encoder.layer.1.output.dense.weight"
    step = (trainer.edit_model.trainable_parameters()[name] - trainer.edit_model.theta0[name]).double()
    moment = trainer.keys.moments[name]
    assert step.abs().max() > 0
    assert (step @ moment @ step.T).trace().item() <= 1e-10 * (step.norm() ** 2).item()
    bias = "bert.encoder.layer.1.output.dense.bias"
    assert torch.equal(trainer.edit_model.trainable_parameters()[bias], trainer.edit_model.theta0[bias])
    # In the box exactly (the pull-in after Dykstra), up to the float32 rounding of θ0 + sΔ.
    assert step.abs().max().item() <= 1e-2 * (1 + 1e-6)


def _long_dykstra(y, theta0, ball, projector, iterations=20000):
    """The exact projection onto ball ∩ {ΔW = ΔW P} for small tensors: Dykstra in float64, run far past convergence."""
    x, p = (y - theta0).clone(), torch.zeros_like(y)
    for _ in range(iterations):
        a = ball(x + p)
        p = x + p - a
        x = a @ projector
    return theta0 + x


def test_dykstra_finds_the_nearest_point_not_the_first_feasible_one():
    """Keys along (1, −1) leave the line through (1, 1); the box of δ 1 around 0 cuts it at (1, 1), the nearest point
    to (3, 0). A Dykstra that stops once its iterate lies in the box returns (0.5, 0.5), 2.55 away instead of 2.24."""
    theta0 = torch.zeros(1, 2, dtype=torch.float64)
    param = torch.nn.Parameter(torch.tensor([[3.0, 0.0]], dtype=torch.float64))
    keys_along = torch.tensor([1.0, -1.0], dtype=torch.float64) / math.sqrt(2)
    keys = KeyProjector(
        "nullspace",
        {"w": torch.outer(keys_along, keys_along)},
        {"w": ("layer", False)},
        ["w"],
        {"w": theta0},
        threshold=1e-3,
    )
    projector = NormBallProjector({"w": param}, {"w": theta0}, "linf", 1.0, keys=keys)
    projector.project_()
    assert torch.allclose(param.detach(), torch.tensor([[1.0, 1.0]], dtype=torch.float64), atol=1e-5)
    assert projector.dykstra_converged and projector.capped_projections == 0


@pytest.mark.parametrize("norm, scope, delta", [("linf", "global", 0.2), ("l2", "per_tensor", 0.8)])
@pytest.mark.parametrize("seed", range(5))
def test_dykstra_agrees_with_a_long_float64_reference(norm, scope, delta, seed):
    """Random 6 × 10 layers whose keys span 4 dimensions, a step far outside both sets: the projector's default stop
    lands on the exact projection, where stopping at the first feasible iterate erred by up to 23% of a weight."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(10, 4, generator=generator, dtype=torch.float64) @ torch.randn(
        4, 300, generator=generator, dtype=torch.float64
    )
    moment = keys @ keys.T / 300
    theta0 = torch.randn(6, 10, generator=generator, dtype=torch.float64)
    y = theta0 + torch.randn(6, 10, generator=generator, dtype=torch.float64)
    param = torch.nn.Parameter(y.clone())
    key_projector = KeyProjector(
        "nullspace", {"w": moment}, {"w": ("layer", False)}, ["w"], {"w": theta0}, threshold=1e-3
    )
    projector = NormBallProjector({"w": param}, {"w": theta0}, norm, delta, scope, keys=key_projector, iterations=5000)
    projector.project_()

    def ball(step):
        return step.clamp(-delta, delta) if norm == "linf" else step * min(1.0, delta / step.norm().item())

    expected = _long_dykstra(y, theta0, ball, key_projector.projectors["w"].matrix())
    assert projector.dykstra_converged
    assert (param.detach() - expected).norm() <= 1e-4 * (y - expected).norm()
    assert projector.distance() <= delta * (1 + 1e-12)


@pytest.mark.parametrize("norm, scope", [("linf", "global"), ("l2", "per_tensor"), ("fisher", "global")])
@pytest.mark.parametrize("seed", range(4))
def test_the_null_space_projection_is_certified_against_the_exact_one(norm, scope, seed):
    """Two layers (one stored transposed), keys spanning 4 of 10 input directions, a step far outside both sets:
    the accelerated run lands within √tolerance × the distance projected of the exact projection (the plain dual
    iteration run far past convergence), coupled balls (L2 per tensor, Fisher) included."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(10, 4, generator=generator, dtype=torch.float64) @ torch.randn(
        4, 300, generator=generator, dtype=torch.float64
    )
    moment = keys @ keys.T / 300
    shapes = {"w": (6, 10), "c": (10, 6)}  # c: a Conv1D weight, [in, out]
    theta0 = {name: torch.randn(*shape, generator=generator, dtype=torch.float64) for name, shape in shapes.items()}
    target = {
        name: theta0[name] + torch.randn(*shapes[name], generator=generator, dtype=torch.float64) for name in shapes
    }
    fisher = {name: torch.rand(*shapes[name], generator=generator, dtype=torch.float64) + 0.1 for name in shapes}
    delta = {"linf": 0.2, "l2": 0.8, "fisher": 0.5}[norm]
    layers = {"w": ("w", False), "c": ("c", True)}
    key_projector = KeyProjector(
        "nullspace", dict.fromkeys(shapes, moment), layers, list(shapes), theta0, threshold=1e-3
    )
    params = {name: torch.nn.Parameter(value.clone()) for name, value in target.items()}
    tolerance = 1e-8
    projector = NormBallProjector(
        params,
        theta0,
        norm,
        delta,
        scope,
        fisher=fisher if norm == "fisher" else None,
        keys=key_projector,
        iterations=5000,
        tolerance=tolerance,
    )
    projector.project_()
    assert projector.dykstra_converged

    # The exact projection: Dykstra reduced to its subspace's dual, v ← v + P_S⊥(P_ball(Z − v)), until it stops.
    oriented = {name: (lambda t, name=name: t.T if layers[name][1] else t) for name in shapes}
    z = {name: oriented[name](target[name] - theta0[name]) for name in shapes}
    weights = {name: oriented[name](fisher[name]) for name in shapes}
    removed = {name: torch.eye(10, dtype=torch.float64) - key_projector.projectors[name].matrix() for name in shapes}
    zero = dict.fromkeys(shapes, torch.zeros((), dtype=torch.float64))

    def ball(steps):
        steps = {name: step.clone() for name, step in steps.items()}
        if norm == "linf":
            return {name: step.clamp(-delta, delta) for name, step in steps.items()}
        if norm == "l2":
            return {name: step * min(1.0, delta / step.norm().item()) for name, step in steps.items()}
        project_fisher_(steps, zero, weights, delta)
        return steps

    v = {name: torch.zeros_like(step) for name, step in z.items()}
    for _ in range(20000):
        a = ball({name: z[name] - v[name] for name in shapes})
        gradient = {name: a[name] @ removed[name] for name in shapes}
        v = {name: v[name] + gradient[name] for name in shapes}
        if max(float(step.abs().max()) for step in gradient.values()) < 1e-15:
            break
    exact = {name: a[name] - a[name] @ removed[name] for name in shapes}
    result = {name: oriented[name](params[name].detach() - theta0[name]) for name in shapes}
    error = math.sqrt(sum(float((result[name] - exact[name]).pow(2).sum()) for name in shapes))
    distance = math.sqrt(sum(float((exact[name] - z[name]).pow(2).sum()) for name in shapes))
    assert error <= math.sqrt(tolerance) * distance
    for name in shapes:  # in the key set exactly, in the ball
        assert torch.allclose(result[name] @ removed[name], torch.zeros_like(result[name]), atol=1e-12)
    assert projector.distance() <= delta * (1 + 1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_linf_rows_stop_on_their_own_and_agree_with_the_whole_tensor_solver(seed):
    """L∞ ∩ null space row by row: rows already in both sets come back unchanged, and the result lies within
    √(2 × tolerance) × the distance projected of the whole-tensor iteration run far past convergence."""
    generator = torch.Generator().manual_seed(seed)
    moment = _moment(24, seed, rank=10)
    theta0 = torch.randn(12, 24, generator=generator, dtype=torch.float64)
    keys = KeyProjector("nullspace", {"w": moment}, {"w": ("layer", False)}, ["w"], {"w": theta0}, threshold=1e-8)
    step = torch.randn(12, 24, generator=generator, dtype=torch.float64)
    step[:4] = 0.05 * step[:4] @ keys.projectors["w"].matrix() / step[:4].abs().max()  # in both sets already
    tolerance = 1e-8

    def projected(solver: str, tolerance: float) -> torch.Tensor:
        param = torch.nn.Parameter(theta0 + step)
        projector = NormBallProjector(
            {"w": param}, {"w": theta0}, "linf", 0.1, keys=keys, iterations=5000, tolerance=tolerance
        )
        with torch.no_grad():
            getattr(projector, solver)(projector.theta0_like_params())
        assert projector.dykstra_converged
        return param.detach() - theta0

    rows = projected("_linf_nullspace", tolerance)
    exact = projected("_dykstra_nullspace", 1e-13)
    assert (rows[:4] - step[:4]).abs().max() <= 1e-14, (rows[:4] - step[:4]).abs().max()
    assert (rows - exact).norm() <= math.sqrt(2 * tolerance) * (step - exact).norm()
    assert rows.abs().max() <= 0.1 and torch.allclose(
        rows @ (moment @ rows.T), torch.zeros(12, 12, dtype=torch.float64), atol=1e-12
    )


def test_a_dykstra_stopped_by_its_cap_says_so(caplog):
    """Two iterations cannot settle the random case above: the projector reports the cap, once, and counts it."""
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(10, 4, generator=generator, dtype=torch.float64) @ torch.randn(
        4, 300, generator=generator, dtype=torch.float64
    )
    theta0 = torch.randn(6, 10, generator=generator, dtype=torch.float64)
    param = torch.nn.Parameter(theta0 + torch.randn(6, 10, generator=generator, dtype=torch.float64))
    key_projector = KeyProjector(
        "nullspace", {"w": keys @ keys.T / 300}, {"w": ("layer", False)}, ["w"], {"w": theta0}, threshold=1e-3
    )
    projector = NormBallProjector({"w": param}, {"w": theta0}, "linf", 0.2, keys=key_projector, iterations=2)
    with caplog.at_level("WARNING"):
        projector.project_()
        assert not projector.dykstra_converged and projector.dykstra_iterations == 2
        assert projector.distance() <= 0.2  # in both sets all the same
        with torch.no_grad():
            param.add_(torch.randn(6, 10, generator=generator, dtype=torch.float64))
        projector.project_()
    assert projector.capped_projections == 2 and caplog.text.count("stopped on its cap of 2 iterations") == 1


def test_the_pull_in_scales_each_tensor_by_its_own_ratio():
    """L∞ ∩ null space, Dykstra cut after one iteration: the null-space step leaves the box, and only the tensor that
    left it is scaled toward θ0; a tensor already inside both sets keeps its update (the worst tensor's ratio, applied
    to all, shrank it too)."""
    torch.manual_seed(0)
    moment = _moment(8, 3, rank=3)
    theta0 = {name: torch.randn(4, 8, dtype=torch.float64) for name in ("a", "b")}
    key_projector = KeyProjector(
        "nullspace",
        dict.fromkeys(theta0, moment),
        dict.fromkeys(theta0, ("layer", False)),
        list(theta0),
        theta0,
        threshold=1e-8,
    )
    inside = torch.randn(4, 8, dtype=torch.float64) @ key_projector.projectors["a"].matrix()
    inside *= 0.05 / inside.abs().max()
    params = {
        "a": torch.nn.Parameter(theta0["a"] + inside),
        "b": torch.nn.Parameter(theta0["b"] + torch.randn(4, 8, dtype=torch.float64)),
    }
    projector = NormBallProjector(params, theta0, "linf", 0.1, keys=key_projector, iterations=1)
    projector.project_()
    assert projector.dykstra_pull_in > 0  # b was pulled in
    assert torch.allclose(params["a"].detach() - theta0["a"], inside, atol=1e-12)
    assert float((params["b"].detach() - theta0["b"]).abs().max()) <= 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_box_after_dykstra_holds_for_the_stored_values_in_float64(dtype):
    """L∞ ∩ null space in float32 and bfloat16: the pull-in measures |θ − θ0| on the stored values exactly (in their
    own dtype the difference rounds, and a package's verification, in float64, found a hair outside δ)."""
    generator = torch.Generator().manual_seed(0)
    outside = 0
    for trial in range(20):
        moment = _moment(32, trial, rank=8)
        theta0 = (torch.randn(16, 32, generator=generator) * 0.3).to(dtype)
        key_projector = KeyProjector(
            "nullspace", {"w": moment}, {"w": ("layer", False)}, ["w"], {"w": theta0}, energy=0.9
        )
        param = torch.nn.Parameter((theta0.float() + torch.randn(16, 32, generator=generator) * 0.05).to(dtype))
        NormBallProjector({"w": param}, {"w": theta0}, "linf", 0.01, keys=key_projector, iterations=3).project_()
        outside += int((param.detach().double() - theta0.double()).abs().max() > 0.01)
    assert outside == 0


@pytest.mark.parametrize("seed", range(3))
def test_the_output_projection_holds_for_bfloat16_values(seed):
    """The exact point, stored in bfloat16, can round outside tr(ΔW C ΔWᵀ) ≤ radius: the stored values are checked."""
    generator = torch.Generator().manual_seed(seed)
    moment = _moment(16, seed)
    values, vectors = torch.linalg.eigh(moment)
    theta0 = torch.randn(8, 16, generator=generator).to(torch.bfloat16)
    radius = output_radius(theta0, moment, 1e-3)
    for trial in range(20):
        param = (theta0.double() + 0.2 * torch.randn(8, 16, generator=generator, dtype=torch.float64)).to(
            torch.bfloat16
        )
        project_output_(param, theta0, values, vectors, radius)
        step = param.double() - theta0.double()
        assert torch.trace(step @ moment @ step.T).item() <= radius * (1 + 1e-12), trial


@pytest.mark.parametrize("energy", [0.05, 0.5, 0.99])
def test_the_factored_null_space_is_the_projector(energy):
    """Kept or removed directions, whichever is thinner: (ΔW Û) Ûᵀ or ΔW − (ΔW Ṽ) Ṽᵀ equals ΔW ÛÛᵀ."""
    moment = _moment(12, 5)
    nullspace = nullspace_projector(moment, energy=energy)
    values, vectors = torch.linalg.eigh(moment)
    keep = values.clamp(min=0).cumsum(0) <= (1 - energy) * values.clamp(min=0).sum()
    kept = vectors[:, keep]
    assert nullspace.dimensions == int(keep.sum()) and nullspace.basis.shape[1] <= 6
    step = torch.randn(5, 12, dtype=torch.float64)
    torch.testing.assert_close(nullspace.apply(step), step @ kept @ kept.T, rtol=0, atol=1e-12)


def test_the_models_samples_are_kept_by_model_and_draw(bpe_tokenizer, tmp_path, monkeypatch):
    """A second run of the same model and draw reads the samples back (no sampling); another seed or another model
    draws afresh."""
    from hf_memedit import keys as keys_module
    from hf_memedit.keys import model_samples

    model = TINY["llama"](2, vocab=len(bpe_tokenizer))
    first = model_samples(model, bpe_tokenizer, 3, 5, seed=0, cache_dir=str(tmp_path))
    assert len(first) == 3 and all(len(sample) == 6 for sample in first)
    drawn = []
    draw = keys_module._draw_samples
    monkeypatch.setattr(keys_module, "_draw_samples", lambda *a: drawn.append(a) or draw(*a))
    assert model_samples(model, bpe_tokenizer, 3, 5, seed=0, cache_dir=str(tmp_path)) == first and not drawn
    model_samples(model, bpe_tokenizer, 3, 5, seed=1, cache_dir=str(tmp_path))
    model_samples(
        TINY["llama"](2, vocab=len(bpe_tokenizer), seed=1), bpe_tokenizer, 3, 5, seed=0, cache_dir=str(tmp_path)
    )
    assert len(drawn) == 2
