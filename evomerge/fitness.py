"""Fitness: lm-eval tasks built once per worker, perplexity on local text, or a user callable; weighted scores.

Tasks and their documents are fixed for the whole study, so each task's request Instances are built once per split
and example subset (and each prompt tokenized once); per candidate only the model calls run, then lm-eval's own
filters, `process_results` and aggregation - what `lm_eval.evaluator.evaluate` does, without rebuilding requests
(groups still go through `evaluate`, which aggregates them its own way).  An `HFLM` wraps the in-memory model;
lm-eval's response cache is never used, since answers would leak between candidates that share one model object.

Racing (multi-fidelity): with ``fitness.racing`` set, a candidate is scored on nested subsets of each task's search
examples (a fixed per-task permutation, so every task is represented in the same proportion at every stage), each
stage ``reduction_factor`` times larger than the last, starting at ``min_examples`` per task.  After each stage it is
compared with the incumbent example by example (a paired test: two merges of the same parents answer most examples
alike, so the differences vary far less than the scores do); it stops when even the upper confidence bound of the
difference is below zero.  Only new examples are scored at each stage, so a candidate that runs to the end costs
exactly what a plain evaluation costs.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import math
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import MAX_FILE_BYTES, FitnessConfig, TaskConfig
from .errors import EvomergeError

FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed


class FitnessError(EvomergeError, ValueError):
    """The fitness setup cannot work (unknown task, missing split, unknown metric, contaminated search split)."""


@dataclass
class Score:
    """Weighted fitness plus the per-task metric values it came from.

    `examples` counts the examples scored (all tasks); `stages` records, per racing stage, the examples per task
    and the cumulative per-task scores; `example_scores` (racing only) holds each task's per-example metric values
    in racing order, which is what a later candidate is paired against if this one becomes the incumbent; `full` is
    False when racing stopped the candidate before the last stage: its per-task values are then estimates of its
    full-subset scores (the incumbent's score plus the difference measured on the examples both were scored on),
    below the incumbent's; `forward_s` is the time spent inside the model's forward passes.
    """

    value: float
    per_task: dict[str, float]
    examples: int = 0
    stages: list[dict] = field(default_factory=list)
    full: bool = True
    example_scores: dict[str, list[float]] = field(default_factory=dict)
    forward_s: float = field(default=0.0, compare=False)  # a timing, not part of what the score is


# Public benchmarks whose configured test split is the benchmark's held-out test set (Hub dataset ids, as lm-eval's
# own task YAMLs name them).  Every task that ships inside lm-eval counts as a public benchmark too.
PUBLIC_BENCHMARKS = frozenset({
    "gsm8k", "openai/gsm8k", "cais/mmlu", "hails/mmlu_no_train", "allenai/ai2_arc", "ai2_arc", "Rowan/hellaswag",
    "hellaswag", "winogrande", "allenai/winogrande", "truthful_qa", "truthfulqa/truthful_qa", "juletxara/mgsm",
    "EleutherAI/hendrycks_math", "hendrycks/competition_math", "openai/openai_humaneval", "google-research-datasets/mbpp",
    "TIGER-Lab/MMLU-Pro", "Idavidrein/gpqa", "lukaemon/bbh", "piqa", "ybisk/piqa", "boolq", "google/boolq",
    "openbookqa", "allenai/openbookqa", "super_glue", "glue", "lambada", "EleutherAI/lambada_openai",
})


def _quiet_lm_eval() -> None:
    for name in ("lm-eval", "lm_eval", "lm_eval.evaluator", "lm_eval.api.task", "lm_eval.models.huggingface"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _memoize_lm_eval_templates() -> None:
    """lm-eval compiles a task's Jinja templates again for every document and every call (about half of a tiny
    candidate's fitness time); compiled templates are immutable, so compiling each one once is safe."""
    from lm_eval import utils

    if not hasattr(utils.env.from_string, "cache_info"):
        utils.env.from_string = functools.lru_cache(maxsize=4096)(utils.env.from_string)


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


def task_manager(config: FitnessConfig):
    """An lm-eval TaskManager over the study's include_path, plus lm-eval's own tasks only when some task needs them
    (indexing lm-eval's built-in tasks costs ~15 s)."""
    _quiet_lm_eval()
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=config.include_path, include_defaults=False).all_tasks if config.include_path else []
    needs_defaults = any(t.task not in local for t in config.tasks if t.source == "lm-eval")
    manager = TaskManager(include_path=config.include_path or None, include_defaults=needs_defaults)
    unknown = [t.task for t in config.tasks if t.source == "lm-eval" and t.task not in manager.all_tasks]
    if unknown:
        raise FitnessError(
            f"fitness.tasks: lm-eval does not know task {unknown[0][:200]!r}; "
            f"tasks under fitness.include_path: {', '.join(sorted(local)) or 'none'}{_unreadable(config.include_path)}"
        )
    return manager


