"""Reading model directories safely, and the architecture facts the rest of the house needs.

Model files are never unpickled: safetensors first, legacy ``.bin`` only through ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import EvomergeError


class ModelFilesError(EvomergeError, ValueError):
    """A model directory that cannot be used: missing, unreadable, corrupt, or not matching its siblings."""


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EMBED = ("embed_tokens", "wte", "wpe", "word_embeddings", "embed_in")


def tensor_group(name: str) -> str:
    """The merge group of a tensor: ``embed``, ``layers.<i>`` or ``head`` (final norm, LM head, anything else).

    Groups are what a parameter-space genome assigns weights and densities to.
    """
    m = _LAYER.search(name)
    if m:
        return f"layers.{m.group(1)}"
    if any(e in name for e in _EMBED):
        return "embed"
    return "head"


MODULES = ("self_attn", "mlp")


def recipe_group(name: str, groups: Iterable[str]) -> str:
    """The recipe group that sets tensor `name`: a module group ``layers.<i>.<filter>`` of its layer whose filter is
    a substring of the name (the first such group in the recipe's order, as mergekit takes the first matching
    filter), else its layer group ``layers.<i>`` (for a layer split into modules: the rest, i.e. the norms)."""
    g = tensor_group(name)
    if g.startswith("layers."):
        prefix = g + "."
        for key in groups:
            if key.startswith(prefix) and key[len(prefix):] in name:
                return key
    return g


def recipe_groups(names: Iterable[str], groups: Iterable[str]) -> dict[str, str]:
    """`recipe_group` for every tensor name, computed once per recipe rather than once per tensor and trial."""
    keys = list(groups)
    return {n: recipe_group(n, keys) for n in names}


def group_order(group: str) -> tuple[int, int]:
    """Sort key putting merge groups in model order: embed, layers.0, layers.1, ..., head."""
    if group == "embed":
        return (0, 0)
    if group.startswith("layers."):
        return (1, int(group.split(".")[1]))
    return (2, 0)


@dataclass(frozen=True)
class ModelInfo:
    """What evomerge needs to know of one model directory without loading its weights."""

    path: Path
    config: dict
    shapes: dict[str, tuple[int, ...]]

    @property
    def num_layers(self) -> int:
        return int(self.config.get("num_hidden_layers") or self.config.get("n_layer") or 0)

    @property
    def architecture(self) -> str:
        return ",".join(self.config.get("architectures") or [self.config.get("model_type", "?")])


def weight_files(path: Path) -> list[Path]:
    """The weight files of a model directory, safetensors preferred over legacy .bin."""
    if not path.is_dir():
        raise ModelFilesError(f"{path}: not a model directory (it does not exist or is not a folder)")
    for pattern in ("*.safetensors", "*.bin"):
        files = sorted(p for p in path.glob(pattern) if not p.name.startswith("training_args"))
        if files:
            return files
    raise ModelFilesError(f"{path}: no *.safetensors or *.bin weight files")


def inspect_model(path: str | Path) -> ModelInfo:
    """Read config.json and the tensor shapes (headers only for safetensors)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelFilesError(f"{path}: config.json is missing; a model directory in Hugging Face format is expected")
    config = read_config(cfg_file)
    shapes: dict[str, tuple[int, ...]] = {}
    for f in weight_files(path):
        if f.suffix == ".safetensors":
            try:
                with safe_open(f, framework="pt") as st:
                    for k in st.keys():
                        shapes[k] = tuple(st.get_slice(k).get_shape())
            except Exception as e:  # safetensors raises several types for a corrupt header
                raise ModelFilesError(f"{f}: not a readable safetensors file ({e})") from e
        else:
            for k, v in load_bin(f).items():
                shapes[k] = tuple(v.shape)
    return ModelInfo(path=path, config=config, shapes=shapes)


MAX_CONFIG_BYTES = 1 << 20
_POSITIVE_INTS = ("num_hidden_layers", "n_layer", "hidden_size", "n_embd", "num_attention_heads", "n_head",
                  "intermediate_size", "vocab_size", "max_position_embeddings", "num_key_value_heads")


