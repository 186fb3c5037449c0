"""Real scale: the worker's memory at the stored size, the memory plan made before anything loads, and a run that
fails on its DB before it reads any parent weight."""
import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from evomerge.merge.plan import MemoryPlanError, plan_memory
from evomerge.study import Study
from evomerge.studyfile import load_study
from tests.conftest import evomerge, write_study


def copy_zoo(tiny, root):
    for name in ("base", "up", "rot"):
        shutil.copytree(tiny / name, root / name)
    return root


def corrupt(model_dir):
    """Weights whose header is sound (shapes and tokenizer pass the checks made when the study file is read) but
    that no worker can load (int32 data where float weights belong): reading any parent weight would fail loudly."""
    from safetensors.torch import load_file, save_file

    f = model_dir / "model.safetensors"
    save_file({k: v.to(torch.int32) for k, v in load_file(f).items()}, f)


def test_run_against_an_unreachable_db_fails_before_any_parent_weight_is_read(tmp_path, tiny):
    zoo = copy_zoo(tiny, tmp_path / "zoo")
    corrupt(zoo / "rot")
    study = write_study(tmp_path, models={"base": str(zoo / "base"), "parents": [str(zoo / "up"), str(zoo / "rot")]})
    r = evomerge("run", study, "--storage", f"sqlite:///{tmp_path}/no-such-folder/study.db")
    assert r.returncode == 2
    assert "cannot open the study DB" in r.stderr and "no-such-folder" in r.stderr
    assert "float weights are expected" not in r.stderr


def test_a_changed_study_signature_fails_before_any_parent_weight_is_read(tmp_path, tiny):
    zoo = copy_zoo(tiny, tmp_path / "zoo")
    models = {"base": str(zoo / "base"), "parents": [str(zoo / "up"), str(zoo / "rot")]}
    study = write_study(tmp_path, models=models)
    Study(load_study(study))._open_or_create()  # the study as it was first run: TIES
    corrupt(zoo / "rot")
    data = yaml.safe_load(study.read_text())
    data["merge"]["method"] = "dare_ties"
    study.write_text(yaml.safe_dump(data))
    r = evomerge("run", study)
    assert r.returncode == 2
    assert "already exists in this storage with a different method" in r.stderr
    assert "float weights are expected" not in r.stderr


def test_the_memory_plan_refuses_a_study_that_cannot_fit_the_device_budget(tmp_path):
    study = write_study(tmp_path)
    for args in (["--check"], []):
        r = evomerge("run", study, "--device-memory", "0.001", *args)
        assert r.returncode == 2, r.stdout
        assert "worker: the models do not fit" in r.stderr and "Options:" in r.stderr
        assert "--device-memory" in r.stderr
    assert not (tmp_path / "tiny-ps.db").exists()
    r = evomerge("run", study, "--check")
    assert r.returncode == 0 and "memory plan: resident" in r.stdout


def test_the_plan_streams_when_resident_does_not_fit_and_obeys_the_study(tiny):
    base, parents = str(tiny / "base"), [str(tiny / "up"), str(tiny / "rot")]
    cpu = torch.device("cpu")
    resident = plan_memory(base, parents, cpu, method_selects=True)
    assert resident.mode == "resident" and resident.parents_bytes == 3 * resident.candidate_bytes
    squeezed = plan_memory(base, parents, cpu, method_selects=True, budget_bytes=resident.device_bytes - 1)
    assert squeezed.mode == "streaming" and squeezed.device_bytes < resident.device_bytes - resident.parents_bytes
    assert plan_memory(base, parents, cpu, method_selects=True, prefer="streaming").mode == "streaming"
    with pytest.raises(MemoryPlanError, match="worker.parents: resident"):
        plan_memory(base, parents, cpu, method_selects=True, prefer="resident", budget_bytes=squeezed.device_bytes)
    with pytest.raises(MemoryPlanError, match="even with the parents streamed"):
        plan_memory(base, parents, cpu, method_selects=True, budget_bytes=squeezed.device_bytes - 1)


