"""`evomerge merge`: streamed, sharded export; the output directory and its model card; out-of-core memory."""
import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from evomerge import __version__
from evomerge.io import load_state_dict, write_sharded
from evomerge.merge import Materializer, write_model
from evomerge.merge.materialize import model_card
from evomerge.recipe import Recipe
from tests.conftest import evomerge

GROUPS = ["embed", "layers.0", "layers.1", "layers.2", "layers.3", "head"]


def layered(method, weights_by_layer, **extra):
    return {g: {"weight": list(w), **extra} for g, w in zip(GROUPS, weights_by_layer)}


@pytest.fixture(scope="module")
def licensed_zoo(tmp_path_factory, tiny):
    """The tiny zoo with model cards stating licenses (one parent states none)."""
    root = tmp_path_factory.mktemp("zoo")
    for name, license in (("base", "apache-2.0"), ("up", "mit"), ("rot", None)):
        shutil.copytree(tiny / name, root / name)
        if license:
            (root / name / "README.md").write_text(f"---\nlicense: {license}\n---\n# {name}\n")
    return root


def test_export_equals_the_candidate_the_search_scored(tmp_path, tiny):
    groups = layered("ties", [[0.3, 0.9], [1.0, 0.2], [0.5, 0.5], [0.7, 0.1], [0.2, 0.8], [0.6, 0.6]],
                     density=[0.4, 0.7])
    recipe = Recipe("ties", [str(tiny / "up"), str(tiny / "rot")], groups, str(tiny / "base"))
    model = Materializer(recipe.base, recipe.parents).materialize(recipe)
    write_model(recipe, tmp_path / "out")
    exported = load_state_dict(tmp_path / "out")
    assert all(torch.allclose(model.state_dict()[k], v, atol=1e-6) for k, v in exported.items())


def test_dare_export_reproduces_the_candidates_random_drops(tmp_path, tiny):
    groups = {g: {"weight": [0.8, 0.6], "density": [0.3, 0.5]} for g in GROUPS}
    recipe = Recipe("dare_ties", [str(tiny / "up"), str(tiny / "rot")], groups, str(tiny / "base"), seed=11)
    model = Materializer(recipe.base, recipe.parents).materialize(recipe)
    write_model(recipe, tmp_path / "out")
    exported = load_state_dict(tmp_path / "out")
    assert all(torch.allclose(model.state_dict()[k], v, atol=1e-6) for k, v in exported.items())


def test_output_directory_has_shards_index_config_tokenizer_and_model_card(tmp_path, licensed_zoo):
    z = licensed_zoo
    recipe = Recipe("task_arithmetic", [str(z / "up"), str(z / "rot")],
                    {g: {"weight": [0.5, 0.5]} for g in GROUPS}, str(z / "base"), dtype="bfloat16")
    out = write_model(recipe, tmp_path / "merged", max_shard_bytes=400_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    with safe_open(shards[0], framework="pt") as st:
        assert st.get_tensor(next(iter(st.keys()))).dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "tokenizer.json").is_file() and (out / "recipe.yaml").is_file()
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == ["base", "up", "rot"] and "license" not in front  # licenses differ
    assert "| base | `base`" in card and "apache-2.0" in card and "| mit |" in card and "not stated" in card
    assert str(licensed_zoo) not in card.split("## Recipe")[0]  # parents by name, never by local path
    assert f"evomerge {__version__}" in card and "method: task_arithmetic" in card
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16


def test_bf16_parents_merge_in_fp32_and_write_the_requested_dtype(tmp_path, tiny):
    for name in ("base", "up", "rot"):
        shutil.copytree(tiny / name, tmp_path / name)
        sd = {k: v.to(torch.bfloat16) for k, v in load_state_dict(tiny / name).items()}
        write_sharded(tmp_path / name, ((k, tuple(v.shape), v.dtype) for k, v in sd.items()), sd.__getitem__)
    recipe = Recipe("task_arithmetic", [str(tmp_path / "up"), str(tmp_path / "rot")],
                    {g: {"weight": [0.5, 0.5]} for g in GROUPS}, str(tmp_path / "base"), dtype="float32")
    out = load_state_dict(write_model(recipe, tmp_path / "out"))
    name = "model.layers.0.mlp.up_proj.weight"
    b, u, r = (load_state_dict(tmp_path / n)[name].float() for n in ("base", "up", "rot"))
    assert out[name].dtype == torch.float32
    assert torch.allclose(out[name], b + 0.5 * (u - b) + 0.5 * (r - b), atol=1e-6)


