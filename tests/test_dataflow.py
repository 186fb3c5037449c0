"""Data-flow merging: zero-copy layer paths, their export as a plain model, the dfs / ps+dfs spaces and optimizers."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from evomerge.config import ConfigError
from evomerge.dataflow import Dataflow, PathError, check_foldable, steps_of, write_path_model
from evomerge.executors import LocalExecutor
from evomerge.io import inspect_model
from evomerge.optimizers import CatCMA, Optimizer, create_optimizer
from evomerge.recipe import Recipe
from evomerge.spaces import DataflowSpace, Range
from evomerge.study import Study
from evomerge.studyfile import load_study

from .conftest import TINY, evomerge, write_study

UP, ROT = str(TINY / "up"), str(TINY / "rot")
# a path that uses `rot`'s layer 2 twice (two KV-cache slots for one source layer) and mixes both parents
PATH = {"layers": [[0, 0], [0, 1], [1, 2], [1, 2], [0, 1], [0, 3]], "scales": [1.0, 1.3, 0.6, 1.2, 0.8, 1.4]}
IDS = torch.tensor([[5, 40, 41, 42, 43, 44, 6, 7, 8, 9], [5, 50, 52, 54, 56, 58, 60, 62, 64, 66]])


@pytest.fixture(scope="module")
def flow() -> Dataflow:
    return Dataflow(UP)


def recipe(path: dict) -> Recipe:
    return Recipe("passthrough", [UP, ROT], {}, path=path)


def copied_model(flow: Dataflow, path: dict) -> torch.nn.Module:
    """The reference: a standard Llama with the path's layers deep-copied into it in order (unscaled paths only)."""
    models = flow.sources(recipe(path))
    config = copy.deepcopy(models[0].config)
    config.num_hidden_layers = len(path["layers"])
    ref = AutoModelForCausalLM.from_config(config)
    state = {k: v for k, v in models[0].state_dict().items() if ".layers." not in k}
    for k, (m, layer) in enumerate(path["layers"]):
        for name, t in models[m].model.layers[layer].state_dict().items():
            state[f"model.layers.{k}.{name}"] = t.clone()
    ref.load_state_dict(state)
    return ref.eval()


@torch.no_grad()
def test_path_model_gives_the_logits_of_a_materialized_copy(flow):
    unscaled = {"layers": PATH["layers"]}
    got = flow.apply(recipe(unscaled))(IDS).logits
    want = copied_model(flow, unscaled)(IDS).logits
    # same modules, same operations in the same order: equal to float32 rounding
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@torch.no_grad()
def test_path_model_copies_no_weights(flow):
    model = flow.apply(recipe(PATH))
    rot_layer2 = flow.sources(recipe(PATH))[1].model.layers[2]
    assert model.model.layers[2].layer is rot_layer2 and model.model.layers[3].layer is rot_layer2
    assert model.model.embed_tokens is flow.source(UP).model.embed_tokens


@torch.no_grad()
def test_generation_with_kv_cache_equals_generation_without(flow):
    model = flow.apply(recipe(PATH))
    with_cache = model.generate(IDS[:, :4], max_new_tokens=10, do_sample=False, use_cache=True)
    without = model.generate(IDS[:, :4], max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)


@torch.no_grad()
def test_each_path_position_has_its_own_cache_slot(flow):
    out = flow.apply(recipe(PATH))(IDS, use_cache=True)
    assert len(out.past_key_values.layers) == len(PATH["layers"])
    k2, k3 = out.past_key_values.layers[2].keys, out.past_key_values.layers[3].keys
    assert not torch.allclose(k2, k3)  # same source layer, different inputs -> different keys


@torch.no_grad()
def test_exported_model_matches_the_path_with_scales_folded(flow, tmp_path):
    want = flow.apply(recipe(PATH))(IDS).logits
    write_path_model(recipe(PATH), tmp_path / "out")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=False).eval()
    assert plain.config.num_hidden_layers == len(PATH["layers"]) and type(plain).__name__ == "LlamaForCausalLM"
    # folding is exact but for RMSNorm's eps (1e-6 against mean squares ~1) and float32 rounding of the divided
    # weights: logits of magnitude ~10 agree to 1e-4
    torch.testing.assert_close(plain(IDS).logits, want, rtol=0, atol=1e-4)


