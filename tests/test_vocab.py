"""Parents with added tokens: rows aligned by token string (mergekit's tokenizer_source), end to end on the zoo."""
import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.io import load_state_dict
from evomerge.merge import Materializer, write_model
from evomerge.recipe import Recipe
from tests.conftest import TINY, evomerge, write_study

GROUPS = ["embed", "layers.0", "layers.1", "layers.2", "layers.3", "head"]
ADDED = ["<|im_start|>", "<|im_end|>"]
VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


def recipe(source):
    return Recipe("task_arithmetic", [str(TINY / "up"), str(TINY / "chat")],
                  {g: {"weight": [0.5, 0.7]} for g in GROUPS}, str(TINY / "base"), tokenizer_source=source)


@pytest.mark.parametrize("source, size", [("base", 77), ("union", 79), (str(TINY / "chat"), 79)])
def test_rows_are_aligned_by_token_and_added_tokens_take_the_one_model_that_has_them(tmp_path, source, size):
    r = recipe(source)
    write_model(r, tmp_path / "out")
    out, base, up, chat = (load_state_dict(p) for p in (tmp_path / "out", TINY / "base", TINY / "up", TINY / "chat"))
    for name in VOCAB:
        shared = base[name] + 0.5 * (up[name] - base[name]) + 0.7 * (chat[name][:77] - base[name])
        assert out[name].shape[0] == size and torch.allclose(out[name][:77], shared, atol=1e-6)
        if size == 79:  # only chat has them: every model takes chat's rows, so the merge is chat's rows
            assert torch.equal(out[name][77:], chat[name][77:])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == size
    model = Materializer(r.base, r.parents, tokenizer_source=source).materialize(r)
    assert all(torch.allclose(model.state_dict()[k], v, atol=1e-6) for k, v in out.items())


def test_parents_with_added_tokens_without_a_tokenizer_source_are_refused_with_the_fix(tmp_path):
    study = write_study(tmp_path, models={"base": str(TINY / "base"), "parents": [str(TINY / "up"), str(TINY / "chat")]})
    r = evomerge("run", study)
    assert r.returncode == 2 and "lm_head.weight" in r.stderr and "tokenizer_source" in r.stderr
    assert not (tmp_path / "tiny-ps.db").exists()


@pytest.mark.parametrize("source", ["union", "base"])
def test_a_study_with_the_added_token_fine_tune_runs_exports_and_loads_with_plain_transformers(
        tmp_path, source):
    study = write_study(tmp_path, budget=2, optimizer={"name": "cmaes", "popsize": 2},
                        models={"base": str(TINY / "base"), "parents": [str(TINY / "up"), str(TINY / "chat")]},
                        merge={"method": "ties", "tokenizer_source": source},
                        baselines={"weight": [1.0], "density": [1.0]})
    data = yaml.safe_load(study.read_text())
    data["fitness"].update(limit=10, final_top_k=1)
    study.write_text(yaml.safe_dump(data))
    run = evomerge("run", study)
    assert run.returncode == 0, run.stderr
    for fmt in ("evomerge", "mergekit"):
        r = evomerge("export", study, "-o", tmp_path / f"{fmt}.yaml", "--format", fmt)
        assert r.returncode == 0, r.stderr
        assert f"tokenizer_source: {source}" in (tmp_path / f"{fmt}.yaml").read_text()
    r = evomerge("merge", tmp_path / "mergekit.yaml", tmp_path / "merged")
    assert r.returncode == 0, r.stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    ids = tok("<|im_start|>up:abc=<|im_end|>", add_special_tokens=False).input_ids
    if source == "union":
        assert len(tok) == 79 and model.config.vocab_size == 79
        assert tok.convert_tokens_to_ids(ADDED) == [77, 78] and ids[0] == 77 and ids[-1] == 78
    else:
        assert len(tok) == 77 and model.config.vocab_size == 77 and len(ids) > 8  # spelled out in characters
    prompt = tok("up:hello=", return_tensors="pt").input_ids
    text = tok.decode(model.generate(prompt, max_new_tokens=6, do_sample=False)[0], skip_special_tokens=True)
    assert text.startswith("up:hello=") and len(text) > len("up:hello=")


@pytest.mark.parametrize("value", ["both", "experiments/tiny/nowhere"])
def test_a_bad_tokenizer_source_exits_2_naming_the_field(tmp_path, value):
    study = write_study(tmp_path, merge={"method": "ties", "tokenizer_source": value})
    r = evomerge("run", study, "--check")
    assert r.returncode == 2 and f"{study}: merge.tokenizer_source" in r.stderr.replace("\n", ""), r.stderr
