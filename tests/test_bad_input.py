"""Bad input, table-driven: every broken study file, recipe file, model or storage URL exits with code 2 and a
message naming the file and the field, and leaves an existing study DB byte-for-byte unchanged.

The commands run in process through typer's CliRunner (same code, same exit codes and messages as the console
script, without paying the import time once per case).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.io import load_state_dict
from evomerge.study import Study
from evomerge.studyfile import load_study
from tests.conftest import FITNESS, ROOT, TINY, small_study
from tests.test_reliability import BAD_PG, SECRET


@pytest.fixture(scope="module")
def existing(tmp_path_factory, small_executor) -> Path:
    """A study with two finished trials, its DB next to it, and its best recipe exported as best.yaml."""
    path = small_study(tmp_path_factory.mktemp("existing"))
    study = Study(load_study(path), executor=small_executor)
    study.run(2)
    study.best_recipe().save(path.parent / "best.yaml")
    study.storage.engine.dispose()
    with contextlib.closing(sqlite3.connect(path.parent / "tiny-ps.db")) as c:  # every write into the main file
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


def digest(path: Path) -> str:
    """The DB's bytes and its rows: SQLite in WAL mode keeps recent writes in the -wal file until a checkpoint, so
    the main file's bytes alone would miss a write; the rows (read through SQLite, WAL included) cannot."""
    with contextlib.closing(sqlite3.connect(path)) as c:
        rows = "\n".join(c.iterdump())
    return hashlib.sha256(path.read_bytes()).hexdigest() + hashlib.sha256(rows.encode()).hexdigest()


def edited(data: dict, dotted: str, value: Any) -> dict:
    """A copy of `data` with the field at `dotted` (a.b.0.c) set to `value`, or deleted when value is DELETE."""
    out = copy.deepcopy(data)
    keys = [int(k) if k.isdigit() else k for k in dotted.split(".")]
    node = out
    for k in keys[:-1]:
        node = node[k]
    if value is DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return out


DELETE = object()


def shapes_differ(tmp: Path) -> str:
    bad = tmp / "narrow"
    shutil.copytree(TINY / "rot", bad)
    sd = load_state_dict(bad)
    sd["model.norm.weight"] = sd["model.norm.weight"][:-2]
    save_file(sd, bad / "model.safetensors")
    return str(bad)


def corrupt_safetensors(tmp: Path) -> str:
    bad = tmp / "corrupt"
    shutil.copytree(TINY / "rot", bad)
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + bytes(64))
    return str(bad)