@torch.no_grad()
def test_lm_eval_scores_the_path_like_its_exported_model(flow, tmp_path):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(UP)
    write_path_model(recipe(PATH), tmp_path / "out")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    lms = [HFLM(pretrained=m, tokenizer=tok, batch_size=4, device="cpu") for m in (flow.apply(recipe(PATH)), plain)]
    prompts = ["up:abc=", "rot:xyz=", "up:hello=", "rot:ab="]
    ll = [Instance("loglikelihood", {}, (p, "ABC"), i) for i, p in enumerate(prompts)]
    gen = [Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}), i)
           for i, p in enumerate(prompts)]
    (path_ll, plain_ll), (path_gen, plain_gen) = [lm.loglikelihood(ll) for lm in lms], [lm.generate_until(gen) for lm in lms]
    assert path_gen == plain_gen
    assert [b for _, b in path_ll] == [b for _, b in plain_ll]
    assert [a for a, _ in path_ll] == pytest.approx([a for a, _ in plain_ll], abs=1e-4)


def test_fold_refuses_post_norm_architectures():
    config = AutoConfig.for_model("gemma2")
    with pytest.raises(PathError, match="post-norm"):
        check_foldable(config)


def test_empty_path_is_refused():
    with pytest.raises(PathError, match="empty"):
        steps_of({"layers": [], "scales": []})


def test_published_layout_dimension_and_fixed_ends():
    space = DataflowSpace(parents=[UP, ROT], num_layers=[4, 4], scale=Range(0.4, 1.5), repeats=3)
    assert space.dimension == 2 * 8 * 3
    everything = space.decode([1.0] * 24 + [0.0] * 24)
    assert everything.path["layers"][0] == [0, 0] and everything.path["layers"][-1] == [0, 3]
    assert len(everything.path["layers"]) == 24 + 2 and min(everything.path["scales"][1:-1]) == pytest.approx(0.4)
    nothing = space.decode([0.0] * 24 + [0.5] * 24)
    assert nothing.path["layers"] == [[0, 0], [0, 3]]


def test_search_starts_at_model_a_own_unscaled_path():
    space = DataflowSpace(parents=[UP, ROT], num_layers=[4, 4], scale=Range(0.4, 1.5), repeats=3)
    assert space.decode(space.x0()).path == space.identity(0).path == {
        "layers": [[0, 0], [0, 1], [0, 2], [0, 3]], "scales": [1.0] * 4}


def test_positions_layout_has_the_smm_bench_shape():
    space = DataflowSpace(parents=["a", "b"], num_layers=[32, 32], scale=Range(0.4, 1.5), layout="positions")
    cats = space.categories()
    assert sum(c == 3 for c in cats) == 32 and sum(c == 0 for c in cats) == 63 and space.dimension == 95
    genome = [0.1] * 16 + [0.5] * 8 + [0.9] * 8 + [1.0] * 63  # A for depths 0-15, B for 16-23, skip 24-31
    path = space.decode(genome).path
    assert path["layers"] == [[0, k] for k in range(16)] + [[1, k] for k in range(16, 24)]
    assert path["scales"][0] == 1.0 and path["scales"][1:] == [1.5] * 23


def test_catcma_genomes_decode_and_resume_identically():
    space = DataflowSpace(parents=[UP, ROT], num_layers=[4, 4], scale=Range(0.4, 1.5), repeats=1)
    opt = create_optimizer("catcma", dimension=space.dimension, categories=space.categories(), seed=3, popsize=6)
    genomes = opt.ask(0)
    assert len(genomes) == 6 and all(space.decode(g).path for g in genomes)
    opt.tell(genomes, [float(i) for i in range(6)])
    resumed = Optimizer.from_state(opt.state())
    assert isinstance(resumed, CatCMA) and resumed.ask(1) == opt.ask(1)


def test_catcma_refuses_a_space_without_choices():
    with pytest.raises(ValueError, match="CatCMA needs"):
        create_optimizer("catcma", dimension=4, categories=[0, 0, 0, 0], seed=0)


def test_scale_range_with_low_above_high_is_a_config_error(tmp_path):
    path = write_study(tmp_path, search_space={"preset": "dfs", "scale": {"low": 1.5, "high": 0.4}})
    with pytest.raises(ConfigError, match=r"search_space\.scale.*must not exceed"):
        load_study(path)


def test_parents_with_different_hidden_sizes_are_refused_before_the_study_starts(tmp_path):
    config = AutoConfig.from_pretrained(UP)
    config.hidden_size, config.head_dim = 64, 16
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "narrow")
    path = write_study(tmp_path, search_space="dfs")
    data = yaml.safe_load(path.read_text())
    data["models"]["parents"] = [UP, str(tmp_path / "narrow")]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"models\.parents.*hidden_size is 64 but 128"):
        Study(load_study(path), storage=f"sqlite:///{tmp_path / 'x.db'}")
    assert not (tmp_path / "x.db").exists()


