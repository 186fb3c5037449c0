"""Storage URLs: checked before a study touches its database, and printed without their password."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .config import ConfigError


def safe_url(url: str) -> str:
    """A storage URL fit for printing: the password, if any, masked."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<storage URL>"


def check_storage_url(url: str, file: str | Path = "--storage", field: str = "") -> str:
    """A usable SQLAlchemy URL: parsed, with an installed driver (`postgresql://` picks psycopg 3 when psycopg2 is
    absent); the password never appears in the message."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        u = make_url(url)
    except ArgumentError:
        raise ConfigError(file, field, "not a database URL; expected e.g. sqlite:///study.db or "
                                       "postgresql://user@host:5432/db") from None
    if u.drivername == "postgresql" and importlib.util.find_spec("psycopg2") is None:
        u = u.set(drivername="postgresql+psycopg")
    try:
        u.get_dialect().import_dbapi()
    except Exception as e:  # noqa: BLE001 - SQLAlchemy raises NoSuchModuleError or the driver's ImportError
        hint = " (pip install 'evomerge[postgres]')" if u.get_backend_name() == "postgresql" else ""
        raise ConfigError(file, field, f"no database driver for {u.drivername!r}{hint}: {e}") from None
    return u.render_as_string(hide_password=False)

