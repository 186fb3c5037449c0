"""Search spaces: genome <-> recipe, and everything else that depends on the kind of space."""
from .base import SearchSpace
from .build import build_space, setup_signature
from .dataflow import DataflowSpace, PositionsLayout, PublishedLayout
from .parameter import ParameterSpace, Range

__all__ = ["SearchSpace", "ParameterSpace", "DataflowSpace", "PublishedLayout", "PositionsLayout", "Range",
           "build_space", "setup_signature"]
