"""lm-eval behind the few calls fitness makes: task discovery, per-split task setup, requests built once, scoring.

Everything here leans on lm-eval beyond its documented entry points (private modules, task attributes, the
evaluation loop of `lm_eval.evaluator.evaluate` re-run over prebuilt requests, HFLM methods overridden), so an lm-eval
upgrade is checked against this module alone; fitness.py holds the policy and sees plain data.

Nothing is patched process-wide: the wrapped model is a subclass of lm-eval's `HFLM` (forward passes timed,
prompts tokenized once), a task's reference answers are memoized on that task object only, and the Jinja template
cache is installed for the duration of each call that renders templates (`templates_compiled_once`).
lm-eval itself is imported inside the functions, so `import evomerge.fitness` stays cheap.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import MAX_FILE_BYTES

FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed


def quiet() -> None:
    """lm-eval logs every task it builds and every request batch at INFO/WARNING; a study builds thousands."""
    for name in ("lm-eval", "lm_eval", "lm_eval.evaluator", "lm_eval.api.task", "lm_eval.models.huggingface"):
        logging.getLogger(name).setLevel(logging.ERROR)


@functools.lru_cache(maxsize=4096)
def _compile(source: str):
    from lm_eval.utils import env

    return type(env).from_string(env, source)


@contextlib.contextmanager
def templates_compiled_once() -> Iterator[None]:
    """lm-eval compiles a task's Jinja templates again for every document and every call (about half of a tiny
    candidate's fitness time); compiled templates are immutable, so each source is compiled once and reused.
    lm-eval offers no hook for this, so its shared Environment answers from the cache only inside this block."""
    from lm_eval.utils import env

    if "from_string" in vars(env):  # already inside one
        yield
        return
    env.from_string = _compile
    try:
        yield
    finally:
        del env.from_string


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """lm-eval's and HFLM's per-call progress bars, which go to stderr whatever the log level."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        yield


# ---------------------------------------------------------------- task discovery
@dataclass(frozen=True)
class Leaf:
    """One single task as its YAML declares it: the raw config, whether it ships with lm-eval, where it was read."""

    name: str
    config: dict
    builtin: bool
    yaml_path: str | None


class TaskIndex:
    """lm-eval's index of the study's tasks: those under `include_path`, plus lm-eval's own only when a task needs
    them (indexing lm-eval's built-in tasks costs ~15 s)."""

    def __init__(self, include_path: list[str], names: list[str]):
        quiet()
        from lm_eval.tasks import TaskManager

        self.local = TaskManager(include_path=include_path, include_defaults=False).all_tasks if include_path else []
        needs_defaults = any(n not in self.local for n in names)
        self.manager = TaskManager(include_path=include_path or None, include_defaults=needs_defaults)
        self._leaves: dict[str, list[Leaf]] = {}  # each task's YAML is read once, whichever check asks first

    def unknown(self, names: list[str]) -> list[str]:
        return [n for n in names if n not in self.manager.all_tasks]

    def leaves(self, name: str, depth: int = 0) -> list[Leaf]:
        """The task itself, or every task under a group or tag; reads YAML only (no dataset download, no code from
        the task's `!function`s run)."""
        import lm_eval
        from lm_eval.tasks._yaml_loader import load_yaml

        if name in self._leaves:
            return self._leaves[name]
        entry = self.manager.task_index.get(name)
        if entry is None or depth > 4:
            return []
        cfg = load_yaml(entry.yaml_path, resolve_func=False) if entry.yaml_path else dict(entry.cfg or {})
        builtin = bool(entry.yaml_path) and Path(lm_eval.__file__).parent in Path(entry.yaml_path).resolve().parents
        children = cfg.get("task") if isinstance(cfg.get("task"), list) else None
        if children is None and entry.kind.name == "TAG":
            children = [k for k, e in self.manager.task_index.items() if name in e.tags]
        if children is not None:
            out = []
            for c in children:
                out += self.leaves(c if isinstance(c, str) else c.get("task", ""), depth + 1)
        else:
            out = [Leaf(name, cfg, builtin, entry.yaml_path)]
        self._leaves[name] = out
        return out

    def load(self, names: list[str]) -> dict:
        """lm-eval's task dict ({"tasks": ..., "groups": ..., "group_map": ...}), datasets loaded."""
        with templates_compiled_once():
            return self.manager.load(names)


