"""Search spaces: genome <-> recipe, and everything else that depends on the kind of space.

`kinds` is plain data and loads alone (the study-file schema reads it without torch); the spaces themselves load on
first use of any of their names, all together, so every space class has registered its kinds by then.
"""
from typing import Any

from .kinds import KINDS, Kind, KindName

__all__ = ["KINDS", "Kind", "KindName", "SearchSpace", "ParameterSpace", "DataflowSpace", "PublishedLayout",
           "PositionsLayout", "Range", "build_space", "setup_signature"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .base import SearchSpace
    from .build import build_space, setup_signature
    from .dataflow import DataflowSpace, PositionsLayout, PublishedLayout
    from .parameter import ParameterSpace, Range

    globals().update(SearchSpace=SearchSpace, ParameterSpace=ParameterSpace, DataflowSpace=DataflowSpace,
                     PublishedLayout=PublishedLayout, PositionsLayout=PositionsLayout, Range=Range,
                     build_space=build_space, setup_signature=setup_signature)
    return globals()[name]