def _unreadable(folders: list[str]) -> str:
    """Task YAMLs lm-eval skipped without a word (not UTF-8, too large), for the message that a task is unknown."""
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
    return f" (lm-eval skipped {len(bad)} unreadable task file(s): {'; '.join(bad[:3])})" if bad else ""


def check_metrics(config: FitnessConfig, manager) -> None:
    """Each task's metric is one its task YAML declares (a `metric,filter` name by its metric), and its
    `gen_kwargs` go to a task that generates: found now, not when the first trial has run."""
    for i, t in enumerate(config.tasks):
        if t.source != "lm-eval":
            continue
        leaves = _leaf_configs(manager, t.task)
        for leaf, cfg, _ in leaves:
            declared = [m.get("metric") for m in cfg.get("metric_list") or [] if isinstance(m, dict)]
            if declared and t.metric.split(",")[0] not in declared and len(leaves) == 1:
                raise FitnessError(f"fitness.tasks.{i}.metric: task {leaf!r} declares metrics "
                                   f"{', '.join(map(str, declared))}, not {t.metric[:100]!r}")
            if t.gen_kwargs and cfg.get("output_type") != "generate_until":
                raise FitnessError(f"fitness.tasks.{i}.gen_kwargs: task {leaf!r} is {cfg.get('output_type')}, "
                                   "not generate_until: it generates nothing")


def _data_files(cfg: dict) -> list[str]:
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


def check_data_files(config: FitnessConfig, manager) -> list[str]:
    """Local data files a task YAML names (`dataset_kwargs.data_files`, relative to the YAML's folder or the working
    directory) must exist: a missing one would fail every trial.  Returns the files checked."""
    checked = []
    for i, t in enumerate(config.tasks):
        if t.source != "lm-eval":
            continue
        for leaf, cfg, _ in _leaf_configs(manager, t.task):
            yaml_path = manager.task_index[leaf].yaml_path
            here = Path(yaml_path).parent if yaml_path else Path.cwd()
            for name in _data_files(cfg):
                found = next((p for p in (here / name, Path(name)) if p.is_file()), None)
                if found is None:
                    raise FitnessError(
                        f"fitness.tasks.{i}: task {leaf!r} reads data file {str(here / name)[:300]}, which does not "
                        f"exist (named in {yaml_path} under dataset_kwargs.data_files)")
                checked.append(str(found))
    return checked


def _leaf_configs(manager, name: str, depth: int = 0) -> list[tuple[str, dict, bool]]:
    """(task, raw YAML config, ships with lm-eval) for a task, or for every task under a group or tag; reads YAML
    only (no dataset download, no code from the task's `!function`s run)."""
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(name)
    if entry is None or depth > 4:
        return []
    cfg = load_yaml(entry.yaml_path, resolve_func=False) if entry.yaml_path else dict(entry.cfg or {})
    builtin = bool(entry.yaml_path) and Path(lm_eval.__file__).parent in Path(entry.yaml_path).resolve().parents
    children = cfg.get("task") if isinstance(cfg.get("task"), list) else None
    if children is None and entry.kind.name == "TAG":
        children = [k for k, e in manager.task_index.items() if name in e.tags]
    if children is not None:
        out = []
        for c in children:
            out += _leaf_configs(manager, c if isinstance(c, str) else c.get("task", ""), depth + 1)
        return out
    return [(name, cfg, builtin)]