def test_the_plan_keeps_dellas_row_rank_table_where_it_fits_and_sorts_per_candidate_where_not(tiny):
    base, parents = str(tiny / "base"), [str(tiny / "up"), str(tiny / "rot")]
    cpu = torch.device("cpu")
    table = plan_memory(base, parents, cpu, method_selects=False, method_ranks=True)
    assert table.mode == "resident" and table.row_ranks == "table"
    assert table.rank_bytes == 2 * len(parents) * table.params and "a table of" in table.describe()
    sorted_ = plan_memory(base, parents, cpu, method_selects=False, method_ranks=True,
                          budget_bytes=table.device_bytes - 1)
    assert (sorted_.mode, sorted_.row_ranks, sorted_.rank_bytes) == ("resident", "sorted", 0)
    assert "sorted per candidate" in sorted_.describe()
    assert plan_memory(base, parents, cpu, method_selects=False).row_ranks is None


_CHILD = textwrap.dedent("""
    import json, sys, torch
    from evomerge.merge import Materializer
    from evomerge.merge.plan import AnonPeak, rss_anon
    from evomerge.recipe import Recipe
    root, mode, method = sys.argv[1:4]
    torch.ones(4) + torch.ones(4)
    baseline = rss_anon()
    with AnonPeak() as peak:
        mat = Materializer(root + "/base", [root + "/p0", root + "/p1", root + "/p2"], mode=mode, compile=False)
        groups = {g: {"weight": [0.5, 0.3, 0.4], "density": [0.3, 0.5, 0.7]} for g in mat.groups}
        mat.materialize(Recipe(method, mat.parent_paths, groups, mat.base_path, dtype=mat.dtype))
    params = sum(t.numel() for t in mat.store.models[0].values())
    print(json.dumps({"baseline": baseline, "resident": rss_anon() - baseline, "peak": peak.peak - baseline,
                      "params": params, "dtype": str(mat.model.dtype)}))
""")


@pytest.fixture(scope="module")
def big_bf16(tmp_path_factory):
    """A bf16 Llama-shaped base + 3 parents of 84M parameters: 0.84 GB resident at 10 bytes/param, several times the
    anonymous memory of the interpreter with torch and transformers loaded."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("big")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 768,
              "intermediate_size": 2048, "num_hidden_layers": 6, "num_attention_heads": 12, "num_key_value_heads": 12,
              "vocab_size": 32000, "max_position_embeddings": 256, "tie_word_embeddings": False, "dtype": "bfloat16"}
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(LlamaConfig(**config)).state_dict().items()}
    for i, name in enumerate(["base", "p0", "p1", "p2"]):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config))
        g = torch.Generator().manual_seed(0)
        noise = torch.Generator().manual_seed(i)
        sd = {k: (torch.randn(s, generator=g) * 0.02 + (torch.randn(s, generator=noise) * 0.002 if i else 0)).to(
            torch.bfloat16) for k, s in shapes.items()}
        save_file(sd, root / name / "model.safetensors")
        del sd
    return root


@pytest.mark.parametrize("mode, bound", [("resident", 10.5), ("streaming", 2.5)])
def test_a_worker_holds_the_parents_at_their_stored_size(big_bf16, mode, bound):
    """Anonymous memory above the process's baseline, per parameter: base + 3 parents + candidate in bf16 is 10 bytes
    resident (2 streaming: the parents are the page cache's); the peak is within one byte/param of it (ties: the
    magnitude index and one chunk's workspace, never a parent twice)."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(big_bf16), mode, "ties"], capture_output=True, text=True,
                          check=True)
    r = json.loads(proc.stdout.splitlines()[-1])
    resident, peak = r["resident"] / r["params"], r["peak"] / r["params"]
    print(f"{mode}: baseline {r['baseline'] / 1e6:.0f} MB, resident {resident:.2f} B/param, peak {peak:.2f} B/param")
    assert r["dtype"] == "torch.bfloat16" and r["params"] * 10 > 3 * r["baseline"]
    assert resident <= bound and peak <= resident + 1.0
