"""Reading model directories safely, and the architecture facts the rest of the house needs.

Model files are never unpickled: safetensors first, legacy ``.bin`` only through ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open


class ModelFilesError(ValueError):
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
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelFilesError(f"{cfg_file}: not valid JSON ({e})") from e
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
            for k, v in _load_bin(f).items():
                shapes[k] = tuple(v.shape)
    return ModelInfo(path=path, config=config, shapes=shapes)


def _load_bin(f: Path) -> dict[str, torch.Tensor]:
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
            out.update({k: v.to(device) for k, v in _load_bin(f).items()})
    return out


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
                raise ModelFilesError(
                    f"{other.path}: tensor {name} has shape {list(other.shapes[name])}, "
                    f"but {list(shape)} in {ref.path}; parents must have identical shapes"
                )
        extra = sorted(set(other.shapes) - set(ref.shapes))
        if extra:
            raise ModelFilesError(f"{other.path}: tensor {extra[0]} is not in {ref.path}")


def pick_device(requested: str = "auto") -> torch.device:
    """CUDA when present, CPU otherwise: one code path for both."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)