def read_config(cfg_file: Path) -> dict:
    """A model's config.json, checked for the shape and types evomerge and transformers rely on: a JSON object,
    its layer and size counts positive integers, `architectures` a list of names, `model_type` a name."""
    try:
        if cfg_file.stat().st_size > MAX_CONFIG_BYTES:
            raise ModelFilesError(f"{cfg_file}: larger than {MAX_CONFIG_BYTES} bytes; not a model config")
        config = json.loads(cfg_file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ModelFilesError(f"{cfg_file}: not UTF-8 text (byte offset {e.start})") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise ModelFilesError(f"{cfg_file}: not valid JSON ({str(e)[:200]})") from None
    except OSError as e:
        raise ModelFilesError(f"{cfg_file}: cannot be read ({e.strerror})") from None
    if not isinstance(config, dict):
        raise ModelFilesError(f"{cfg_file}: expected a JSON object of fields, got a {type(config).__name__}")
    for key in _POSITIVE_INTS:
        v = config.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ModelFilesError(f"{cfg_file}: {key} must be a positive integer, got {str(v)[:60]!r}")
    archs = config.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise ModelFilesError(f"{cfg_file}: architectures must be a list of class names, got {str(archs)[:60]!r}")
    if "model_type" in config and not isinstance(config["model_type"], str):
        raise ModelFilesError(f"{cfg_file}: model_type must be a name, got {str(config['model_type'])[:60]!r}")
    if not (archs or config.get("model_type")):
        raise ModelFilesError(f"{cfg_file}: names no architecture (architectures or model_type)")
    return config


_HEADER_DTYPES = {"F32": ("float32", 4), "BF16": ("bfloat16", 2), "F16": ("float16", 2), "F64": ("float32", 8)}  # merged in fp32 either way


def stored_size(path: str | Path) -> tuple[int, int, str]:
    """(parameters, bytes, dtype most parameters are stored in) of a local model directory, from its headers only."""
    params = size = 0
    by_dtype: dict[str, int] = {}
    for f in weight_files(Path(path)):
        if f.suffix != ".safetensors":
            n = sum(v.numel() for v in load_bin(f).values())
            params, size, by_dtype["float32"] = params + n, size + 4 * n, by_dtype.get("float32", 0) + n
            continue
        try:
            with safe_open(f, framework="pt") as st:
                for k in st.keys():
                    sl = st.get_slice(k)
                    n = math.prod(sl.get_shape())
                    name, width = _HEADER_DTYPES.get(sl.get_dtype(), ("float32", 4))
                    params, size, by_dtype[name] = params + n, size + width * n, by_dtype.get(name, 0) + n
        except Exception as e:  # safetensors raises several types for a corrupt header
            raise ModelFilesError(f"{f}: not a readable safetensors file ({e})") from e
    return params, size, max(by_dtype, key=by_dtype.get) if by_dtype else "float32"


def load_bin(f: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelFilesError(f"{f}: cannot be read as a weights-only PyTorch file ({e})") from e


def load_state_dict(path: str | Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a model directory, on `device`."""
    out: dict[str, torch.Tensor] = {}
    for f in weight_files(Path(path)):
        if f.suffix == ".safetensors":
            try:
                with safe_open(f, framework="pt", device=str(device)) as st:
                    for k in st.keys():
                        out[k] = st.get_tensor(k)
            except Exception as e:
                raise ModelFilesError(f"{f}: not a readable safetensors file ({e})") from e
        else:
            out.update({k: v.to(device) for k, v in load_bin(f).items()})
    return out


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def write_sharded(out_dir: Path, entries: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
                  produce: Callable[[str], torch.Tensor], max_shard_bytes: int = 2 * 1024**3) -> list[Path]:
    """Write safetensors shards (+ ``model.safetensors.index.json`` when more than one), one tensor at a time.

    Shapes and dtypes are known before any tensor is computed, so every shard's header is written first and each
    tensor is written as soon as `produce(name)` returns it: peak memory is one tensor, not one shard.  (The
    safetensors library only writes whole dicts, hence this small writer; its files read back with ``safe_open``.)
    """
    shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
    size = 0
    for name, shape, dtype in entries:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tuple(shape), dtype, nbytes))
        size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    written = []
    for shard, fname in zip(shards, names):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype, nbytes in shard:
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out_dir / fname, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for name, shape, dtype, nbytes in shard:
                t = produce(name).to(device="cpu", dtype=dtype).contiguous()
                if tuple(t.shape) != shape:
                    raise ValueError(f"{name}: produced shape {list(t.shape)}, planned {list(shape)}")
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
        written.append(out_dir / fname)
    if n > 1:
        weight_map = {name: fname for shard, fname in zip(shards, names) for name, *_ in shard}
        total = sum(e[3] for shard in shards for e in shard)
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return written


_HUB_SNAPSHOT = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$")


def model_name(path: str | Path) -> str:
    """How a model is named where others will read it (a model card): its Hub id `org/name` when it is a Hub
    snapshot (how evomerge fetches a model a study names by id), else its directory's name: never a local path."""
    m = _HUB_SNAPSHOT.search(str(path))
    return f"{m.group(1)}/{m.group(2)}" if m else Path(path).name


def model_license(path: str | Path) -> str | None:
    """The license a model states: its card's YAML front matter (``license:``), else its config.json."""
    path = Path(path)
    card = path / "README.md"
    if card.is_file():
        text = card.read_text(errors="replace")
        if text.startswith("---"):
            import yaml

            try:
                front = yaml.safe_load(text.split("---", 2)[1])
            except yaml.YAMLError:
                front = None
            if isinstance(front, dict) and front.get("license"):
                return str(front["license"])
    cfg = path / "config.json"
    if cfg.is_file():
        try:
            value = json.loads(cfg.read_text()).get("license")
        except json.JSONDecodeError:
            value = None
        if value:
            return str(value)
    return None


def check_compatible(models: list[ModelInfo]) -> None:
    """Refuse parents that cannot be merged tensor by tensor, naming the first mismatch.

    Called before any evaluation, so a study never starts on parents that would fail every trial.
    """
    ref = models[0]
    for other in models[1:]:
        if other.architecture != ref.architecture:
            raise ModelFilesError(
                f"{other.path}: architecture {other.architecture} differs from {ref.path} ({ref.architecture}); "
                "parents must share one architecture"
            )
        for name, shape in ref.shapes.items():
            if name not in other.shapes:
                raise ModelFilesError(f"{other.path}: tensor {name} is missing (present in {ref.path})")
            if other.shapes[name] != shape:
                rows = tensor_group(name) in ("embed", "head") and other.shapes[name][1:] == shape[1:]
                raise ModelFilesError(
                    f"{other.path}: tensor {name} has shape {list(other.shapes[name])}, "
                    f"but {list(shape)} in {ref.path}; parents must have identical shapes"
                    + ("; if a parent added tokens, set tokenizer_source (base, union or a model) to align their "
                       "vocabularies" if rows else "")
                )
        extra = sorted(set(other.shapes) - set(ref.shapes))
        if extra:
            raise ModelFilesError(f"{other.path}: tensor {extra[0]} is not in {ref.path}")


def pick_device(requested: str = "auto") -> torch.device:
    """CUDA when present, CPU otherwise: one code path for both."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)
