"""The search-space kinds a study file may name, as plain data: what each kind asks of the rest of the study.

Torch-free, so the study-file schema asks a kind what it needs instead of switching on its name; the space classes
that serve each kind register themselves in `SearchSpace.by_kind`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

KindName = Literal["ps", "dfs", "ps+dfs"]


@dataclass(frozen=True)
class Kind:
    """``merges``: a candidate is the parents merged tensor by tensor by ``merge.method`` (a parameter space), so the
    models share every shape and a task-vector method needs the base; otherwise a candidate runs the models' layers
    as they are (data flow), models may differ in depth and ``merge.method`` never applies.  ``model_a``: the space
    takes model A from the best recipe of another (ps) study, ``models.a_from_study``."""

    name: KindName
    merges: bool
    model_a: bool = False


KINDS: dict[str, Kind] = {k.name: k for k in (Kind("ps", merges=True), Kind("dfs", merges=False),
                                               Kind("ps+dfs", merges=False, model_a=True))}