def check_contamination(config: FitnessConfig, manager) -> None:
    """Refuse a search split that is a public benchmark's own test split, unless the study allows it.

    A search that reads a benchmark's test set overfits it: the final number then no longer measures anything.
    """
    if config.allow_test_split_search:
        return
    for i, t in enumerate(config.tasks):
        if t.source != "lm-eval":
            continue
        for leaf, cfg, builtin in _leaf_configs(manager, t.task):
            dataset = cfg.get("dataset_path")
            public = builtin or dataset in PUBLIC_BENCHMARKS
            if public and t.search_split == cfg.get("test_split", "test"):
                raise FitnessError(
                    f"fitness.tasks.{i}.search_split: {t.search_split!r} is the test split of the public benchmark "
                    f"{leaf!r} (dataset {dataset}); a search that reads a benchmark's test set makes its final score "
                    f"meaningless (contamination). Search on its training or validation split instead "
                    f"(e.g. search_split: {cfg.get('training_split') or cfg.get('validation_split') or 'train'}), "
                    f"or set fitness.allow_test_split_search: true to accept this knowingly"
                )


def stage_sizes(min_examples: int, factor: float, full: int) -> list[int]:
    """Examples per task at each racing stage: min, min·f, min·f², ... and always `full` last.

    A stage within a factor of √f of the full subset is skipped: it would save too little to pay for its check.
    """
    sizes, n = [], float(min_examples)
    while n * math.sqrt(factor) <= full:
        if not sizes or round(n) > sizes[-1]:
            sizes.append(int(round(n)))
        n *= factor
    return sizes + [full] if not sizes or sizes[-1] < full else sizes


def keep_racing(candidate: dict[str, list[float]], incumbent: dict[str, list[float]], weights: dict[str, float],
                z: float) -> bool:
    """Whether a candidate may still beat the incumbent, given its per-example scores on a prefix of the incumbent's.

    A paired test: per task, the differences candidate - incumbent on the same examples; the weighted mean
    difference plus `z` standard errors (each task's sample variance of its differences over its n) must stay
    >= 0.  Differences of two merges of the same parents are mostly zero, so this separates them with a fraction of
    the examples an unpaired bound needs.  With a single example per task the variance is unknown and taken as 1,
    the largest a difference of two scores in [0, 1] can have.
    """
    total = sum(weights.values()) or 1.0
    mean = var = 0.0
    for k, w in weights.items():
        n = len(candidate[k])
        if len(incumbent.get(k, ())) < n:
            return True  # the incumbent was not scored on these examples: nothing to compare with
        d = [c - i for c, i in zip(candidate[k], incumbent[k])]
        mean += w / total * statistics.fmean(d)
        var += (w / total) ** 2 * (statistics.variance(d) if n > 1 else 1.0) / n
    return mean + z * math.sqrt(var) >= -1e-12  # one loss in n sits exactly on the z = 1 bound: kept