# (id, field to set, value (or a function of the temp dir that returns it), what the message must name)
STUDY_CASES: list[tuple[str, str, Any, list[str]]] = [
    ("missing budget", "budget", DELETE, ["budget", "required field is missing"]),
    ("missing models", "models", DELETE, ["models", "required field is missing"]),
    ("missing task name", "fitness.tasks.0.task", DELETE, ["fitness.tasks.0.task", "required"]),
    ("unknown top-level field", "budgett", 5, ["budgett", "unknown field"]),
    ("unknown nested field", "fitness.tasks.0.metrik", "acc", ["fitness.tasks.0.metrik", "unknown field"]),
    ("budget not a number", "budget", "many", ["budget", "integer"]),
    ("parents not a list", "models.parents", "up", ["models.parents", "list"]),
    ("batch size a list", "fitness.batch_size", [1], ["fitness.batch_size", "integer"]),
    ("zero budget", "budget", 0, ["budget", "greater than or equal to 1"]),
    ("negative sigma0", "optimizer.sigma0", -0.1, ["optimizer.sigma0", "greater than 0"]),
    ("population of one", "optimizer.popsize", 1, ["optimizer.popsize", "greater than or equal to 2"]),
    ("zero limit", "fitness.limit", 0, ["fitness.limit", "greater than or equal to 1"]),
    ("negative task weight", "fitness.tasks.0.weight", -1, ["fitness.tasks.0.weight", "greater than or equal to 0"]),
    ("inverted weight range", "search_space.weight", {"low": 1.0, "high": 0.0},
     ["search_space.weight", "must not exceed"]),
    ("density above one", "search_space.density", {"low": 0.5, "high": 1.5}, ["search_space", "(0, 1]"]),
    ("negative layer granularity", "search_space.layer_granularity", -1, ["search_space.layer_granularity"]),
    ("unknown merge method", "merge.method", "frankenstein", ["merge.method", "allowed: linear"]),
    ("unknown merge option", "merge.options", {"normalise": True}, ["merge", "'normalise'", "normalize"]),
    ("unknown dtype", "merge.dtype", "float8", ["merge.dtype", "float32"]),
    ("unknown preset", "search_space.preset", "ps-nowhere", ["search_space.preset", "ps-layerwise"]),
    ("missing parent directory", "models.parents.1", "/nonexistent/rot", ["models.parents.1", "does not exist"]),
    ("missing base directory", "models.base", "/nonexistent/base", ["models.base", "does not exist"]),
    ("missing task folder", "fitness.include_path", "/nonexistent/tasks", ["fitness.include_path.0", "does not exist"]),
    ("parents with mismatched shapes", "models.parents.1", shapes_differ,
     ["narrow", "model.norm.weight", "identical shapes"]),
    ("corrupt safetensors", "models.parents.1", corrupt_safetensors,
     ["corrupt/model.safetensors", "not a readable safetensors file"]),
    ("task lm-eval does not know", "fitness.tasks.0.task", "tiny_nonexistent",
     ["fitness.tasks", "'tiny_nonexistent'", "tiny_rot"]),
    ("storage URL with a wrong password", "storage", BAD_PG, ["storage", "evomerge_nobody:***@127.0.0.1"]),
    ("a changed setup under an existing name", "merge.method", "dare_ties", ["different method", "new study name"]),
    ("another optimizer under an existing name", "optimizer.name", "tpe", ["different optimizer", "new study name"]),
]


FRESH = {"parents with mismatched shapes", "corrupt safetensors"}


@pytest.mark.parametrize("name,field,value,expect", STUDY_CASES, ids=[c[0] for c in STUDY_CASES])
def test_a_bad_study_file_exits_2_naming_file_and_field_and_leaves_the_db_unchanged(
        existing, tmp_path, name, field, value, expect):
    data = yaml.safe_load(existing.read_text())
    value = value(tmp_path) if callable(value) else value
    case = existing.parent / "case.yaml"  # same folder, same study name: the same DB as the existing study
    data = edited(data, field, value)
    if name in FRESH:  # other parents under the existing name are a changed setup, refused by the DB check first
        data["study"] = "tiny-ps-other-parents"
    case.write_text(yaml.safe_dump(data))
    db = existing.parent / "tiny-ps.db"
    before = digest(db)
    r = CliRunner().invoke(app, ["run", str(case)])
    assert r.exit_code == 2, r.output
    message = r.stderr
    assert "error:" in message and "Traceback" not in r.output
    named = [str(case)] if not any(m in expect[0] for m in ("narrow", "corrupt")) else []
    for text in named + expect:
        assert text in message, f"{text!r} not in {message!r}"
    assert SECRET not in r.output
    assert digest(db) == before
    assert {p.name for p in existing.parent.glob("tiny-ps.db*")} <= {"tiny-ps.db", "tiny-ps.db-wal", "tiny-ps.db-shm", "tiny-ps.db.lock"}


def test_python_tags_in_a_study_file_exit_2_and_run_nothing(existing, tmp_path):
    marker = tmp_path / "pwned"
    case = existing.parent / "case.yaml"
    case.write_text(f"!!python/object/apply:os.system ['touch {marker}']\n" + existing.read_text())
    before = digest(existing.parent / "tiny-ps.db")
    r = CliRunner().invoke(app, ["run", str(case)])
    assert r.exit_code == 2 and str(case) in r.stderr and "not valid YAML" in r.stderr
    assert not marker.exists()
    assert digest(existing.parent / "tiny-ps.db") == before