def skipped_task_files(folders: list[str]) -> list[str]:
    """Task YAMLs lm-eval skips without a word (not UTF-8, too large), for the message that a task is unknown."""
    bad = []
    for folder in folders:
        for f in sorted(Path(folder).rglob("*.yaml")):
            try:
                if f.stat().st_size > MAX_FILE_BYTES:
                    bad.append(f"{f}: larger than {MAX_FILE_BYTES} bytes")
                else:
                    f.read_bytes().decode("utf-8")
            except UnicodeDecodeError as e:
                bad.append(f"{f}: not UTF-8 text (byte offset {e.start})")
            except OSError as e:
                bad.append(f"{f}: {e.strerror}")
    return bad


def data_files(cfg: dict) -> list[str]:
    """The local file names under a task YAML's `dataset_kwargs.data_files` (a name, a list, or split: name(s))."""
    kwargs = cfg.get("dataset_kwargs")
    files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    if isinstance(files, dict):
        files = list(files.values())
    names: list = []
    for f in files if isinstance(files, list) else [files]:
        names += f if isinstance(f, list) else [f]
    # remote files and globs are the datasets library's to resolve
    return [n for n in names if isinstance(n, str) and "://" not in n and not any(ch in n for ch in "*?[")]


# ---------------------------------------------------------------- loaded tasks
def members(loaded: dict, name: str) -> list:
    """The task objects a configured task scores through: itself, or the single tasks under its group."""
    task = loaded["tasks"].get(name)
    if task is not None:
        return [task]
    return [loaded["tasks"][c] for c in _flatten(loaded.get("group_map", {}), name) if c in loaded["tasks"]]


def _flatten(group_map: dict, name: str) -> list[str]:
    out = []
    for c in group_map.get(name, []):
        out += _flatten(group_map, c) if c in group_map else [c]
    return out


def splits(task) -> list[str]:
    return list(task.dataset)


def prepare(task, split: str, shots: int | None, gen_kwargs: dict | None) -> None:
    """Score `split` as the task's test split, with num_fewshot and gen_kwargs set as lm-eval's simple_evaluate sets
    them: a task whose YAML says 0 shots keeps 0, generation kwargs update the task's own (generating tasks only),
    few-shot examples drawn with lm-eval's default seed; reference answers rendered once per document."""
    task.config.test_split = split
    if shots is not None and task.get_config("num_fewshot") != 0:
        task.set_config(key="num_fewshot", value=shots)
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
    if gen_kwargs and task.get_config("output_type") == "generate_until":
        task.set_config(key="generation_kwargs", value=gen_kwargs, update=True)
    _memoize_targets(task)


def _memoize_targets(task) -> None:
    """A document's reference answer never changes, yet lm-eval renders it from its Jinja template again for every
    candidate (about 2 ms of a tiny candidate's 12 ms besides forward passes and materialization): render it once
    per document.  Keyed by the document object, which the cache holds, so its id cannot be reused by another."""
    render, cache = task.doc_to_target, {}

    def doc_to_target(doc, *args, **kwargs):
        if args or kwargs:
            return render(doc, *args, **kwargs)
        hit = cache.get(id(doc))
        if hit is None or hit[0] is not doc:
            hit = cache[id(doc)] = (doc, render(doc))
        return hit[1]

    task.doc_to_target = doc_to_target


def bypasses_metrics(task) -> bool:
    """A task scored by `bypass` (no metric) is left to lm-eval's own `evaluate`."""
    return "bypass" in getattr(task, "_metric_fn_list", {})


def averaged(task, metric: str) -> bool:
    """Whether a metric is the mean over examples, so scores on subsets add up (what racing needs)."""
    from lm_eval.api.metrics import mean

    return task.aggregation().get(metric) is mean


def example_count(task) -> int:
    return len(task.eval_docs)


# ---------------------------------------------------------------- the model and scoring
@functools.cache
def _resident_lm_class() -> type:
    """HFLM over the resident model, its forward passes timed and its prompts tokenized once per study: the prompts
    are the same for every candidate and the tokenizer never changes; copies are handed out, so nothing downstream
    can alter a cached encoding."""
    from lm_eval.models.huggingface import HFLM

    class ResidentLM(HFLM):
        def __init__(self, **kwargs: Any):
            self.forward_s = 0.0
            self._encode = functools.lru_cache(maxsize=65536)(
                lambda string, *a, **kw: tuple(HFLM.tok_encode(self, string, *a, **kw)))
            self._batch_encode = functools.lru_cache(maxsize=4096)(
                lambda strings, *a, **kw: HFLM.tok_batch_encode(self, list(strings), *a, **kw))
            super().__init__(**kwargs)

        def tok_encode(self, string: str, *args: Any, **kwargs: Any) -> list[int]:
            return list(self._encode(string, *args, **kwargs))

        def tok_batch_encode(self, strings: list[str], *args: Any, **kwargs: Any) -> tuple:
            return tuple(x.clone() for x in self._batch_encode(tuple(strings), *args, **kwargs))

        def _timed(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.forward_s += time.perf_counter() - t0

        def _model_call(self, *args: Any, **kwargs: Any):
            return self._timed(super()._model_call, *args, **kwargs)

        def _model_generate(self, *args: Any, **kwargs: Any):
            return self._timed(super()._model_generate, *args, **kwargs)

    return ResidentLM


def resident_lm(model, tokenizer, device: str, batch_size: int | str):
    """lm-eval's model wrapper around the in-memory model every candidate is materialized into; `forward_s` counts
    the seconds spent in its forward passes."""
    return _resident_lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)


