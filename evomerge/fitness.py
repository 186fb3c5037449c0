"""Fitness: lm-eval tasks built once per worker, perplexity on local text, or a user callable; weighted scores.

Tasks and their documents are fixed for the whole study, so each task's request Instances are built once per split
and example subset (and each prompt tokenized once); per candidate only the model calls run, then lm-eval's own
filters, `process_results` and aggregation - what `lm_eval.evaluator.evaluate` does, without rebuilding requests
(groups still go through `evaluate`, which aggregates them its own way).  How lm-eval is driven lives in `lmeval`;
this module holds the policy: which split and options each task gets, the contamination guard, the checks made
before the first trial, perplexity and callable sources, and racing (the rules in `racing`) on the search split.
"""
from __future__ import annotations

import importlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import lmeval, racing
from .config import FitnessConfig, TaskConfig
from .errors import EvomergeError


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


def task_index(config: FitnessConfig) -> lmeval.TaskIndex:
    """lm-eval's index of the study's tasks; a task it does not know is refused, naming those it does."""
    names = [t.task for t in config.tasks if t.source == "lm-eval"]
    index = lmeval.TaskIndex(config.include_path, names)
    unknown = index.unknown(names)
    if unknown:
        bad = lmeval.skipped_task_files(config.include_path)
        skipped = f" (lm-eval skipped {len(bad)} unreadable task file(s): {'; '.join(bad[:3])})" if bad else ""
        raise FitnessError(
            f"fitness.tasks: lm-eval does not know task {unknown[0][:200]!r}; "
            f"tasks under fitness.include_path: {', '.join(sorted(index.local)) or 'none'}{skipped}"
        )
    return index


def check_metrics(config: FitnessConfig, index: lmeval.TaskIndex) -> None:
    """Each task's metric is one its task YAML declares (a `metric,filter` name by its metric), and its
    `gen_kwargs` go to a task that generates: found now, not when the first trial has run."""
    for i, t in enumerate(config.tasks):
        if t.source != "lm-eval":
            continue
        leaves = index.leaves(t.task)
        for leaf in leaves:
            declared = [m.get("metric") for m in leaf.config.get("metric_list") or [] if isinstance(m, dict)]
            if declared and t.metric.split(",")[0] not in declared and len(leaves) == 1:
                raise FitnessError(f"fitness.tasks.{i}.metric: task {leaf.name!r} declares metrics "
                                   f"{', '.join(map(str, declared))}, not {t.metric[:100]!r}")
            output_type = leaf.config.get("output_type")
            if t.gen_kwargs and output_type != "generate_until":
                raise FitnessError(f"fitness.tasks.{i}.gen_kwargs: task {leaf.name!r} is {output_type}, "
                                   "not generate_until: it generates nothing")


def check_data_files(config: FitnessConfig, index: lmeval.TaskIndex) -> list[str]:
    """Local data files a task YAML names (`dataset_kwargs.data_files`, relative to the YAML's folder or the working
    directory) must exist: a missing one would fail every trial.  Returns the files checked."""
    checked = []
    for i, t in enumerate(config.tasks):
        if t.source != "lm-eval":
            continue
        for leaf in index.leaves(t.task):
            here = Path(leaf.yaml_path).parent if leaf.yaml_path else Path.cwd()
            for name in lmeval.data_files(leaf.config):
                found = next((p for p in (here / name, Path(name)) if p.is_file()), None)
                if found is None:
                    raise FitnessError(
                        f"fitness.tasks.{i}: task {leaf.name!r} reads data file {str(here / name)[:300]}, which does "
                        f"not exist (named in {leaf.yaml_path} under dataset_kwargs.data_files)")
                checked.append(str(found))
    return checked


def check_contamination(config: FitnessConfig, index: lmeval.TaskIndex) -> None:
    """Refuse a search split that is a public benchmark's own test split, unless the study allows it.

    A search that reads a benchmark's test set overfits it: the final number then no longer measures anything.
    """
    if config.allow_test_split_search:
        return
    for i, t in enumerate(config.tasks):
        if t.source != "lm-eval":
            continue
        for leaf in index.leaves(t.task):
            cfg = leaf.config
            dataset = cfg.get("dataset_path")
            public = leaf.builtin or dataset in PUBLIC_BENCHMARKS
            if public and t.search_split == cfg.get("test_split", "test"):
                raise FitnessError(
                    f"fitness.tasks.{i}.search_split: {t.search_split!r} is the test split of the public benchmark "
                    f"{leaf.name!r} (dataset {dataset}); a search that reads a benchmark's test set makes its final "
                    f"score meaningless (contamination). Search on its training or validation split instead "
                    f"(e.g. search_split: {cfg.get('training_split') or cfg.get('validation_split') or 'train'}), "
                    f"or set fitness.allow_test_split_search: true to accept this knowingly"
                )


