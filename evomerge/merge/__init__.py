"""Merge methods and materialization."""
from .materialize import Materializer, RecipeMismatch, write_model
from .methods import METHODS, MergeMethod, get_method

__all__ = ["METHODS", "MergeMethod", "get_method", "Materializer", "RecipeMismatch", "write_model"]
