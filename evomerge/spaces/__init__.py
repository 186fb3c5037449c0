"""Search spaces: genome <-> recipe."""
from .base import SearchSpace
from .parameter import ParameterSpace, Range

__all__ = ["SearchSpace", "ParameterSpace", "Range"]