@pytest.mark.parametrize("args,expect", [
    (["--storage", BAD_PG], ["--storage", "evomerge_nobody:***@127.0.0.1"]),
    (["--budget", "0"], ["--budget"]),
], ids=["wrong password on the command line", "zero budget on the command line"])
def test_bad_run_options_exit_2_naming_the_option(existing, args, expect):
    before = digest(existing.parent / "tiny-ps.db")
    r = CliRunner().invoke(app, ["run", str(existing), *args])
    assert r.exit_code == 2
    assert all(e in r.output for e in expect) and SECRET not in r.output
    assert digest(existing.parent / "tiny-ps.db") == before


def test_an_unwritable_export_path_exits_2_naming_it(existing, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    before = digest(existing.parent / "tiny-ps.db")
    r = CliRunner().invoke(app, ["export", str(existing), "-o", str(blocker / "best.yaml")])
    assert r.exit_code == 2 and str(blocker / "best.yaml") in r.stderr and "cannot write the recipe" in r.stderr
    assert digest(existing.parent / "tiny-ps.db") == before


# (id, field, value, what the message must name) over the exported recipe
RECIPE_CASES: list[tuple[str, str, Any, list[str]]] = [
    ("missing method", "method", DELETE, ["method", "required field is missing"]),
    ("unknown field", "weights", {}, ["weights", "unknown field"]),
    ("unknown method", "method", "frankenstein", ["unknown merge method 'frankenstein'"]),
    ("weight not a number", "groups.layers\\.0.weight", ["heavy", 0.5], ["groups.layers.0.weight.0", "number"]),
    ("one weight for two parents", "groups.layers\\.0.weight", [0.5], ["groups.layers.0.weight", "2 numbers (one per parent)"]),
    ("density above one", "groups.layers\\.0.density", [1.5, 0.5], ["groups.layers.0.density", "(0, 1]"]),
    ("unknown group parameter", "groups.layers\\.0.sharpness", [1.0, 1.0], ["groups.layers.0", "sharpness"]),
    ("a group missing", "groups.head", DELETE, ["no values for group 'head'"]),
    ("missing parent directory", "parents.1", "/nonexistent/rot", ["parents.1", "does not exist"]),
    ("unknown dtype", "dtype", "float8", ["dtype", "float32"]),
]


def recipe_edited(data: dict, dotted: str, value: Any) -> dict:
    """Like `edited`, with `\\.` standing for a dot inside a key (group names such as layers.0)."""
    keys = [k.replace("\0", ".") for k in dotted.replace("\\.", "\0").split(".")]
    out = copy.deepcopy(data)
    node = out
    for k in keys[:-1]:
        node = node[int(k) if k.isdigit() and isinstance(node, list) else k]
    last = int(keys[-1]) if keys[-1].isdigit() and isinstance(node, list) else keys[-1]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return out


@pytest.mark.parametrize("name,field,value,expect", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_a_bad_recipe_file_exits_2_naming_file_and_field_and_writes_no_model(existing, tmp_path, name, field, value,
                                                                             expect):
    data = yaml.safe_load((existing.parent / "best.yaml").read_text())
    case = existing.parent / f"recipe-{tmp_path.name}.yaml"  # beside best.yaml: its relative model paths still hold
    case.write_text(yaml.safe_dump(recipe_edited(data, field, value)))
    r = CliRunner().invoke(app, ["merge", str(case), str(tmp_path / "merged")])
    assert r.exit_code == 2, r.output
    for text in [str(case)] + expect:
        assert text in r.stderr, f"{text!r} not in {r.stderr!r}"
    assert not (tmp_path / "merged").exists()


def test_a_merge_into_an_unwritable_folder_exits_2_naming_it(existing, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = CliRunner().invoke(app, ["merge", str(existing.parent / "best.yaml"), str(blocker / "merged")])
    assert r.exit_code == 2 and str(blocker / "merged") in r.stderr and "cannot write the model" in r.stderr


# ---------------------------------------------------------------- hardening: every kind of bad input, exit 2
def model_dir(tmp: Path, name: str, config: bytes | None = None, drop: tuple[str, ...] = ()) -> str:
    """A copy of the tiny `rot` parent with its config.json replaced by `config` and the files in `drop` removed."""
    d = tmp / name
    shutil.copytree(TINY / "rot", d)
    if config is not None:
        (d / "config.json").write_bytes(config)
    for f in drop:
        (d / f).unlink()
    return str(d)


def config_with(**fields) -> bytes:
    import json

    return json.dumps({**json.loads((TINY / "rot" / "config.json").read_text()), **fields}).encode()


def tasks_missing_data(tmp: Path) -> str:
    """The tiny tasks, one of them naming a local data file that is not there."""
    d = tmp / "tasks"
    shutil.copytree(FITNESS, d)
    y = d / "tiny_up.yaml"
    y.write_text(y.read_text() + "dataset_kwargs:\n  data_files: {search: missing-search.jsonl}\n")
    return str(d)


LONG_NAME = "n" * 300  # one path component longer than any Linux file system allows (255 bytes)

HARDENING_CASES: list[tuple[str, str, Any, list[str]]] = [
    ("NaN range low", "search_space.weight", {"low": float("nan"), "high": 1.0}, ["search_space.weight.low", "finite"]),
    ("infinite range high", "search_space.density", {"low": 0.5, "high": float("inf")},
     ["search_space.density.high", "finite"]),
    ("NaN scale range", "search_space.scale", {"low": float("nan"), "high": 1.0}, ["search_space.scale.low", "finite"]),
    ("NaN sigma0", "optimizer.sigma0", float("nan"), ["optimizer.sigma0", "finite"]),
    ("infinite sigma0", "optimizer.sigma0", float("inf"), ["optimizer.sigma0", "finite"]),
    ("NaN task weight", "fitness.tasks.0.weight", float("nan"), ["fitness.tasks.0.weight", "finite"]),
    ("infinite task weight", "fitness.tasks.1.weight", float("inf"), ["fitness.tasks.1.weight", "finite"]),
    ("NaN baseline weight", "baselines.weight", [0.5, float("nan")], ["baselines.weight.1", "finite"]),
    ("infinite baseline density", "baselines.density", [float("-inf")], ["baselines.density.0", "finite"]),
    ("NaN fixed value", "search_space.fixed", {"weight": float("nan")}, ["search_space.fixed.weight", "finite"]),
    ("NaN racing bound", "fitness.racing", {"z": float("nan")}, ["fitness.racing.z", "finite"]),
    ("NaN merge option", "merge.options", {"lambda": float("nan")}, ["merge.options.lambda", "finite"]),
    ("popsize 10**12", "optimizer.popsize", 10**12, ["optimizer.popsize", "less than or equal to 100000"]),
    ("budget 10**12", "budget", 10**12, ["budget", "less than or equal to"]),
    ("huge seed named as seed", "seed", 10**30, ["seed", "less than or equal to 4294967295"]),
    ("negative seed", "seed", -1, ["seed", "greater than or equal to 0"]),
    ("absurd batch size", "fitness.batch_size", 10**12, ["fitness.batch_size", "less than or equal"]),
    ("absurd layer granularity", "search_space.layer_granularity", 10**9,
     ["search_space.layer_granularity", "less than or equal"]),
    ("absurd final top-k", "fitness.final_top_k", 10**9, ["fitness.final_top_k", "less than or equal"]),
    ("absurd thread count", "executor", {"threads": 10**6}, ["executor.threads", "less than or equal"]),
    ("a search space too large for CMA-ES", "search_space",
     {"preset": "ps-layerwise", "granularity": [f"proj{i}" for i in range(700)]},
     ["search_space", "dimension", "optimizer tpe or random"]),
    ("a thousand baselines", "baselines.weight", [0.5] * 1000, ["baselines.weight", "at most 100"]),
    ("unknown device", "device", "tpu", ["device", "unknown device 'tpu'", "cuda:N"]),
    ("device not a word", "device", ["cpu"], ["device", "string"]),
    ("a CUDA device this machine lacks", "device", "cuda:999", ["device", "cuda:999", "CUDA device"]),
    ("study name too long", "study", "s" * 300, ["study", "at most 128 characters"]),
    ("a method name of 200000 characters, message cut", "merge.method", "m" * 200_000,
     ["merge.method", "unknown merge method", "characters cut"]),
    ("parent path longer than the OS allows", "models.parents.1", f"/tmp/{LONG_NAME}/rot",
     ["models.parents.1", "longer than the operating system allows"]),
    ("base path longer than the OS allows", "models.base", LONG_NAME, ["models.base", "longer than the operating"]),
    ("task folder path longer than the OS allows", "fitness.include_path", LONG_NAME,
     ["fitness.include_path.0", "longer than the operating"]),
    ("a parent that is a file", "models.parents.1", str(TINY / "rot" / "config.json"),
     ["models.parents.1", "is a file", "model directory"]),
    ("config.json a list", "models.parents.1", lambda t: model_dir(t, "listcfg", b"[1, 2]"),
     ["models.parents.1", "config.json", "JSON object"]),
    ("config.json a string", "models.parents.0", lambda t: model_dir(t, "strcfg", b'"llama"'),
     ["models.parents.0", "config.json", "JSON object"]),
    ("config.json layer count a string", "models.parents.1",
     lambda t: model_dir(t, "layers", config_with(num_hidden_layers="four")),
     ["models.parents.1", "num_hidden_layers must be a positive integer"]),
    ("config.json layer count negative", "models.base",
     lambda t: model_dir(t, "neg", config_with(num_hidden_layers=-4)), ["models.base", "num_hidden_layers"]),
    ("config.json hidden size a float", "models.parents.1",
     lambda t: model_dir(t, "hidden", config_with(hidden_size=128.5)), ["models.parents.1", "hidden_size"]),
    ("config.json architectures a string", "models.parents.1",
     lambda t: model_dir(t, "arch", config_with(architectures="LlamaForCausalLM")),
     ["models.parents.1", "architectures must be a list"]),
    ("config.json model_type a number", "models.parents.1",
     lambda t: model_dir(t, "mtype", config_with(model_type=7)), ["models.parents.1", "model_type"]),
    ("config.json not UTF-8", "models.parents.1", lambda t: model_dir(t, "latin", b'{"model_type": "ll\xe1ma"}'),
     ["models.parents.1", "config.json", "not UTF-8"]),
    ("config.json not JSON", "models.parents.1", lambda t: model_dir(t, "notjson", b"{model_type: llama"),
     ["models.parents.1", "not valid JSON"]),
    ("config.json nested 100000 deep", "models.parents.1",
     lambda t: model_dir(t, "deepjson", b"[" * 100_000 + b"]" * 100_000), ["models.parents.1", "config.json"]),
    ("base without a tokenizer", "models.base",
     lambda t: model_dir(t, "notok", drop=("tokenizer.json", "tokenizer_config.json")),
     ["models.base", "has no tokenizer"]),
    ("a metric the task does not declare", "fitness.tasks.0.metric", "acc",
     ["fitness.tasks.0.metric", "exact_match", "not 'acc'"]),
    ("a task data file that is not there", "fitness.include_path", tasks_missing_data,
     ["fitness.tasks.0", "missing-search.jsonl", "does not exist"]),
]


@pytest.mark.parametrize("name,field,value,expect", HARDENING_CASES, ids=[c[0] for c in HARDENING_CASES])
def test_hardening_a_bad_study_value_exits_2_in_one_short_line_and_leaves_the_db_unchanged(
        existing, tmp_path, name, field, value, expect):
    t0 = time.perf_counter()
    data = yaml.safe_load(existing.read_text())
    case = existing.parent / "case.yaml"
    case.write_text(yaml.safe_dump(edited(data, field, value(tmp_path) if callable(value) else value)))
    check_refused(existing, ["run", str(case)], [str(case), *expect])
    assert time.perf_counter() - t0 < 10


def check_refused(existing: Path, args: list[str], expect: list[str]) -> None:
    """`evomerge ARGS` exits 2 with one short `error:` message holding every string of `expect`, no traceback,
    and the existing study's DB unchanged row for row."""
    db = existing.parent / "tiny-ps.db"
    before = digest(db)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error:") and "Traceback" not in r.output
    assert len(r.stderr) < 2500, f"a {len(r.stderr)}-character message"
    for text in expect:
        assert text in r.stderr, f"{text!r} not in {r.stderr!r}"
    assert digest(db) == before


def bomb(levels: int = 7) -> str:
    """A YAML flow list of a few hundred bytes whose items expand to 9**(i+1) values each (nested anchors)."""
    items = ["&a0 [x, x, x, x, x, x, x, x, x]"]
    items += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return f"[{', '.join(items)}]"


RAW_CASES: list[tuple[str, Any, list[str]]] = [
    ("study not UTF-8", lambda text, tmp: text.encode() + b"# caf\xe9\n", ["case.yaml", "not UTF-8", "line"]),
    ("study in UTF-16", lambda text, tmp: text.encode("utf-16"), ["case.yaml", "not UTF-8"]),
    ("study nested 5000 deep", lambda text, tmp: text + "deep: " + "[" * 5000 + "]" * 5000 + "\n",
     ["case.yaml", "nested deeper than 32 levels"]),
    ("alias bomb in a merge option",
     lambda text, tmp: text.replace("merge:\n", f"merge:\n  options: {{normalize: {bomb()}}}\n"),
     ["case.yaml", "merge.options.normalize.5", "alias bomb"]),
    ("aliases expanded past the depth limit", lambda text, tmp: "d0: &d0 " + "[" * 20 + "]" * 20 + "\nd1: &d1 "
     + "[" * 20 + "*d0" + "]" * 20 + "\n" + text, ["case.yaml", "d1", "nested deeper"]),
    ("an alias that contains itself", lambda text, tmp: "loop: &loop [1, *loop]\n" + text,
     ["case.yaml", "loop.1", "cycle"]),
    ("duplicate top-level key", lambda text, tmp: text + "budget: 7\n", ["case.yaml", "budget", "duplicate key"]),
    ("duplicate nested key", lambda text, tmp: text.replace("models:\n", "models:\n  base: /nowhere\n", 1),
     ["case.yaml", "models.base", "duplicate key"]),
    ("study over 1 MiB", lambda text, tmp: text + "#" + "x" * (1 << 20) + "\n", ["case.yaml", "bytes, more than"]),
    ("an integer of 5000 digits", lambda text, tmp: text.replace("seed: 0", "seed: " + "9" * 5000),
     ["case.yaml", "not valid YAML", "digits"]),
    ("empty study file", lambda text, tmp: "", ["case.yaml", "empty file"]),
    ("a list, not a mapping", lambda text, tmp: "- study\n- budget\n", ["case.yaml", "mapping"]),
    ("preset not UTF-8", lambda text, tmp: with_preset(text, tmp, b"kind: ps\n# \xff\n"),
     ["bad-preset.yaml", "not UTF-8"]),
    ("preset with a duplicate key", lambda text, tmp: with_preset(text, tmp, b"kind: ps\nkind: dfs\n"),
     ["bad-preset.yaml", "kind", "duplicate key"]),
    ("preset nested 1000 deep", lambda text, tmp: with_preset(text, tmp, b"kind: " + b"[" * 1000 + b"]" * 1000),
     ["bad-preset.yaml", "nested deeper"]),
]


def with_preset(text: str, tmp: Path, content: bytes) -> str:
    """The study `text` with its search space taken from a preset file holding `content`."""
    (tmp / "bad-preset.yaml").write_bytes(content)
    data = yaml.safe_load(text)
    data["search_space"] = {"preset": str(tmp / "bad-preset.yaml")}
    return yaml.safe_dump(data)


@pytest.mark.parametrize("name,change,expect", RAW_CASES, ids=[c[0] for c in RAW_CASES])
def test_hardening_a_malformed_study_file_exits_2_naming_it(existing, tmp_path, name, change, expect):
    t0 = time.perf_counter()
    content = change(existing.read_text(), tmp_path)
    case = existing.parent / "case.yaml"
    case.write_bytes(content if isinstance(content, bytes) else content.encode())
    check_refused(existing, ["run", str(case)], expect)
    assert time.perf_counter() - t0 < 10


def test_hardening_a_study_path_that_is_a_directory_or_too_long_exits_2_saying_so(existing):
    check_refused(existing, ["run", str(existing.parent)], [str(existing.parent), "is a directory"])
    check_refused(existing, ["status", str(existing.parent)], ["is a directory"])
    check_refused(existing, ["run", f"/tmp/{LONG_NAME}.yaml"], ["longer than the operating system allows"])


def test_hardening_run_check_finds_the_missing_search_data_of_the_japanese_math_study(existing):
    study = ROOT / "experiments" / "gpu" / "japanese-math.yaml"
    check_refused(existing, ["run", "--check", str(study)],
                  [str(study), "fitness.tasks.0", "gsm8k_ja_search.jsonl", "does not exist"])


MERGEKIT = {"merge_method": "ties", "base_model": "base", "parameters": {"normalize": True},
            "models": [{"model": "up", "parameters": {"weight": 0.5, "density": 0.5}},
                       {"model": "rot", "parameters": {"weight": 0.5, "density": 0.5}}], "dtype": "float32"}

MERGEKIT_CASES: list[tuple[str, str, Any, list[str]]] = [
    ("parameters a string", "parameters", "normalize", ["parameters", "expected a mapping", "got a string"]),
    ("parameters a list", "parameters", [{"weight": 1}], ["parameters", "expected a mapping", "got a list"]),
    ("model parameters a string", "models.1.parameters", "weight=1", ["models.1.parameters", "a mapping"]),
    ("dtype a list", "dtype", ["float32"], ["dtype", "expected a string", "got a list"]),
    ("merge_method a list", "merge_method", ["ties"], ["merge_method", "a method name"]),
    ("models a mapping", "models", {"up": 1}, ["models", "a list"]),
    ("slices with bare-string sources", "slices", [{"sources": ["up", "rot"]}],
     ["slices.0.sources.0", "a mapping"]),
    ("a filter that is not a string", "models.0.parameters.weight", [{"filter": 7, "value": 1.0}],
     ["parameters.weight", "filter"]),
    ("a weight that is a word", "models.0.parameters.weight", "heavy", ["parameters.weight", "a number"]),
    ("a NaN weight", "models.0.parameters.weight", float("nan"), ["parameters.weight", "finite"]),
    ("a NaN option", "parameters.lambda", float("nan"), ["options.lambda", "finite"]),
]


@pytest.mark.parametrize("name,field,value,expect", MERGEKIT_CASES, ids=[c[0] for c in MERGEKIT_CASES])
def test_hardening_a_mergekit_config_of_wrong_types_exits_2_naming_the_section(existing, tmp_path, name, field, value,
                                                                                expect):
    data = edited(MERGEKIT, field, value) if field != "slices" else {
        **{k: v for k, v in MERGEKIT.items() if k != "models"}, "slices": value}
    case = TINY / f"mergekit-{tmp_path.name}.yaml"  # beside the tiny zoo: its model names resolve
    try:
        case.write_text(yaml.safe_dump(data))
        check_refused(existing, ["merge", str(case), str(tmp_path / "merged")], [str(case), *expect])
    finally:
        case.unlink()
    assert not (tmp_path / "merged").exists()


RECIPE_RAW_CASES: list[tuple[str, Any, list[str]]] = [
    ("recipe not UTF-8", lambda text: text.encode() + b"# \xff\n", ["not UTF-8"]),
    ("recipe with a duplicate key", lambda text: text + "seed: 3\n", ["seed", "duplicate key"]),
    ("recipe with an alias bomb", lambda text: text.replace("options: {}", f"options: {{normalize: {bomb()}}}"),
     ["options.normalize.5", "alias bomb"]),
    ("recipe with a NaN weight",
     lambda text: yaml.safe_dump(recipe_edited(yaml.safe_load(text), "groups.layers\\.0.weight", [float("nan"), 0.5])),
     ["groups.layers.0.weight.0", "finite"]),
    ("recipe seed 10**30", lambda text: yaml.safe_dump({**yaml.safe_load(text), "seed": 10**30}),
     ["seed", "less than or equal"]),
    ("recipe parent path too long", lambda text: yaml.safe_dump(recipe_edited(yaml.safe_load(text), "parents.1",
                                                                                LONG_NAME)),
     ["parents.1", "longer than the operating system allows"]),
]


@pytest.mark.parametrize("name,change,expect", RECIPE_RAW_CASES, ids=[c[0] for c in RECIPE_RAW_CASES])
def test_hardening_a_malformed_recipe_exits_2_naming_it_and_writes_nothing(existing, tmp_path, name, change, expect):
    content = change((existing.parent / "best.yaml").read_text())
    case = existing.parent / f"recipe-{tmp_path.name}.yaml"
    case.write_bytes(content if isinstance(content, bytes) else content.encode())
    check_refused(existing, ["merge", str(case), str(tmp_path / "merged")], [str(case), *expect])
    assert not (tmp_path / "merged").exists()


def test_hardening_a_recipe_path_that_is_a_directory_and_an_unknown_device_exit_2(existing, tmp_path):
    check_refused(existing, ["merge", str(tmp_path), str(tmp_path / "merged")], [str(tmp_path), "is a directory"])
    check_refused(existing, ["merge", str(existing.parent / "best.yaml"), str(tmp_path / "m"), "--device", "tpu"],
                  ["--device", "unknown device 'tpu'"])
    assert not (tmp_path / "merged").exists() and not (tmp_path / "m").exists()


def test_hardening_an_unexpected_error_is_one_line_with_a_hint_and_debug_shows_the_traceback(existing, monkeypatch):
    import evomerge.cli

    def broken(*_a, **_k):
        raise KeyError("an internal slip")

    monkeypatch.setattr(evomerge.cli, "compact_recipe", broken)
    r = CliRunner().invoke(app, ["status", str(existing)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "error: KeyError: 'an internal slip'" in r.stderr and "--debug" in r.stderr and "report" in r.stderr
    r = CliRunner().invoke(app, ["--debug", "status", str(existing)])
    assert isinstance(r.exception, KeyError)


def test_hardening_a_recipe_parent_with_a_broken_config_is_named_by_its_recipe_field(existing, tmp_path):
    data = yaml.safe_load((existing.parent / "best.yaml").read_text())
    case = tmp_path / "recipe.yaml"
    case.write_text(yaml.safe_dump({**data, "base": str(TINY / "base"), "parents": [
        str(TINY / "up"), model_dir(tmp_path, "listcfg", b"[1, 2]")]}))
    check_refused(existing, ["merge", str(case), str(tmp_path / "merged")],
                  [str(case), "parents.1", "config.json", "JSON object"])
    assert not (tmp_path / "merged").exists()
