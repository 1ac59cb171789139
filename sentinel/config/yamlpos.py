"""YAML loading that remembers where every value came from.

Pydantic reports errors by field path (`workers.0.gpus`); operators want a line number.
`load_with_positions` returns the plain data and a map from each path to the 1-based
line (and column) of the node, so an error can name both.

Building the data copies every alias (each path gets its own position), so a document
is bounded: at most `MAX_VALUES` values once aliases are expanded (a 400-byte "billion
laughs" of nested anchors expanded to millions and hung `sentinel check config`), and
nesting too deep for the parser is a `YamlError` too, never a RecursionError.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

__all__ = ["MAX_VALUES", "Position", "YamlError", "load_with_positions", "position_of"]

Path = tuple[str | int, ...]

MAX_VALUES = 20_000
"""Values in one document once aliases are expanded; a real sentinel.yaml has hundreds."""


@dataclass(frozen=True)
class Position:
    line: int
    column: int


class YamlError(Exception):
    """The file is not valid YAML; names the file, line and column."""

    def __init__(self, file: str, line: int | None, column: int | None, problem: str) -> None:
        where = f"{file}:{line}:{column}" if line is not None else file
        super().__init__(f"{where}: {problem}")
        self.file, self.line, self.column, self.problem = file, line, column, problem


class _Loader(yaml.SafeLoader):
    pass


def load_with_positions(text: str, file: str = "<string>") -> tuple[Any, dict[Path, Position]]:
    """Parse YAML text into data plus a {path: position} map; duplicate keys are errors."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark is not None else None
        col = mark.column + 1 if mark is not None else None
        raise YamlError(file, line, col, str(exc.problem or exc)) from None
    except yaml.YAMLError as exc:
        raise YamlError(file, None, None, str(exc)) from None
    except RecursionError:
        raise YamlError(file, None, None, "nested too deeply") from None
    positions: dict[Path, Position] = {}
    if node is None:
        return None, positions
    loader = _Loader("")
    try:
        data = _build(node, (), positions, loader, file)
    except RecursionError:
        raise YamlError(file, None, None, "nested too deeply") from None
    except yaml.MarkedYAMLError as exc:  # e.g. a tag no safe constructor knows (!!python/object)
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        col = mark.column + 1 if mark is not None else None
        raise YamlError(file, line, col, str(exc.problem or exc)) from None
    except yaml.YAMLError as exc:
        raise YamlError(file, None, None, str(exc)) from None
    finally:
        loader.dispose()
    return data, positions


def _build(node: yaml.Node, path: Path, positions: dict[Path, Position], loader: _Loader, file: str) -> Any:
    if len(positions) >= MAX_VALUES:
        raise YamlError(
            file,
            node.start_mark.line + 1,
            node.start_mark.column + 1,
            f"the document expands to more than {MAX_VALUES} values (nested aliases?)",
        )
    positions[path] = Position(node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise YamlError(
                    file,
                    key_node.start_mark.line + 1,
                    key_node.start_mark.column + 1,
                    "a mapping key must be a plain value, not a list or a mapping",
                )
            key = loader.construct_object(key_node, deep=True)
            if key == "<<":
                raise YamlError(
                    file,
                    key_node.start_mark.line + 1,
                    key_node.start_mark.column + 1,
                    "merge keys (<<) are not supported",
                )
            if key in out:
                raise YamlError(
                    file, key_node.start_mark.line + 1, key_node.start_mark.column + 1, f"duplicate key {key!r}"
                )
            child = (*path, key)
            out[key] = _build(value_node, child, positions, loader, file)
            # The key's own line is the better pointer for "unknown key" errors.
            positions[child] = Position(key_node.start_mark.line + 1, key_node.start_mark.column + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*path, i), positions, loader, file) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def position_of(positions: dict[Path, Position], loc: Sequence[str | int]) -> Position | None:
    """The position of `loc`, or of its nearest ancestor present in the file."""
    path = tuple(loc)
    while True:
        hit = positions.get(path)
        if hit is not None:
            return hit
        if not path:
            return None
        path = path[:-1]