_CHILD = textwrap.dedent("""
    import sys, torch
    from evomerge.merge import write_model
    from evomerge.merge.plan import AnonPeak, rss_anon
    from evomerge.recipe import Recipe
    from transformers import AutoTokenizer
    root = sys.argv[1]
    AutoTokenizer.from_pretrained(root + "/base")  # the interpreter, torch and transformers: not the merge's memory
    torch.ones(4) + torch.ones(4)
    baseline = rss_anon()
    groups = {g: {"weight": [0.6, 0.5], "density": [0.5, 0.5]} for g in ["embed", "layers.0", "layers.1", "head"]}
    recipe = Recipe("dare_ties", [root + "/p0", root + "/p1"], groups, root + "/base")
    with AnonPeak() as peak:
        write_model(recipe, root + "/out", max_shard_bytes=100_000_000)
    print(baseline // 1024, peak.peak // 1024)
""")


def test_merge_streams_a_model_several_times_larger_than_its_peak_memory(tmp_path, tiny):
    """400 MB of fp32 weights per model (3 models, tensors of 2 MB): the merge's anonymous memory above the
    interpreter's stays below a quarter of one model -- it scales with the largest tensor, not with the model (the
    parents are mapped: their pages are the page cache's)."""
    names = [("model.embed_tokens.weight", (2048, 256))]
    names += [(f"model.layers.{i}.mlp.w{j}.weight", (512, 1024)) for i in range(2) for j in range(97)]
    names += [("model.norm.weight", (256,)), ("lm_head.weight", (2048, 256))]
    model_bytes = 4 * sum(torch.Size(s).numel() for _, s in names)
    for k, name in enumerate(("base", "p0", "p1")):
        d = tmp_path / name
        d.mkdir()
        cfg = json.loads((tiny / "base" / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 2}))
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny / "base" / f, d / f)
        g = torch.Generator().manual_seed(k)
        write_sharded(d, ((n, s, torch.float32) for n, s in names), lambda n: torch.randn(dict(names)[n], generator=g),
                      max_shard_bytes=120_000_000)
    assert (tmp_path / "p0" / "model.safetensors.index.json").is_file()
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path)], capture_output=True, text=True, check=True)
    baseline_kb, peak_kb = map(int, proc.stdout.split()[-2:])
    print(f"peak RssAnon {peak_kb / 1024:.0f} MB, of which the merge {(peak_kb - baseline_kb) / 1024:.0f} MB")
    merged_kb = peak_kb - baseline_kb
    assert model_bytes > 380e6
    assert merged_kb * 1024 * 4 < model_bytes, f"merge used {merged_kb / 1024:.0f} MB for a {model_bytes / 1e6:.0f} MB model"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {n for n, _ in names}


def test_merge_cli_refuses_a_bad_recipe_before_writing_anything(tmp_path, tiny):
    recipe = {"format": "evomerge-recipe/1", "method": "ties", "base": str(tiny / "base"),
              "parents": [str(tiny / "up"), str(tiny / "rot")],
              "groups": {g: {"weight": [0.5, 0.5], "density": [0.5, 1.5]} for g in GROUPS}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = evomerge("merge", path, tmp_path / "out")
    assert proc.returncode == 2
    assert "bad.yaml" in proc.stderr and "groups.embed.density" in proc.stderr and "(0, 1]" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_the_model_card_names_hub_parents_by_id_and_local_ones_by_folder_name(tmp_path, tiny):
    snapshot = tmp_path / "hub" / "models--acme--tiny-up" / "snapshots" / "0123abcd"
    shutil.copytree(tiny / "up", snapshot)
    recipe = Recipe("task_arithmetic", [str(snapshot), str(tiny / "rot")],
                    {g: {"weight": [0.5, 0.5]} for g in GROUPS}, str(tiny / "base"))
    card = model_card(recipe, tmp_path / "merged")
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == ["base", "acme/tiny-up", "rot"]
    assert "| parent | `acme/tiny-up` |" in card and "| parent | `rot` |" in card
    parents = card.split("## Recipe")[0]  # the recipe below holds paths relative to the card, for `evomerge merge`
    assert str(tmp_path) not in parents and str(tiny) not in parents