class Fitness:
    """Scores whatever weights the wrapped model holds right now, on the search or the test split."""

    def __init__(self, config: FitnessConfig, model, tokenizer, device: str, seed: int = 0):
        from lm_eval.models.huggingface import HFLM

        self.config, self.model, self.tokenizer, self.device, self.seed = config, model, tokenizer, device, seed
        _memoize_lm_eval_templates()
        self.lm_tasks = [t for t in config.tasks if t.source == "lm-eval"]
        self.manager = task_manager(config) if self.lm_tasks else None
        if self.manager is not None:
            check_contamination(config, self.manager)
            check_metrics(config, self.manager)
            check_data_files(config, self.manager)
        self.callables = {t.task: _import_callable(t) for t in config.tasks if t.source == "callable"}
        self._tasks: dict[str, dict] = {}
        self._order: dict[str, list[int]] | None = None
        self._texts: dict[str, list] = {}
        self._prebuilt: dict[tuple, tuple] = {}
        self.lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size, device=device)
        self._by_name = {t.task: t for t in self.lm_tasks}
        chat = [t.task for t in self.lm_tasks if config.option(t, "apply_chat_template")]
        if chat and not getattr(tokenizer, "chat_template", None):
            raise FitnessError(f"fitness.apply_chat_template: task {chat[0]!r} asks for the chat template, but the "
                               "tokenizer has none")
        self.forward_s = 0.0
        self._time_forward()
        self._memoize_tokenization()

    def _time_forward(self) -> None:
        """Count time spent in the model's forward passes, so per-candidate overhead can be measured apart."""
        for name in ("_model_call", "_model_generate"):
            inner = getattr(self.lm, name)

            def timed(*a, _inner=inner, **kw):
                t0 = time.perf_counter()
                try:
                    return _inner(*a, **kw)
                finally:
                    self.forward_s += time.perf_counter() - t0

            setattr(self.lm, name, timed)

    def _memoize_tokenization(self) -> None:
        """The prompts are the same for every candidate and the tokenizer never changes, so each prompt (and each
        batch of prompts) is tokenized once per study instead of once per candidate; copies are handed out, so
        nothing downstream can alter a cached encoding."""
        encode, batch_encode = self.lm.tok_encode, self.lm.tok_batch_encode

        @functools.lru_cache(maxsize=65536)
        def cached_encode(string: str, *args, **kwargs) -> tuple[int, ...]:
            return tuple(encode(string, *args, **kwargs))

        @functools.lru_cache(maxsize=4096)
        def cached_batch_encode(strings: tuple[str, ...], *args, **kwargs):
            return batch_encode(list(strings), *args, **kwargs)

        self.lm.tok_encode = lambda string, *a, **kw: list(cached_encode(string, *a, **kw))
        self.lm.tok_batch_encode = lambda strings, *a, **kw: tuple(
            x.clone() for x in cached_batch_encode(tuple(strings), *a, **kw))

    def tasks(self, split: str) -> dict:
        """The lm-eval task dict for one split ('search' or 'test'), built on first use and reused after."""
        if split not in self._tasks:
            loaded = self.manager.load([t.task for t in self.lm_tasks])
            for t in self.lm_tasks:
                task = loaded["tasks"].get(t.task)
                leaves = [task] if task is not None else [
                    loaded["tasks"][c] for c in _flatten(loaded.get("group_map", {}), t.task) if c in loaded["tasks"]]
                name = t.search_split if split == "search" else t.test_split
                for leaf in leaves:
                    if name not in leaf.dataset:
                        raise FitnessError(
                            f"fitness.tasks.{t.task}.{split}_split: split {name!r} not in the data; "
                            f"available: {', '.join(leaf.dataset)}"
                        )
                    leaf.config.test_split = name
                    self._set_options(t, leaf)
                    _memoize_targets(leaf)
            self._tasks[split] = loaded
        return self._tasks[split]

    def _set_options(self, t: TaskConfig, leaf) -> None:
        """num_fewshot and gen_kwargs as lm-eval's simple_evaluate sets them: a task whose YAML says 0 shots keeps 0,
        generation kwargs update the task's own, few-shot examples drawn with lm-eval's default seed."""
        shots = self.config.option(t, "num_fewshot")
        if shots is not None and leaf.get_config("num_fewshot") != 0:
            leaf.set_config(key="num_fewshot", value=shots)
            leaf.set_fewshot_seed(seed=FEWSHOT_SEED)
        gen = self.config.option(t, "gen_kwargs")  # a task's own on a non-generating task: refused by check_metrics
        if gen and leaf.get_config("output_type") == "generate_until":  # the study's: generating tasks, as lm-eval
            leaf.set_config(key="generation_kwargs", value=gen, update=True)

    def _chat(self, t: TaskConfig | None) -> dict:
        """build_all_requests' chat arguments for a task (None: the study's), as lm-eval's evaluate passes them."""
        on = self.config.option(t, "apply_chat_template") if t else self.config.apply_chat_template
        multi = self.config.option(t, "fewshot_as_multiturn") if t else self.config.fewshot_as_multiturn
        if not on:
            return {}
        return {"apply_chat_template": True, "fewshot_as_multiturn": bool(multi),
                "chat_template": self.lm.apply_chat_template, "tokenizer_name": self.lm.tokenizer_name}

    def _task_limit(self, name: str, split: str, limit: int | None) -> int | None:
        """A single task's examples: on the search split its own search subset when it has one."""
        t = self._by_name.get(name)
        return self.config.search_limit(t) if split == "search" and t is not None and t.limit else limit

    # ---------------------------------------------------------------- scoring
    def score(self, split: str = "search", incumbent: dict[str, list[float]] | None = None) -> Score:
        """Evaluate the model as it is now; NaN metrics raise, so a broken candidate fails its trial.

        `incumbent` is the best full-fidelity trial's `example_scores`; with racing on, the candidate is raced
        against it on the search split.  The test split is always scored in full.
        """
        if split not in ("search", "test"):
            raise ValueError(f"split must be 'search' or 'test', not {split!r}")
        f0 = self.forward_s
        if self.config.racing is not None and split == "search" and self.lm_tasks:
            score = self._race(incumbent)
        else:
            per_task, examples, _ = self._lm_eval(split, limit=self.config.limit) if self.lm_tasks else ({}, 0, {})
            other, n = self._other(split)
            per_task.update(other)
            score = Score(self._weighted(per_task), per_task, examples + n)
        score.forward_s = self.forward_s - f0
        return score

    def _weighted(self, per_task: dict[str, float]) -> float:
        total = sum(t.weight for t in self.config.tasks) or 1.0
        return sum(t.weight * per_task[t.task] for t in self.config.tasks) / total

    def _lm_eval(self, split: str, limit: int | None = None, samples: dict[str, list[int]] | None = None
                 ) -> tuple[dict[str, float], int, dict[str, list]]:
        """Per task: the configured metric's value, the examples scored, and its per-example values (single tasks)."""
        loaded = self.tasks(split)
        leaves = all(t.task in loaded["tasks"] for t in self.lm_tasks) and not any(
            "bypass" in getattr(task, "_metric_fn_list", {}) for task in loaded["tasks"].values())
        if leaves:
            results, examples, raw = self._run_prebuilt(split, limit, samples)
        else:  # groups: lm-eval aggregates their members its own way
            (results, examples), raw = self._evaluate(loaded, limit, samples), {}
        per_task: dict[str, float] = {}
        per_example: dict[str, list] = {}
        for t in self.lm_tasks:
            if t.task not in results:
                continue
            metrics = results[t.task]
            key = next((k for k in metrics if k == t.metric or k.split(",")[0] == t.metric), None)
            if key is None:
                names = sorted({k.split(",")[0] for k in metrics if not k.endswith("_stderr") and k != "alias"})
                raise FitnessError(f"fitness.tasks.{t.task}.metric: {t.metric!r} not reported; reported: {names}")
            value = float(metrics[key])
            if math.isnan(value):
                raise FloatingPointError(f"task {t.task}: metric {t.metric} is NaN")
            per_task[t.task] = value
            if key in raw.get(t.task, {}):
                per_example[t.task] = raw[t.task][key]
        return per_task, examples, per_example

    def _evaluate(self, loaded: dict, limit: int | None,
                  samples: dict[str, list[int]] | None) -> tuple[dict[str, dict], int]:
        """`lm_eval.evaluator.evaluate` itself: {task: {"metric,filter": value}} and the examples scored."""
        from lm_eval.evaluator import evaluate

        if samples is not None:
            loaded = {"tasks": {k: loaded["tasks"][k] for k in samples}, "groups": {}}
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):  # lm-eval's per-call progress bars
            out = evaluate(
                self.lm, loaded, limit=limit, samples=samples, cache_requests=False, bootstrap_iters=0,
                log_samples=False, verbosity="ERROR", apply_chat_template=self.config.apply_chat_template,
                fewshot_as_multiturn=self.config.fewshot_as_multiturn,
            )
        examples = sum(v.get("effective", v.get("original", 0)) for v in out.get("n-samples", {}).values())
        return out["results"], examples

    def _requests(self, split: str, name: str, limit: int | None, indices: list[int] | None):
        """A task's request Instances and documents for one split and example subset, built once: the tasks and
        documents are fixed for the whole study, so only the model's answers change between candidates."""
        from lm_eval.evaluator_utils import get_sample_size

        key = (split, name, limit, None if indices is None else tuple(indices))
        if key not in self._prebuilt:
            task = self.tasks(split)["tasks"][name]
            n = get_sample_size(task, limit)
            with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
                task.build_all_requests(limit=n, samples=indices, rank=0, world_size=1, cache_requests=False,
                                        **self._chat(self._by_name.get(name)))
            docs = list(task.doc_iterator(rank=0, limit=n, world_size=1, samples=indices))
            self._prebuilt[key] = (task, list(task.instances), docs)
        return self._prebuilt[key]

    def _run_prebuilt(self, split: str, limit: int | None, samples: dict[str, list[int]] | None
                      ) -> tuple[dict[str, dict], int, dict[str, dict[str, list]]]:
        """What `evaluate` computes for single tasks (same requests, filters, `process_results` and aggregation, the
        first filter reporting a metric wins as in its results), without rebuilding the requests per candidate; also
        each metric's per-example values, in document order, for racing's paired comparison."""
        from collections import defaultdict

        from lm_eval.api.metrics import mean

        names = list(samples) if samples is not None else list(self.tasks(split)["tasks"])
        built = {k: self._requests(split, k, self._task_limit(k, split, limit),
                                   samples.get(k) if samples is not None else None) for k in names}
        by_type: dict[str, list] = defaultdict(list)
        for task, instances, _ in built.values():
            for inst in instances:
                inst.resps, inst.filtered_resps = [], {}
                by_type[inst.request_type].extend([inst] * inst.repeats)
        for reqtype, reqs in by_type.items():
            with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):  # HFLM's progress bar
                resps = getattr(self.lm, reqtype)(reqs)
            for inst, resp in zip(reqs, resps, strict=True):
                inst.resps.append(resp)
        results: dict[str, dict] = {}
        per_example: dict[str, dict[str, list]] = {}
        examples = 0
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

    def _other(self, split: str) -> tuple[dict[str, float], int]:
        """Perplexity and callable tasks (never raced: their cost is their own)."""
        per_task, examples = {}, 0
        for t in self.config.tasks:
            if t.source == "perplexity":
                per_task[t.task], n = self._inverse_perplexity(t.search_split if split == "search" else t.test_split)
                examples += n
            elif t.source == "callable":
                value = float(self.callables[t.task](self.model, self.tokenizer, split))
                if math.isnan(value):
                    raise FloatingPointError(f"task {t.task}: {t.function} returned NaN")
                per_task[t.task] = value
        return per_task, examples

    def _inverse_perplexity(self, path: str) -> tuple[float, int]:
        """1 / perplexity of the model on a text file (one document per non-empty line): in (0, 1], higher is
        better, so it weighs against accuracy-like metrics without a sign flip."""
        import torch

        if path not in self._texts:
            lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
            self._texts[path] = [self.tokenizer(ln, return_tensors="pt").input_ids[0] for ln in lines]
        nll, tokens = 0.0, 0
        with torch.no_grad():
            for ids in self._texts[path]:
                if len(ids) < 2:
                    continue
                ids = ids[: self.lm.max_length].to(self.model.device).unsqueeze(0)
                t0 = time.perf_counter()
                logits = self.model(ids).logits.float()
                self.forward_s += time.perf_counter() - t0
                nll += torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
                tokens += ids.shape[1] - 1
        if tokens == 0:
            raise FitnessError(f"{path}: no line with two or more tokens to compute perplexity on")
        mean = nll / tokens
        if math.isnan(mean):
            raise FloatingPointError(f"perplexity on {path} is NaN")
        return math.exp(-mean), len(self._texts[path])

    # ---------------------------------------------------------------- racing
    def _stage_order(self) -> dict[str, list[int]]:
        """Per task, a fixed permutation of its search examples (within `limit`); stages are its prefixes."""
        if self._order is None:
            loaded = self.tasks("search")
            self._order = {}
            for t in self.lm_tasks:
                task = loaded["tasks"].get(t.task)
                if task is None:
                    raise FitnessError(f"fitness.racing: task {t.task!r} is a group; racing needs single tasks")
                from lm_eval.api.metrics import mean

                if task.aggregation().get(t.metric) is not mean:
                    raise FitnessError(f"fitness.racing: {t.task}.{t.metric} is not averaged over examples, so "
                                       "scores on subsets do not add up; turn racing off for this study")
                n = len(task.eval_docs)
                limit = self.config.search_limit(t)
                n = min(n, limit) if limit else n
                order = list(range(n))
                random.Random(f"{self.seed}:{t.task}").shuffle(order)
                self._order[t.task] = order
        return self._order

    def _race(self, incumbent: dict[str, list[float]] | None) -> Score:
        rc = self.config.racing
        order = self._stage_order()
        sizes = {k: stage_sizes(rc.min_examples, rc.reduction_factor, len(v)) for k, v in order.items()}
        n_stages = max(len(s) for s in sizes.values())
        weights = {t.task: t.weight for t in self.lm_tasks}
        done = {k: 0 for k in order}
        values: dict[str, list[float]] = {k: [] for k in order}
        stages: list[dict] = []
        examples = 0
        for s in range(n_stages):
            target = {k: v[min(s, len(v) - 1)] for k, v in sizes.items()}
            samples = {k: order[k][done[k]:target[k]] for k in order if target[k] > done[k]}
            _, n, new = self._lm_eval("search", samples=samples)
            examples += n
            for k in samples:
                values[k] += [float(v) for v in new[k]]
            done = target
            stages.append({"examples": dict(done), "per_task": {k: statistics.fmean(v) for k, v in values.items()}})
            last = s == n_stages - 1
            if not last and incumbent is not None and not keep_racing(values, incumbent, weights, rc.z):
                break
        full = all(done[k] == len(order[k]) for k in order)
        per_task = dict(stages[-1]["per_task"])
        if not full:  # the incumbent's full score plus the paired difference: a control variate, far less noisy
            per_task = {k: statistics.fmean(incumbent[k]) + per_task[k] - statistics.fmean(incumbent[k][:done[k]])
                        for k in per_task}
        other, n = self._other("search")
        per_task.update(other)
        return Score(self._weighted(per_task), per_task, examples + n, stages, full, values)