class Fitness:
    """Scores whatever weights the wrapped model holds right now, on the search or the test split."""

    def __init__(self, config: FitnessConfig, model, tokenizer, device: str, seed: int = 0):
        self.config, self.model, self.tokenizer, self.device, self.seed = config, model, tokenizer, device, seed
        self.lm_tasks = [t for t in config.tasks if t.source == "lm-eval"]
        self.index = task_index(config) if self.lm_tasks else None
        if self.index is not None:
            check_contamination(config, self.index)
            check_metrics(config, self.index)
            check_data_files(config, self.index)
        self.callables = {t.task: _import_callable(t) for t in config.tasks if t.source == "callable"}
        self._tasks: dict[str, dict] = {}
        self._order: dict[str, list[int]] | None = None
        self._texts: dict[str, list] = {}
        self._prebuilt: dict[tuple, tuple] = {}
        self.lm = lmeval.resident_lm(model, tokenizer, device, config.batch_size)
        self._by_name = {t.task: t for t in self.lm_tasks}
        chat = [t.task for t in self.lm_tasks if config.option(t, "apply_chat_template")]
        if chat and not getattr(tokenizer, "chat_template", None):
            raise FitnessError(f"fitness.apply_chat_template: task {chat[0]!r} asks for the chat template, but the "
                               "tokenizer has none")
        self._perplexity_s = 0.0

    @property
    def forward_s(self) -> float:
        """Seconds spent in the model's forward passes (lm-eval's and perplexity's), so per-candidate overhead can
        be measured apart."""
        return self.lm.forward_s + self._perplexity_s

    def tasks(self, split: str) -> dict:
        """The lm-eval task dict for one split ('search' or 'test'), built on first use and reused after."""
        if split not in self._tasks:
            loaded = self.index.load([t.task for t in self.lm_tasks])
            for t in self.lm_tasks:
                name = t.search_split if split == "search" else t.test_split
                for leaf in lmeval.members(loaded, t.task):
                    if name not in lmeval.splits(leaf):
                        raise FitnessError(
                            f"fitness.tasks.{t.task}.{split}_split: split {name!r} not in the data; "
                            f"available: {', '.join(lmeval.splits(leaf))}"
                        )
                    # a task's own gen_kwargs on a non-generating task: refused by check_metrics
                    lmeval.prepare(leaf, name, self.config.option(t, "num_fewshot"),
                                   self.config.option(t, "gen_kwargs"))
            self._tasks[split] = loaded
        return self._tasks[split]

    def _chat(self, t: TaskConfig | None) -> dict:
        """build_all_requests' chat arguments for a task (None: the study's)."""
        on = self.config.option(t, "apply_chat_template") if t else self.config.apply_chat_template
        multi = self.config.option(t, "fewshot_as_multiturn") if t else self.config.fewshot_as_multiturn
        return lmeval.chat_options(self.lm, on, multi)

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
            lmeval.bypasses_metrics(task) for task in loaded["tasks"].values())
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
        return lmeval.evaluate(self.lm, loaded, limit, samples, self.config.apply_chat_template,
                               self.config.fewshot_as_multiturn)

    def _requests(self, split: str, name: str, limit: int | None, indices: list[int] | None) -> tuple:
        """A task's request Instances and documents for one split and example subset, built once: the tasks and
        documents are fixed for the whole study, so only the model's answers change between candidates."""
        key = (split, name, limit, None if indices is None else tuple(indices))
        if key not in self._prebuilt:
            task = self.tasks(split)["tasks"][name]
            instances, docs = lmeval.build_requests(task, limit, indices, self._chat(self._by_name.get(name)))
            self._prebuilt[key] = (task, instances, docs)
        return self._prebuilt[key]

    def _run_prebuilt(self, split: str, limit: int | None, samples: dict[str, list[int]] | None
                      ) -> tuple[dict[str, dict], int, dict[str, dict[str, list]]]:
        """What `evaluate` computes for single tasks, without rebuilding the requests per candidate; also each
        metric's per-example values, in document order, for racing's paired comparison."""
        names = list(samples) if samples is not None else list(self.tasks(split)["tasks"])
        built = {k: self._requests(split, k, self._task_limit(k, split, limit),
                                   samples.get(k) if samples is not None else None) for k in names}
        return lmeval.score_prebuilt(self.lm, built)

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
                self._perplexity_s += time.perf_counter() - t0
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
                if not lmeval.averaged(task, t.metric):
                    raise FitnessError(f"fitness.racing: {t.task}.{t.metric} is not averaged over examples, so "
                                       "scores on subsets do not add up; turn racing off for this study")
                n = lmeval.example_count(task)
                limit = self.config.search_limit(t)
                self._order[t.task] = racing.example_order(t.task, min(n, limit) if limit else n, self.seed)
        return self._order

    def _race(self, incumbent: dict[str, list[float]] | None) -> Score:
        """The search split raced against the incumbent (see `racing`); perplexity and callables scored in full."""
        rc = self.config.racing

        def score(samples: dict[str, list[int]]) -> tuple[int, dict[str, list]]:
            _, n, new = self._lm_eval("search", samples=samples)
            return n, new

        r = racing.race(self._stage_order(), score, incumbent, {t.task: t.weight for t in self.lm_tasks},
                        rc.min_examples, rc.reduction_factor, rc.z)
        per_task = dict(r.per_task)
        other, n = self._other("search")
        per_task.update(other)
        return Score(self._weighted(per_task), per_task, r.examples + n, r.stages, r.full, r.values)


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
    index = task_index(config) if any(t.source == "lm-eval" for t in config.tasks) else None
    if index is not None:
        check_contamination(config, index)
        check_metrics(config, index)
        for f in check_data_files(config, index):
            notes.append(f"data file {f}: exists")
    for t in config.tasks:
        if t.source == "callable":
            _import_callable(t)
            notes.append(f"task {t.task}: callable {t.function} imports")
        elif t.source == "perplexity":
            notes.append(f"task {t.task}: perplexity text files exist")
        else:
            leaves = index.leaves(t.task)
            datasets = sorted({str(leaf.config.get("dataset_path") or "custom_dataset") for leaf in leaves})
            notes.append(f"task {t.task}: known to lm-eval ({len(leaves)} task(s), dataset {', '.join(datasets)}); "
                         f"splits {t.search_split!r}/{t.test_split!r} not checked (the data is not downloaded)")
    return notes
