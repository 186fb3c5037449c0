"""The merge engine in both modes: every method's candidate is the streamed export, bit for bit, and magnitude
selections are exactly a full sort's (mergekit's top-k count and tie order), on the tiny zoo and on a bf16 model
whose tensors span several chunks and whose task vectors are full of ties (bf16 differences)."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from evomerge.io import load_state_dict, tensor_group, write_sharded
from evomerge.merge import Materializer, write_model
from evomerge.merge.materialize import group_params, marked_positions
from evomerge.merge.methods import METHODS, apply, magnitude_keep
from evomerge.merge.parents import ANCHOR_STRIDE, CPU_CHUNK
from evomerge.recipe import Recipe

PARAMS = {
    "linear": {}, "passthrough": {}, "task_arithmetic": {}, "ties": {"density": [0.37, 0.81]},
    "dare_ties": {"density": [0.3, 0.6]}, "dare_linear": {"density": [0.5, 0.7]},
    "breadcrumbs": {"density": [0.6, 0.45], "gamma": [0.05, 0.2]},
    "breadcrumbs_ties": {"density": [0.5, 0.9], "gamma": [0.1, 0.0]},
    "della": {"density": [0.5, 0.6], "epsilon": [0.2, 0.1]}, "della_linear": {"density": [0.4, 0.5], "epsilon": [0.1, 0.3]},
    "slerp": {}, "model_stock": {},
}


def recipe_for(method: str, base: str, parents: list[str], groups: list[str], dtype: str, **options) -> Recipe:
    if method == "slerp":
        return Recipe(method, parents[:1], {g: {"t": [0.2 + 0.1 * i]} for i, g in enumerate(groups)}, base,
                      dtype=dtype, seed=5)
    values = {g: {"weight": [0.3 + 0.1 * i, 0.9 - 0.1 * i], **PARAMS[method]} for i, g in enumerate(groups)}
    if method == "model_stock":
        values = {g: {} for g in groups}
    if method == "passthrough":
        values = {g: {"weight": [0.0, 1.5] if i % 2 else [1.0, 0.0]} for i, g in enumerate(groups)}
    return Recipe(method, parents, values, base if METHODS[method].uses_base or method == "linear" else None,
                  dtype=dtype, seed=5, options=options)


@pytest.fixture(scope="module")
def bf16_zoo(tmp_path_factory, tiny):
    """base + 2 parents in bf16, Llama-shaped, an embedding of 2 chunks and a bit; parents differ from the base by a
    few bf16 steps, so |delta| takes few distinct values (ties everywhere) and some tensors are untouched (zeros)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("bf16")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
              "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
              "vocab_size": (2 * CPU_CHUNK + 4096) // 128, "max_position_embeddings": 64, "tie_word_embeddings": False,
              "dtype": "bfloat16"}
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(LlamaConfig(**config)).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    base = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    paths = []
    for i, name in enumerate(["base", "p0", "p1"]):
        d = root / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny / "base" / f, d / f)
        sd = {k: v if i == 0 or "norm" in k else (v.float() + torch.randn(v.shape, generator=g) * 0.004).to(
            torch.bfloat16) for k, v in base.items()}
        write_sharded(d, ((k, shapes[k], torch.bfloat16) for k in shapes), sd.__getitem__, max_shard_bytes=3_000_000)
        paths.append(str(d))
    return paths[0], paths[1:]


def zoos(tiny, bf16_zoo):
    return {"tiny": (str(tiny / "base"), [str(tiny / "up"), str(tiny / "rot")]), "bf16": bf16_zoo}


@pytest.mark.parametrize("mode", ["resident", "streaming"])
def test_dellas_row_rank_table_is_each_rows_stable_sort_of_the_task_vectors(mode, bf16_zoo):
    base, parents = bf16_zoo
    mat = Materializer(base, parents, mode=mode)
    mat.prepare(METHODS["della"])
    assert mat.ranks.nbytes == 2 * len(parents) * sum(math.prod(shape) for shape in mat.shapes.values())
    b = load_state_dict(base)
    for i, p in enumerate(load_state_dict(q) for q in parents):
        for name, planes in mat.ranks.table.items():
            delta = (p[name].float() - b[name].float()).reshape(-1, p[name].shape[-1])
            order = torch.argsort(delta.abs(), dim=1, stable=True)
            ranks = planes[i][0].long() * 256 + planes[i][1].long()
            assert torch.equal(ranks.reshape(delta.shape).gather(1, order),
                               torch.arange(delta.shape[1]).expand_as(order)), name