def chat_options(lm, on: bool, multiturn: bool) -> dict:
    """build_all_requests' chat arguments, as lm-eval's evaluate passes them."""
    if not on:
        return {}
    return {"apply_chat_template": True, "fewshot_as_multiturn": bool(multiturn),
            "chat_template": lm.apply_chat_template, "tokenizer_name": lm.tokenizer_name}


def build_requests(task, limit: int | None, indices: list[int] | None, chat: dict) -> tuple[list, list]:
    """A task's request Instances and (doc_id, doc) pairs for one example subset (`limit` first examples, or the
    documents at `indices`)."""
    from lm_eval.evaluator_utils import get_sample_size

    n = get_sample_size(task, limit)
    with templates_compiled_once(), _silenced():
        task.build_all_requests(limit=n, samples=indices, rank=0, world_size=1, cache_requests=False, **chat)
    docs = list(task.doc_iterator(rank=0, limit=n, world_size=1, samples=indices))
    return list(task.instances), docs


def score_prebuilt(lm, built: dict[str, tuple]) -> tuple[dict[str, dict], int, dict[str, dict[str, list]]]:
    """What `lm_eval.evaluator.evaluate` computes for single tasks (same requests, filters, `process_results` and
    aggregation, the first filter reporting a metric wins as in its results) over requests built once
    (`built`: name -> (task, instances, docs)); also each metric's per-example values, in document order."""
    from lm_eval.api.metrics import mean

    by_type: dict[str, list] = defaultdict(list)
    for task, instances, _ in built.values():
        for inst in instances:
            inst.resps, inst.filtered_resps = [], {}
            by_type[inst.request_type].extend([inst] * inst.repeats)
    for reqtype, reqs in by_type.items():
        with _silenced():  # HFLM's progress bar
            resps = getattr(lm, reqtype)(reqs)
        for inst, resp in zip(reqs, resps, strict=True):
            inst.resps.append(resp)
    results: dict[str, dict] = {}
    per_example: dict[str, dict[str, list]] = {}
    examples = 0
    with templates_compiled_once():
        for name, (task, instances, docs) in built.items():
            task._instances = instances
            task.apply_filters()
            by_doc: dict[int, list] = defaultdict(list)
            for inst in instances:
                by_doc[inst.doc_id].append(inst)
            for group in by_doc.values():
                group.sort(key=lambda x: x.idx)
            raw: dict[str, list] = {}
            for filter_key in instances[0].filtered_resps:
                for doc_id, doc in docs:
                    out = task.process_results(doc, [r.filtered_resps[filter_key] for r in by_doc[doc_id]])
                    for metric, value in out.items():
                        raw.setdefault(f"{metric},{filter_key}", []).append(value)
            aggregation = task.aggregation()  # lm-eval averages a metric without an aggregation, so do we
            results[name] = {k: aggregation.get(k.split(",")[0], mean)(v) for k, v in raw.items()}
            per_example[name] = raw
            examples += len(docs)
    return results, examples, per_example


def evaluate(lm, loaded: dict, limit: int | None, samples: dict[str, list[int]] | None, apply_chat_template: bool,
             fewshot_as_multiturn: bool) -> tuple[dict[str, dict], int]:
    """`lm_eval.evaluator.evaluate` itself (groups aggregate their members lm-eval's own way): {task:
    {"metric,filter": value}} and the examples scored.  Never lm-eval's response cache: answers would leak between
    candidates that share one model object."""
    from lm_eval.evaluator import evaluate as lm_eval_evaluate

    if samples is not None:
        loaded = {"tasks": {k: loaded["tasks"][k] for k in samples}, "groups": {}}
    with templates_compiled_once(), _silenced():
        out = lm_eval_evaluate(
            lm, loaded, limit=limit, samples=samples, cache_requests=False, bootstrap_iters=0, log_samples=False,
            verbosity="ERROR", apply_chat_template=apply_chat_template, fewshot_as_multiturn=fewshot_as_multiturn,
        )
    examples = sum(v.get("effective", v.get("original", 0)) for v in out.get("n-samples", {}).values())
    return out["results"], examples
