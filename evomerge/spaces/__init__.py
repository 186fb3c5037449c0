"""Search spaces: genome <-> recipe."""
from .base import SearchSpace
from .dataflow import DataflowSpace
from .parameter import ParameterSpace, Range

__all__ = ["SearchSpace", "ParameterSpace", "DataflowSpace", "Range"]
