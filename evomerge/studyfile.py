"""Loading a study file: the YAML read safely, the search-space preset merged in, the schema validated, then every
path resolved against the file's folder, Hub ids looked up, model headers and devices checked, before anything is
written or loaded.  A mergekit-evolve config loads as the study it means.

Search-space presets are YAML files under ``search_spaces/`` (or any path); the study may override any preset field.
"""
from __future__ import annotations

import importlib.util
import re
import stat
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .config import ConfigError, StudyConfig
from .storage_url import check_storage_url
from .userfile import check_path, exists_as, load_yaml, raise_first, resolve

PRESETS_DIR = Path(__file__).resolve().parent.parent / "search_spaces"


def _load_preset(study_path: Path, raw: Any) -> dict:
    """`search_space` may be a preset name/path string, or a mapping with `preset:` plus overrides."""
    if isinstance(raw, str):
        raw = {"preset": raw}
    if not isinstance(raw, dict):
        raise ConfigError(study_path, "search_space", "expected a preset name or a mapping")
    raw = dict(raw)
    preset = raw.pop("preset", None)
    if preset is None:
        return raw
    candidates = [study_path.parent / preset, PRESETS_DIR / preset, PRESETS_DIR / f"{preset}.yaml"]
    found = next((c for c in candidates if exists_as(c, stat.S_ISREG)), None)
    if found is None:
        names = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise ConfigError(study_path, "search_space.preset", f"{preset!r} not found; presets: {', '.join(names)}")
    data = load_yaml(found, "preset")
    return {**data, **raw}


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_snapshot(repo_id: str) -> str:
    """A Hub model's local snapshot (downloaded once into the HF cache); weights as safetensors, never pickles."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, allow_patterns=["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt"])



def _check_device_present(path: Path, device: str) -> None:
    import torch

    if device.startswith("cuda"):
        n = torch.cuda.device_count()
        index = int(device.partition(":")[2] or 0)
        if index >= n:
            raise ConfigError(path, "device", f"{device} requested, but this machine has "
                                              f"{n or 'no'} CUDA device{'s' if n != 1 else ''}; use auto or cpu")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")


def _check_models(path: Path, cfg: StudyConfig) -> None:
    """Every local model directory read as far as its headers (config.json, safetensors headers), before anything
    is written or loaded; errors name the study field.  The tokenizer comes from the base (else the first parent);
    a parameter-space merge needs identical tensor shapes (vocabulary rows aside with `merge.tokenizer_source`)."""
    from .io import ModelFilesError, check_compatible, inspect_model
    from .vocab import check_vocab_compatible

    fields = ([("models.base", cfg.models.base)] if cfg.models.base else []) + [
        (f"models.parents.{i}", p) for i, p in enumerate(cfg.models.parents)]
    local = [(f, p) for f, p in fields if exists_as(p)]
    infos = []
    for field, p in local:
        try:
            infos.append(inspect_model(p))
        except ModelFilesError as e:
            raise ConfigError(path, field, str(e)) from None
    if local and local[0][1] == (cfg.models.base or cfg.models.parents[0]):
        field, p = local[0]
        if not any((Path(p) / f).is_file() for f in TOKENIZER_FILES):
            raise ConfigError(path, field, f"{p} has no tokenizer ({', '.join(TOKENIZER_FILES[:2])}, ...): the "
                                           "candidates are scored with this model's tokenizer; copy it in")
    if not cfg.search_space.traits.merges:
        return  # a layer path may join models of different depths: build_space checks what its stream needs
    by_path = {str(p): f for f, p in local}
    try:
        if infos:
            (check_vocab_compatible if cfg.merge.tokenizer_source else check_compatible)(infos)
    except ModelFilesError as e:
        field = next((f for p, f in by_path.items() if str(e).startswith(p + ":")), "models")
        raise ConfigError(path, field, str(e)) from None


def _model_path(study: Path, field: str, p: str, download: bool) -> str:
    """A local model directory (relative to the study file), or a Hub id `org/name` that must not clash with one."""
    check_path(study, field, p)
    local = resolve(study.parent, p)
    if exists_as(local):
        return local
    if Path(local).exists():
        raise ConfigError(study, field, f"{local} is a file; a model directory (config.json, weights) is expected")
    if not _HUB_ID.match(p):
        raise ConfigError(study, field, f"model directory {local} does not exist (and {p!r} is not a Hub id org/name)")
    if not download:
        return p
    try:
        return _hub_snapshot(p)
    except Exception as e:  # noqa: BLE001 - hub errors are many; the user needs the id and the reason
        raise ConfigError(study, field, f"Hub model {p!r} is neither a local directory nor downloadable "
                                        f"({type(e).__name__}: {e}); set HF_HUB_OFFLINE=0 to allow downloads") from None


def load_study(path: str | Path, download: bool = True, task_search_path: list[str] | None = None) -> StudyConfig:
    """Parse and validate a study file, or a mergekit-evolve config as the study it means; model paths come back
    absolute and existing.

    Models given as Hub ids are fetched into the HF cache; with `download=False` (``run --check``) they are only
    checked for syntax and left as ids.  `task_search_path` (absolute folders) is mergekit-evolve's option of that
    name: where its file's tasks are found.
    """
    from .evolve import is_evolve, study_from_evolve

    path = Path(path)
    data = load_yaml(path, "study file")
    notes: list[str] = []
    if is_evolve(data):
        data, notes = study_from_evolve(data, path, task_search_path)
    elif task_search_path:
        raise ConfigError(path, "", "--task-search-path is for mergekit-evolve files; set fitness.include_path")
    if "search_space" in data:
        data["search_space"] = _load_preset(path, data["search_space"])
    try:
        cfg = StudyConfig.model_validate(data)
    except ValidationError as err:
        raise_first(path, err)
    d = path.parent
    if cfg.models.base:
        cfg.models.base = _model_path(path, "models.base", cfg.models.base, download)
    cfg.models.parents = [_model_path(path, f"models.parents.{i}", p, download) for i, p in enumerate(cfg.models.parents)]
    tok = cfg.merge.tokenizer_source
    if tok not in (None, "base", "union"):
        local = resolve(path.parent, tok)
        if local not in [cfg.models.base, *cfg.models.parents] and tok not in [cfg.models.base, *cfg.models.parents]:
            raise ConfigError(path, "merge.tokenizer_source", f"{tok!r} is not base, union, nor models.base or one of "
                                                              "models.parents")
        cfg.merge.tokenizer_source = local if Path(local).is_dir() else tok
    _check_models(path, cfg)
    if download:
        _check_device_present(path, cfg.device)
    for i, t in enumerate(cfg.fitness.tasks):
        if t.source == "perplexity":
            for split in ("search_split", "test_split"):
                check_path(path, f"fitness.tasks.{i}.{split}", getattr(t, split))
                f = resolve(d, getattr(t, split))
                if not exists_as(f, stat.S_ISREG):
                    raise ConfigError(path, f"fitness.tasks.{i}.{split}", f"text file {f} does not exist")
                setattr(t, split, f)
    for i, p in enumerate(cfg.fitness.include_path):
        check_path(path, f"fitness.include_path.{i}", p)
    cfg.fitness.include_path = [resolve(d, p) for p in cfg.fitness.include_path]
    for i, p in enumerate(cfg.fitness.include_path):
        if not exists_as(p):
            raise ConfigError(path, f"fitness.include_path.{i}", f"folder {p} does not exist")
    if cfg.storage and cfg.storage.startswith("sqlite:///") and not cfg.storage.startswith("sqlite:////"):
        cfg.storage = "sqlite:///" + resolve(d, cfg.storage.removeprefix("sqlite:///"))
    if cfg.executor.name == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError(path, "executor.name", "ray is not installed here: pip install 'evomerge[ray]'")
    if cfg.storage:
        cfg.storage = check_storage_url(cfg.storage, path, "storage")
    cfg._path = path.resolve()
    cfg._notes = notes
    return cfg

