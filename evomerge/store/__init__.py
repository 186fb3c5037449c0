"""The study store: the one place that reads and writes a study in its DB (see `rdb`) and the trial schema
(`records`)."""
from .rdb import LOCK_NAMESPACE, StorageError, StudyBusy, StudyMismatch, StudyStore, missing_sqlite_file, storage_error
from .records import ATTR, RACED_OUT, TrialRecord, pareto_front, ranked

__all__ = ["ATTR", "LOCK_NAMESPACE", "RACED_OUT", "StorageError", "StudyBusy", "StudyMismatch", "StudyStore", "TrialRecord",
           "missing_sqlite_file", "pareto_front", "ranked", "storage_error"]