def _flatten(group_map: dict, name: str) -> list[str]:
    out = []
    for c in group_map.get(name, []):
        out += _flatten(group_map, c) if c in group_map else [c]
    return out


def _import_callable(t: TaskConfig):
    """`module:function` from the study file, imported once; the study file is trusted code, like lm-eval's
    `!function` task hooks."""
    module, _, name = t.function.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise FitnessError(f"fitness.tasks.{t.task}.function: cannot import {t.function!r} ({e})") from None
    if not callable(fn):
        raise FitnessError(f"fitness.tasks.{t.task}.function: {t.function!r} is not callable")
    return fn


def check_tasks(config: FitnessConfig) -> list[str]:
    """Offline checks of the fitness setup for ``run --check``: task names known to lm-eval, metric names declared
    by the task YAMLs, contamination, callables importable.  Reads YAML only; datasets are not downloaded, so
    split names of Hub datasets are not checked (the notes returned say so)."""
    notes = []
    manager = task_manager(config) if any(t.source == "lm-eval" for t in config.tasks) else None
    if manager is not None:
        check_contamination(config, manager)
        check_metrics(config, manager)
        for f in check_data_files(config, manager):
            notes.append(f"data file {f}: exists")
    for t in config.tasks:
        if t.source == "callable":
            _import_callable(t)
            notes.append(f"task {t.task}: callable {t.function} imports")
        elif t.source == "perplexity":
            notes.append(f"task {t.task}: perplexity text files exist")
        else:
            leaves = _leaf_configs(manager, t.task)
            datasets = sorted({str(c.get("dataset_path") or "custom_dataset") for _, c, _ in leaves})
            notes.append(f"task {t.task}: known to lm-eval ({len(leaves)} task(s), dataset {', '.join(datasets)}); "
                         f"splits {t.search_split!r}/{t.test_split!r} not checked (the data is not downloaded)")
    return notes