@pytest.mark.parametrize("zoo", ["tiny", "bf16"])
@pytest.mark.parametrize("mode", ["resident", "streaming"])
def test_every_methods_candidate_is_the_streamed_export_bit_for_bit(zoo, mode, tiny, bf16_zoo, tmp_path):
    base, parents = zoos(tiny, bf16_zoo)[zoo]
    mat = Materializer(base, parents, mode=mode)
    for method in METHODS:
        options = {"rescale_mode": "l1"} if method == "dare_linear" else {}
        recipe = recipe_for(method, base, parents, mat.groups, mat.dtype, **options)
        if recipe.base != base or recipe.parents != parents:
            candidate = Materializer(recipe.base, recipe.parents, mode=mode).materialize(recipe).state_dict()
        else:
            candidate = mat.materialize(recipe).state_dict()
        exported = load_state_dict(write_model(recipe, tmp_path / method))
        for k, v in exported.items():
            assert torch.equal(candidate[k], v), (method, k)


@pytest.mark.parametrize("chunk", [None, 1000])
@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_magnitude_selection_is_a_full_sorts_top_k_with_its_tie_order(method, chunk, bf16_zoo):
    base, parents = bf16_zoo
    mat = Materializer(base, parents, dtype="float32", mode="streaming")
    mat.store.chunk = chunk or mat.store.chunk  # 1000: brackets whose entries span many chunks
    recipe = recipe_for(method, base, parents, mat.groups, "float32")
    model = mat.materialize(recipe).state_dict()
    m = METHODS[method]
    sds = [load_state_dict(p) for p in [base, *parents]]
    ties_seen = 0
    for name, shape in mat.shapes.items():
        b = sds[0][name].float().reshape(-1)
        deltas = torch.stack([sd[name].float().reshape(-1) for sd in sds[1:]]) - b
        params = group_params(m, recipe.groups[tensor_group(name)], 2, torch.device("cpu"))
        keep = magnitude_keep(deltas, *m.select(math.prod(shape), params["density"], params.get("gamma")))
        expected = apply(m, b, deltas, params, {"keep": keep}, recipe.options)
        assert torch.equal(model[name].reshape(-1), expected), name
        ties_seen += int(deltas.abs().unique().numel() < deltas.shape[1] // 2)
    assert ties_seen > 0


def test_a_rank_inside_a_group_of_equal_magnitudes_is_keyed_by_its_position_before_the_merge(bf16_zoo):
    """The index's anchors into each group (every ANCHOR_STRIDE-th member) give such a key exactly, with no merge pass: the
    position a full stable sort puts at that rank, also for members far past the group's first anchor."""
    base, parents = bf16_zoo
    mat = Materializer(base, parents, dtype="float32", mode="streaming")
    mat.store.chunk = 1000  # anchors counted across many chunks, scans a chunk at a time
    mat.prepare(METHODS["ties"])
    sds = [load_state_dict(p) for p in [base, *parents]]
    far = 0
    for name, shape in mat.shapes.items():
        m = math.prod(shape)
        deltas = torch.stack([sd[name].float().reshape(-1) for sd in sds[1:]]) - sds[0][name].float().reshape(-1)
        a = deltas.abs()
        order = torch.argsort(a, dim=1, stable=True)
        ranks = torch.tensor([[m // 5, m // 2, 4 * m // 5]] * 2)
        selection = mat.index.select(name, m, ranks)
        for i, t in ((i, t) for i in range(2) for t in range(3) if (i, t) not in selection.marked):
            if selection.values[i, t] > 0:
                j = order[i, ranks[i, t]]
                assert (selection.values[i, t], selection.positions[i, t]) == (a[i, j], j), (name, i, t)
                far += int(ranks[i, t] - (a[i] < a[i, j]).sum()) >= 512
    assert far > 0


def test_every_member_of_a_group_is_keyed_by_a_scan_from_the_nearer_anchor(bf16_zoo):
    """A member past halfway to the group's next anchor is found scanning back from that anchor (the last stretch
    ends at the tensor's end): every such member, on both sides of halfway and in the last stretch, gets the position
    a full stable sort puts at its rank."""
    base, parents = bf16_zoo
    mat = Materializer(base, parents, dtype="float32", mode="streaming")
    mat.store.chunk = 1000  # scans a step of 1000 entries at a time, forwards and backwards
    mat.prepare(METHODS["ties"])
    name = "model.embed_tokens.weight"
    sds = [load_state_dict(p) for p in [base, *parents]]
    a = (sds[1][name].float() - sds[0][name].float()).reshape(-1).abs()
    values, counts = a[a > 0].unique(return_counts=True)
    # whole stretches between anchors, and a last one past half a stretch: its end is the tensor's
    fit = (counts > 3 * ANCHOR_STRIDE) & (counts % ANCHOR_STRIDE > ANCHOR_STRIDE // 2)
    value, size = values[fit][counts[fit].argmax()], int(counts[fit].max())
    first = int((a < value).sum())
    step, half = ANCHOR_STRIDE, ANCHOR_STRIDE // 2  # members around halfway, at the anchors and in the last stretch
    ordinals = torch.cat([torch.arange(0, size, 97), torch.tensor([half - 1, half, step - 1, step, step + half - 1,
                                                                   step + half, size - 2, size - 1])])
    selection = mat.index.select(name, a.numel(), (first + ordinals).repeat(2, 1))
    order = torch.argsort(a, stable=True)
    for t, ordinal in enumerate(ordinals.tolist()):
        assert (0, t) not in selection.marked
        assert (selection.values[0, t], selection.positions[0, t]) == (value, order[first + ordinal]), ordinal


@pytest.mark.parametrize("mode", ["resident", "streaming"])
def test_a_merge_never_writes_to_its_parents(mode, bf16_zoo, tmp_path):
    """fp32 parents full of ties (the bf16 zoo's values, stored in fp32): `.float()` of a parent is the parent itself,
    so any in-place step on it would change the parents — and the next candidate, which must be the same."""
    paths = []
    for src in [bf16_zoo[0], *bf16_zoo[1]]:
        sd = {k: v.float() for k, v in load_state_dict(src).items()}
        d = tmp_path / os.path.basename(src)
        shutil.copytree(src, d, ignore=shutil.ignore_patterns("*.safetensors*"))
        write_sharded(d, ((k, tuple(v.shape), torch.float32) for k, v in sd.items()), sd.__getitem__)
        paths.append(str(d))
    mat = Materializer(paths[0], paths[1:], mode=mode)
    before = [{k: v.clone() for k, v in m.items()} for m in mat.store.models]
    recipe = recipe_for("ties", paths[0], paths[1:], mat.groups, "float32")
    first = {k: v.clone() for k, v in mat.materialize(recipe).state_dict().items()}
    assert all(torch.equal(v, before[i][k]) for i, m in enumerate(mat.store.models) for k, v in m.items())
    again = mat.materialize(recipe).state_dict()
    assert all(torch.equal(again[k], v) for k, v in first.items())


@pytest.mark.parametrize("length, marks", [(1000, 0), (1000, 1), (4096, 30), (5003, 400), (77, 77)])
def test_a_chunks_marks_are_found_in_position_order(length, marks):
    """Marks are counts (0, 1, 2, ...) in a float mask; the blocks' search gives what nonzero gives, tail included."""
    g = torch.Generator().manual_seed(length + marks)
    mask = torch.zeros(length)
    mask[torch.randperm(length, generator=g)[:marks]] = torch.randint(1, 4, (marks,), generator=g).float()
    assert torch.equal(marked_positions(mask), mask.nonzero().squeeze(1))


def test_candidate_dtype_is_the_parents_unless_asked(bf16_zoo):
    base, parents = bf16_zoo
    assert Materializer(base, parents, mode="streaming").model.dtype == torch.bfloat16
    assert Materializer(base, parents, dtype="float32", mode="streaming").model.dtype == torch.float32


_FALLBACK = """
import sys, warnings
from safetensors.torch import save_file
from evomerge.merge import Materializer
from evomerge.recipe import Recipe
base, up, rot, out = sys.argv[1:]
mat = Materializer(base, [up, rot], compile=True)
groups = {g: {"weight": [0.6, 0.8], "density": [0.4, 0.7]} for g in mat.groups}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = mat.materialize(Recipe("ties", [up, rot], groups, base, dtype=mat.dtype))
print([str(w.message) for w in caught if "torch.compile failed" in str(w.message)])
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
"""


def test_a_kernel_that_fails_to_compile_falls_back_to_eager_with_a_warning(tiny, tmp_path):
    """No C++ compiler that works (CXX=/bin/false): the first call warns once and the candidate is the eager one."""
    base, up, rot = (str(tiny / m) for m in ("base", "up", "rot"))
    env = {**os.environ, "CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    r = subprocess.run([sys.executable, "-c", _FALLBACK, base, up, rot, str(tmp_path / "c.safetensors")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "torch.compile failed for ties" in r.stdout.splitlines()[-1]
    mat = Materializer(base, [up, rot], compile=False)
    groups = {g: {"weight": [0.6, 0.8], "density": [0.4, 0.7]} for g in mat.groups}
    eager = mat.materialize(Recipe("ties", [up, rot], groups, base, dtype=mat.dtype)).state_dict()
    for k, v in load_file(tmp_path / "c.safetensors").items():
        assert torch.equal(eager[k], v), k
