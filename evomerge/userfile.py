"""Reading a user's YAML file safely, and the path rules every file shares.

Bounded (size, depth, alias expansion), no duplicate keys, no tags that run code; paths inside a file are relative
to that file; a path the operating system refuses is an error naming the field, never a traceback.
"""
from __future__ import annotations

import errno
import stat
from pathlib import Path

import yaml
from pydantic import ValidationError

from .config import MAX_FILE_BYTES, ConfigError
from .errors import shorten

MAX_DEPTH = 32  # YAML nesting, aliases expanded; the deepest real field is ~6 levels down
MAX_NODES = 100_000  # YAML values, aliases expanded: an alias bomb stops here, not in pydantic or a message


def read_text(path: Path, what: str = "file", limit: int = MAX_FILE_BYTES) -> str:
    """A user file's text: UTF-8, at most `limit` bytes; a directory, a too-long path or an unreadable file is a
    ConfigError that says which."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(path, "", f"{what} not found") from None
    except OSError as e:
        raise ConfigError(path, "", f"cannot read the {what}: {_os_reason(e)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(path, "", f"is a directory; give the {what} itself (a .yaml file)")
    if st.st_size > limit:
        raise ConfigError(path, "", f"{st.st_size} bytes, more than the {limit} a {what} may have")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(path, "", f"cannot read the {what}: {_os_reason(e)}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(path, "", f"not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); "
                                    "save the file as UTF-8") from None


def _os_reason(e: OSError) -> str:
    if e.errno == errno.ENAMETOOLONG:
        return "the path is longer than the operating system allows (255 bytes per name, 4096 in all)"
    return e.strerror or type(e).__name__


class _Loader(yaml.SafeLoader):
    """`yaml.SafeLoader` that stops nesting past MAX_DEPTH while composing (the composer recurses: thousands of
    levels would end in a RecursionError)."""

    depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _check_tree(path: Path, root: yaml.Node) -> None:
    """Refuse duplicate keys (YAML would keep the last one silently), and trees too large or too deep once aliases
    are expanded (an alias bomb is a few lines that expand to billions of values) or that contain themselves."""
    memo: dict[int, tuple[int, int]] = {}  # node -> (expanded size, expanded height)
    active: set[int] = set()

    def walk(node: yaml.Node, field: str, depth: int) -> tuple[int, int]:
        if id(node) in memo:
            size, height = memo[id(node)]
        else:
            if id(node) in active:
                raise ConfigError(path, field, "an alias refers to a value that contains it (a cycle)")
            active.add(id(node))
            size, height = 1, 0
            if isinstance(node, yaml.MappingNode):
                seen: dict[str, int] = {}
                for k, v in node.value:
                    key = str(k.value) if isinstance(k, yaml.ScalarNode) else "?"
                    sub = f"{field}.{key}" if field else key
                    if key in seen and key != "<<":
                        raise ConfigError(path, sub, f"duplicate key (lines {seen[key]} and {k.start_mark.line + 1}); "
                                                     "YAML would silently keep the last value: keep one")
                    seen[key] = k.start_mark.line + 1
                    s, h = walk(v, sub, depth + 1)
                    size, height = size + s + 1, max(height, h + 1)
            elif isinstance(node, yaml.SequenceNode):
                for i, v in enumerate(node.value):
                    s, h = walk(v, f"{field}.{i}" if field else str(i), depth + 1)
                    size, height = size + s, max(height, h + 1)
            active.discard(id(node))
            memo[id(node)] = size, height
        if depth + height > MAX_DEPTH:
            raise ConfigError(path, field, f"nested deeper than {MAX_DEPTH} levels (aliases expanded)")
        if size > MAX_NODES:
            raise ConfigError(path, field, f"more than {MAX_NODES} values (aliases expanded): "
                                           "an alias bomb, or not a config file")
        return size, height

    walk(root, "", 0)


def load_yaml(path: Path, what: str = "file") -> dict:
    """A user YAML file as a mapping, safely: UTF-8, size-, depth- and alias-bounded, no duplicate keys, no tags
    that run code."""
    text = read_text(path, what)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError(path, "", "empty file; expected a mapping of fields")
        _check_tree(path, node)
        data = loader.construct_document(node)
    except ConfigError:
        raise
    except (yaml.YAMLError, ValueError) as e:  # ValueError: e.g. an integer of more digits than Python converts
        raise ConfigError(path, "", f"not valid YAML ({e})") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(path, "", "expected a mapping of fields at the top level")
    return data


def raise_first(path: Path, err: ValidationError, prefix: str = "") -> None:
    e = err.errors()[0]
    loc = prefix + ".".join(str(p) for p in e["loc"])
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown field (check its spelling against the documented fields)"
    elif e["type"] == "missing":
        msg = "required field is missing"
    raise ConfigError(path, loc, msg) from None


def resolve(base_dir: Path, p: str) -> str:
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else (base_dir / q).resolve())


def exists_as(p: str | Path, kind=stat.S_ISDIR) -> bool:
    """Whether `p` exists and is of `kind`; False, not an exception, for a path the OS refuses (too long, ...)."""
    try:
        return kind(Path(p).stat().st_mode)
    except (OSError, ValueError):
        return False


def check_path(file: Path, field: str, p: str) -> None:
    """Refuse, by name, a path the operating system cannot hold (it would otherwise raise deep inside)."""
    if "\0" in p:
        raise ConfigError(file, field, "a path cannot contain a NUL character")
    try:
        Path(p).expanduser().stat()
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise ConfigError(file, field, f"{shorten(p, 80)}: {_os_reason(e)}") from None


