"""YAML loading that remembers where every value came from and how it was written.

Pydantic reports errors by field path (`workers.0.gpus`); operators want a line number.
`load_document` walks PyYAML's composed node graph once and returns three views of it:

- `data`: the values PyYAML's safe loader would give (`yes` is True, `1.50` is 1.5),
  with merge keys (`<<: *base`) applied as YAML's merge spec and Go's decoder apply
  them: keys written in the mapping win over merged ones, and of several merged
  mappings the first wins (PyYAML itself lets a later one win in some block layouts);
- `raw`: the same shape, each scalar replaced by its source text, as Go's YAML decoder
  hands a scalar to a string field (Prometheus keeps `page: yes` as "yes"); built from
  the same walk, so a merged rule's raw text is the merged text, never a neighbour's;
- `positions`: each path to the 1-based line and column of its node (for a mapping
  entry, of its key), merged entries pointing into the mapping they came from.

Every safe-loader feature is accepted: anchors and aliases, merge keys, the standard
tags (`!!str`, `!!set`, `!!omap`, `!!binary`, `!!timestamp`...), any nesting. Whatever
the safe loader refuses (an unknown tag, an unhashable key, a malformed merge) and what
it cannot finish (recursive aliases, nesting past the interpreter's recursion limit,
alias bombs) raises `YamlError` naming the file, line and column; never a traceback.

Hand-written because no library gives positions for constructed values: ruamel.yaml
does for its round-trip types only, and a second dependency for one loader is not
worth it when PyYAML's composer already carries the marks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

__all__ = [
    "MAX_VALUES",
    "Document",
    "Position",
    "YamlError",
    "alias_of",
    "load_document",
    "load_with_positions",
    "position_of",
]

Path = tuple[Any, ...]

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
# Go's yaml.v3 refuses documents whose alias expansion outgrows the text this much.
_MAX_EXPANDED_NODES = 1_000_000
"""Nodes a rule file may expand to (Go's yaml.v3 refuses "excessive aliasing" in the same range)."""

MAX_VALUES = 20_000
"""Values a configuration document (sentinel.yaml, a scenario) may expand to once aliases are
expanded; a real sentinel.yaml has hundreds, and a 400-byte "billion laughs" of nested anchors
expanded to millions and hung `sentinel check config`."""


@dataclass(frozen=True)
class Position:
    line: int
    column: int


class YamlError(Exception):
    """The file is not valid YAML (or not loadable); names the file, line and column."""

    def __init__(self, file: str, line: int | None, column: int | None, problem: str) -> None:
        where = f"{file}:{line}:{column}" if line is not None else file
        super().__init__(f"{where}: {problem}")
        self.file, self.line, self.column, self.problem = file, line, column, problem
        # PyYAML's own exception where there was one, for callers that word it their way.
        self.cause: yaml.YAMLError | None = None


@dataclass
class Document:
    """One YAML document: constructed values, their source texts, and positions."""

    data: Any
    raw: Any
    positions: dict[Path, Position] = field(default_factory=dict)
    # The composed node of each path, for callers that need tags or styles.
    nodes: dict[Path, yaml.Node] = field(default_factory=dict)


class _Loader(yaml.SafeLoader):
    """The safe loader, except that an alias yields a copy of its target marked as such.

    Go's decoder hands a `yaml.Node` field the alias itself (whose value is the anchor's
    name), so callers emulating it must know where an alias was written. The copy shares
    its target's children, so everything below it is the anchored content.
    """

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if not self.check_event(yaml.AliasEvent):
            return super().compose_node(parent, index)
        event = self.peek_event()  # type: ignore[no-untyped-call]
        target = super().compose_node(parent, index)
        copy: yaml.Node
        if isinstance(target, yaml.ScalarNode):
            copy = yaml.ScalarNode(target.tag, target.value, event.start_mark, event.end_mark, target.style)
        elif isinstance(target, yaml.SequenceNode):
            flow = getattr(target, "flow_style", None)
            copy = yaml.SequenceNode(target.tag, target.value, event.start_mark, event.end_mark, flow)
        elif isinstance(target, yaml.MappingNode):
            flow = getattr(target, "flow_style", None)
            copy = yaml.MappingNode(target.tag, target.value, event.start_mark, event.end_mark, flow)
        else:
            return target
        setattr(copy, "alias", event.anchor)  # noqa: B010 - PyYAML's nodes declare no such field
        setattr(copy, "target", target)  # noqa: B010
        return copy


def alias_of(node: yaml.Node) -> str | None:
    """The anchor name when `node` was written as an alias (`*name`), else None."""
    alias = getattr(node, "alias", None)
    return alias if isinstance(alias, str) else None


def load_with_positions(
    text: str, file: str = "<string>", *, max_values: int = MAX_VALUES
) -> tuple[Any, dict[Path, Position]]:
    """Parse YAML text into data plus a {path: position} map; duplicate keys are errors."""
    doc = load_document(text, file, max_values=max_values)
    return doc.data, doc.positions


def load_document(
    text: str, file: str = "<string>", *, text_only: bool = False, max_values: int = _MAX_EXPANDED_NODES
) -> Document:
    """Parse the first YAML document of `text`; raises YamlError for anything unloadable.

    With `text_only`, for callers that decode the nodes themselves the way Go does
    (`alerting.goyaml`): every scalar's value is its source text, no tag is refused, and
    what Go reports as a decoding error (a duplicate or non-scalar key, a merge of a
    non-mapping) is left in the nodes for the caller instead of raising here. Only
    syntax errors, undefined and recursive aliases and alias bombs raise.
    """
    try:
        node = _compose(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        error = YamlError(file, *_line_col(mark), str(exc.problem or exc.context or exc))
        error.cause = exc
        raise error from None
    except yaml.YAMLError as exc:
        raise YamlError(file, None, None, str(exc)) from None
    except RecursionError:
        raise YamlError(file, None, None, "nested too deeply") from None
    doc = Document(None, None)
    if node is None:
        return doc
    builder = _Builder(file, doc, text_only, max_values)
    try:
        doc.data, doc.raw = builder.build(node, ())
    except RecursionError:
        raise YamlError(file, *_line_col(builder.current.start_mark), "nested too deeply") from None
    finally:
        builder.loader.dispose()
    return doc


def _compose(text: str) -> yaml.Node | None:
    """The first document's node: Go's decoders read one document and ignore the rest."""
    loader = _Loader(text)
    try:
        loader.get_event()  # type: ignore[no-untyped-call]  # StreamStart
        if loader.check_event(yaml.StreamEndEvent):
            return None
        node: yaml.Node | None = loader.compose_document()
        return node
    finally:
        loader.dispose()


def _line_col(mark: yaml.Mark | None) -> tuple[int | None, int | None]:
    if mark is None:
        return None, None
    return mark.line + 1, mark.column + 1


class _Builder:
    """One walk over the node graph building data, raw text and positions together."""

    def __init__(
        self, file: str, doc: Document, text_only: bool = False, max_values: int = _MAX_EXPANDED_NODES
    ) -> None:
        self.file = file
        self.max_values = max_values
        self.text_only = text_only
        self.doc = doc
        self.loader = _Loader("")
        self.expanded = 0
        self.active: set[int] = set()  # ids of collection nodes on the current path
        self.current: yaml.Node = yaml.ScalarNode(_MAP_TAG, "")

    def fail(self, node: yaml.Node, problem: str) -> YamlError:
        return YamlError(self.file, *_line_col(node.start_mark), problem)

    def build(self, node: yaml.Node, path: Path, key_node: yaml.Node | None = None) -> tuple[Any, Any]:
        self.current = node
        self.expanded += 1
        if self.expanded > self.max_values:
            if self.max_values == _MAX_EXPANDED_NODES:  # yaml.v3's words, as promtool prints them
                raise self.fail(node, "document contains excessive aliasing")
            raise self.fail(node, f"the document expands to more than {self.max_values} values (nested aliases?)")
        mark = (key_node or node).start_mark
        self.doc.positions[path] = Position(mark.line + 1, mark.column + 1)
        self.doc.nodes[path] = node
        if isinstance(node, yaml.ScalarNode):
            return self.construct(node), node.value
        # Alias copies share their target's children list: it identifies the collection.
        ident = id(node.value)
        if ident in self.active:
            raise self.fail(node, "recursive alias: a node contains itself")
        self.active.add(ident)
        try:
            plain = node.tag in (_MAP_TAG, _SEQ_TAG) or self.text_only
            if isinstance(node, yaml.MappingNode) and plain:
                return self.mapping(node, path)
            if isinstance(node, yaml.SequenceNode) and plain:
                items = [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
                return [d for d, _ in items], [r for _, r in items]
            # `!!set`, `!!omap`, `!!pairs` and the like: the safe loader's own value.
            value = self.construct(node)
            return value, value
        finally:
            self.active.discard(ident)

    def construct(self, node: yaml.Node) -> Any:
        if self.text_only and isinstance(node, yaml.ScalarNode):
            return str(node.value)
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark or node.start_mark
            raise YamlError(self.file, *_line_col(mark), str(exc.problem or exc.context or exc)) from None
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
            # e.g. an out-of-range !!timestamp: the constructor's own ValueError.
            raise self.fail(node, f"cannot construct {node.tag}: {exc}") from None
        finally:
            # The loader caches constructed objects by node; each call stands alone.
            self.loader.constructed_objects.clear()
            self.loader.recursive_objects.clear()

    def mapping(self, node: yaml.MappingNode, path: Path) -> tuple[dict[Any, Any], _RawMapping]:
        data: dict[Any, Any] = {}
        raw: dict[Any, tuple[Any, Any]] = {}  # key -> (the key's source text, raw value)
        written: set[Any] = set()
        merged: list[tuple[yaml.Node, yaml.Node]] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merged.extend(self.merge_sources(value_node))
                continue
            if self.text_only and not isinstance(key_node, yaml.ScalarNode):
                continue  # Go reports it when decoding the key
            key = self.key(key_node)
            if key in written:
                if self.text_only:
                    continue  # the first one stays; Go reports the repetition
                raise self.fail(key_node, f"duplicate key {key!r}")
            written.add(key)
            data[key], value_raw = self.build(value_node, (*path, key), key_node)
            raw[key] = (key_node.value, value_raw)
        # Merged entries go after the written ones, as the safe loader orders them
        # when they do not collide; a written key or an earlier merged one wins.
        for key_node, value_node in merged:
            if self.text_only and not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.key(key_node)
            if key in data:
                continue
            data[key], value_raw = self.build(value_node, (*path, key), key_node)
            raw[key] = (key_node.value, value_raw)
        return data, _RawMapping(raw)

    def merge_sources(self, value: yaml.Node) -> list[tuple[yaml.Node, yaml.Node]]:
        """The (key, value) nodes a `<<` entry brings in, first source first."""
        if isinstance(value, yaml.MappingNode):
            return self.flatten(value)
        if isinstance(value, yaml.SequenceNode):
            out: list[tuple[yaml.Node, yaml.Node]] = []
            for item in value.value:
                if not isinstance(item, yaml.MappingNode) and self.text_only:
                    continue
                if not isinstance(item, yaml.MappingNode):
                    raise self.fail(item, f"expected a mapping for merging, but found {_kind(item)}")
                out.extend(self.flatten(item))
            return out
        if self.text_only:
            return []
        raise self.fail(value, f"expected a mapping or list of mappings for merging, but found {_kind(value)}")

    def flatten(self, node: yaml.MappingNode) -> list[tuple[yaml.Node, yaml.Node]]:
        """A merged mapping's entries with its own merges resolved (its keys first)."""
        if id(node.value) in self.active:
            raise self.fail(node, "recursive alias: a mapping merges itself")
        self.active.add(id(node.value))
        try:
            own: list[tuple[yaml.Node, yaml.Node]] = []
            inner: list[tuple[yaml.Node, yaml.Node]] = []
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:
                    inner.extend(self.merge_sources(value_node))
                else:
                    own.append((key_node, value_node))
            return own + inner
        finally:
            self.active.discard(id(node.value))

    def key(self, key_node: yaml.Node) -> Any:
        if not isinstance(key_node, yaml.ScalarNode):
            raise self.fail(key_node, f"a mapping key must be a plain value, not {_kind(key_node)}")
        key = self.construct(key_node)
        try:
            hash(key)
        except TypeError:
            raise self.fail(key_node, f"found unhashable key of type {type(key).__name__}") from None
        return key


class _RawMapping(dict[Any, Any]):
    """Source texts of a mapping, looked up by constructed key; `source_key` gives the key's text."""

    def __init__(self, items: dict[Any, tuple[Any, Any]]) -> None:
        super().__init__({k: v for k, (_, v) in items.items()})
        self._keys = {k: text for k, (text, _) in items.items()}

    def source_key(self, key: Any) -> Any:
        return self._keys.get(key, key)


def _kind(node: yaml.Node) -> str:
    kinds = {yaml.ScalarNode: "a scalar", yaml.SequenceNode: "a sequence", yaml.MappingNode: "a mapping"}
    return kinds.get(type(node), "a node")


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