def test_merge_of_an_empty_path_exits_2(tmp_path):
    bad = recipe({"layers": [], "scales": []})
    bad.save(tmp_path / "r.yaml")
    res = evomerge("merge", tmp_path / "r.yaml", tmp_path / "out")
    assert res.returncode == 2 and "path.layers" in res.stderr and "empty" in res.stderr
    assert not (tmp_path / "out").exists()


def _dfs_study(tmp: Path, **over) -> Path:
    settings = {"search_space": {"preset": "dfs", "repeats": 1}, "budget": 4,
                "optimizer": {"name": "catcma", "popsize": 4}, "fitness": _small_fitness(), **over}
    return write_study(tmp, **settings)


def _small_fitness() -> dict:
    data = yaml.safe_load((TINY / "study.yaml").read_text())["fitness"]
    return {**data, "include_path": str(TINY.parent.parent / "fitness" / "tiny"), "limit": 10}


def test_non_finite_logits_fail_a_path_whose_first_model_is_not_the_shells_template(tmp_path):
    """The base row of a DFS final table runs the base's own layers and head; a broken base must fail that
    evaluation, not score, although the worker's shell was built from the first parent."""
    executor = LocalExecutor(load_study(_dfs_study(tmp_path)))
    base = executor.cfg.models.base
    layers = [[0, i] for i in range(inspect_model(base).num_layers)]
    with torch.no_grad():
        executor.worker.resident.engine.source(base).lm_head.weight.fill_(float("nan"))
    result = executor.evaluate(Recipe("passthrough", [base], {}, path={"layers": layers}), "test")
    assert result.score is None and "logits are not finite" in result.error


def test_a_dfs_study_needs_no_base_model_whatever_merge_method_it_names(tmp_path):
    """A data-flow search never merges, so the task-vector methods' need for a base does not apply to it."""
    path = _dfs_study(tmp_path, merge={"method": "ties"},
                      models={"parents": [str(TINY / "up"), str(TINY / "rot")]})
    cfg = load_study(path)
    assert cfg.models.base is None and cfg.search_space.kind == "dfs"


def test_dfs_study_runs_and_its_best_exports_to_a_plain_model(tmp_path):
    path = _dfs_study(tmp_path)
    res = evomerge("run", path)
    assert res.returncode == 0, res.stderr
    assert "search space dfs (passthrough): dimension 16" in res.stdout
    assert "parent up" in res.stdout and "evolved best" in res.stdout
    assert evomerge("export", path, "-o", tmp_path / "best.yaml").returncode == 0
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    res = evomerge("merge", tmp_path / "best.yaml", tmp_path / "model")
    assert res.returncode == 0, res.stderr
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code=False)
    assert plain.config.num_hidden_layers == len(best["path"]["layers"])


def test_the_report_of_a_dfs_study_draws_its_winning_path(tmp_path):
    from typer.testing import CliRunner

    from evomerge.cli import app

    path = _dfs_study(tmp_path)
    cfg = load_study(path)
    Study(cfg, executor=LocalExecutor(cfg)).run(4)
    r = CliRunner().invoke(app, ["report", str(path), "-o", str(tmp_path / "report")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "report" / "path.png").stat().st_size > 5_000
    assert "![path](path.png)" in (tmp_path / "report" / "summary.md").read_text()


def test_ps_dfs_study_takes_model_a_from_the_best_of_a_ps_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    ps = load_study(write_study(tmp_path, budget=2, fitness=_small_fitness()))
    Study(ps, storage).run()
    (tmp_path / "psdfs").mkdir()
    psdfs_file = _dfs_study(tmp_path / "psdfs", study="tiny-psdfs", search_space={"preset": "ps+dfs", "repeats": 1},
                            budget=2)
    data = yaml.safe_load(psdfs_file.read_text())
    data["models"]["a_from_study"] = ps.study
    psdfs_file.write_text(yaml.safe_dump(data))
    study = Study(load_study(psdfs_file), storage)
    assert study.space.kind == "ps+dfs" and study.space.dimension == 2 * 12
    assert study.space.a == Study(ps, storage).best_recipe().to_dict()
    study.run()
    rows = {r["model"]: r for r in study.final_table()}
    assert rows["model A (best of tiny-ps)"]["test"] is not None and "evolved best" in rows


def test_ps_dfs_without_the_ps_study_is_a_config_error(tmp_path):
    path = _dfs_study(tmp_path, search_space={"preset": "ps+dfs"})
    data = yaml.safe_load(path.read_text())
    data["models"]["a_from_study"] = "nowhere"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"models\.a_from_study.*not in this study's storage"):
        Study(load_study(path), storage=f"sqlite:///{tmp_path / 'y.db'}")
    assert not (tmp_path / "y.db").exists()
