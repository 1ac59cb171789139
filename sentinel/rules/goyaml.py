"""Go's YAML decoding (gopkg.in/yaml.v3, strict) over PyYAML's composed nodes.

Prometheus reads rule files with yaml.v3 and `KnownFields(true)`; promtool's report
quotes that decoder's words. This module decodes a `yamlpos.Document`'s nodes into
plain values the way yaml.v3 fills Go struct fields, and collects its errors:

- type errors (`line 9: cannot unmarshal !!seq into string`, `line 6: field foo not
  found in type rulefmt.RuleNode`), which yaml.v3 gathers and reports together as one
  `yaml: unmarshal errors:` message, in document order;
- the error of a custom unmarshaler (a duration that does not parse), which ends
  decoding at once and is reported alone, without the `yaml:` prefix.

A string field takes any scalar's source text (`yes` stays "yes"); a `yaml.Node` field
(a rule's `record`, `alert`, `expr`) takes the node's value as written, which for an
alias is the anchor's name: `expr: *x` is the expression `x`, as in Prometheus.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import yaml

from sentinel.config.yamlpos import alias_of
from sentinel.gotemplate.values import go_quote

__all__ = ["Fields", "GoDecoder", "go_node_value", "go_short_tag", "go_syntax_error"]

_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT = re.compile(r"^[-+]?(?:0b[01_]+|0o?[0-7_]+|0x[0-9a-fA-F_]+|[0-9][0-9_]*)$")
_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?$")
_SPECIAL_FLOAT = re.compile(r"^(?:[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
_TIMESTAMP = re.compile(r"^[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}(?:[Tt ].*)?$")
_GO_TAGS = {
    "tag:yaml.org,2002:str": "!!str",
    "tag:yaml.org,2002:int": "!!int",
    "tag:yaml.org,2002:float": "!!float",
    "tag:yaml.org,2002:bool": "!!bool",
    "tag:yaml.org,2002:null": "!!null",
    "tag:yaml.org,2002:map": "!!map",
    "tag:yaml.org,2002:seq": "!!seq",
    "tag:yaml.org,2002:binary": "!!binary",
    "tag:yaml.org,2002:timestamp": "!!timestamp",
    "tag:yaml.org,2002:merge": "!!merge",
}


_RESOLVER = yaml.resolver.Resolver()


def _target(node: yaml.Node) -> yaml.Node:
    target = getattr(node, "target", None)
    return target if isinstance(target, yaml.Node) else node


def go_short_tag(node: yaml.Node) -> str:
    """The tag yaml.v3 resolves for a node (its YAML 1.2 rules, not PyYAML's 1.1)."""
    node = _target(node)
    if isinstance(node, yaml.MappingNode):
        return _GO_TAGS.get(node.tag, "!!map") if node.tag != "tag:yaml.org,2002:map" else "!!map"
    if isinstance(node, yaml.SequenceNode):
        return "!!seq"
    assert isinstance(node, yaml.ScalarNode)
    explicit = _explicit_tag(node)
    if explicit is not None:
        return explicit
    if node.style:  # quoted or block scalars are strings
        return "!!str"
    text = str(node.value)
    if _NULL.match(text):
        return "!!null"
    if _BOOL.match(text):
        return "!!bool"
    if _INT.match(text) and "_" not in text:
        return "!!int"
    if (_FLOAT.match(text) and "_" not in text) or _SPECIAL_FLOAT.match(text):
        return "!!float"
    if _TIMESTAMP.match(text):
        return "!!timestamp"
    return "!!str"


def _explicit_tag(node: yaml.ScalarNode) -> str | None:
    # PyYAML leaves a resolved tag on every node; an explicit one shows in the source
    # only through the node's implicit flags, which the composer drops, so compare with
    # what PyYAML would have resolved by itself.
    resolved = _RESOLVER.resolve(yaml.ScalarNode, node.value, (True, False))  # type: ignore[no-untyped-call]
    if node.tag == resolved or node.tag == "tag:yaml.org,2002:str":
        return None
    return _GO_TAGS.get(node.tag, node.tag)


def go_node_value(node: yaml.Node | None) -> str:
    """yaml.Node.Value: a scalar's text, an alias's anchor name, "" for collections."""
    if node is None:
        return ""
    alias = alias_of(node)
    if alias is not None:
        return alias
    return str(node.value) if isinstance(node, yaml.ScalarNode) else ""


def _line(node: yaml.Node) -> int:
    return int(_target(node).start_mark.line) + 1


class Fields(dict[str, yaml.Node]):
    """A struct's field nodes by name, and the error of a failed merge, due after them."""

    merge_errors: list[tuple[int, int, str]]

    def __init__(self) -> None:
        super().__init__()
        self.merge_errors = []


@dataclass
class GoDecoder:
    """Collects yaml.v3's decoding errors while the caller walks the nodes."""

    type_errors: list[tuple[int, int, str]] = field(default_factory=list)
    fatal: list[tuple[int, int, str]] = field(default_factory=list)

    def _type_error(self, node: yaml.Node, message: str) -> None:
        mark = _target(node).start_mark
        self.type_errors.append((mark.line + 1, mark.column + 1, f"line {mark.line + 1}: {message}"))

    def cannot_unmarshal(self, node: yaml.Node, into: str) -> None:
        value = ""
        target = _target(node)
        if isinstance(target, yaml.ScalarNode):
            text = str(target.value)
            value = f" `{text if len(text) <= 10 else text[:7] + '...'}`"
        self._type_error(node, f"cannot unmarshal {go_short_tag(node)}{value} into {into}")

    def messages(self) -> list[str]:
        """What Decode returns: the first fatal error, else the type errors as one message.

        Both lists are in decoding order, which the caller keeps to yaml.v3's: document
        order, a mapping's merged entries after its own.
        """
        if self.fatal:
            return [self.fatal[0][2]]
        if self.type_errors:
            lines = [message for _, _, message in self.type_errors]
            return ["yaml: unmarshal errors:\n  " + "\n  ".join(lines)]
        return []

    def unique_keys(self, node: yaml.Node) -> bool:
        """yaml.v3 checks a mapping's keys first: every repeat is an error and nothing is decoded."""
        pairs = _target(node).value
        before = len(self.type_errors)
        for i, (first, _) in enumerate(pairs):
            for later, _ in pairs[i + 1 :]:
                if type(first) is type(later) and go_node_value(first) == go_node_value(later):
                    self._type_error(
                        later,
                        f"mapping key {go_quote(go_node_value(later))} already defined at line {_line(first)}",
                    )
        return len(self.type_errors) == before

    def binary(self, node: yaml.Node) -> str | None:
        """A `!!binary` scalar's decoded text; bad base64 ends decoding as in yaml.v3."""
        text = re.sub(r"\s", "", str(_target(node).value))
        try:
            return base64.b64decode(text, validate=True).decode("utf-8", "replace")
        except (binascii.Error, ValueError):
            mark = _target(node).start_mark
            self.fatal.append((mark.line + 1, mark.column + 1, "yaml: !!binary value contains invalid base64 data"))
            return None

    # -- shapes -----------------------------------------------------------------------------

    @staticmethod
    def is_null(node: yaml.Node | None) -> bool:
        return node is None or (isinstance(_target(node), yaml.ScalarNode) and go_short_tag(node) == "!!null")

    def fields(self, node: yaml.Node | None, type_name: str, known: Iterable[str]) -> Fields:
        """A struct's fields by name in decoding order, merges applied; unknown and repeated keys are errors."""
        out = Fields()
        if self.is_null(node):
            return out
        assert node is not None
        if not isinstance(node, yaml.MappingNode):
            self.cannot_unmarshal(node, type_name)
            return out
        if not self.unique_keys(node):
            return out
        names = set(known)
        merged: list[tuple[yaml.Node, yaml.Node]] = []
        fatal_before = len(self.fatal)
        for key_node, value_node in _target(node).value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                merged.extend(self._merge_pairs(value_node))
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.cannot_unmarshal(key_node, "string")
                continue
            key = go_node_value(key_node)
            if key not in names:
                self._type_error(key_node, f"field {key} not found in type {type_name}")
            elif key in out:
                self._type_error(key_node, f"field {key} already set in type {type_name}")
            else:
                out[key] = value_node
        # yaml.v3 merges after the mapping's own keys: a bad merge fails only after them.
        out.merge_errors = self.fatal[fatal_before:]
        del self.fatal[fatal_before:]
        for key_node, value_node in merged:
            key = go_node_value(key_node)
            if key not in out:  # a key written in the mapping wins over a merged one
                if key not in names:
                    self._type_error(key_node, f"field {key} not found in type {type_name}")
                else:
                    out[key] = value_node
        return out

    def finish(self, fields: Fields) -> None:
        """Call once the caller has decoded `fields`: a failed merge in them counts from now."""
        self.fatal.extend(fields.merge_errors)
        fields.merge_errors = []

    def _merge_pairs(self, value: yaml.Node) -> list[tuple[yaml.Node, yaml.Node]]:
        """The entries a `<<` brings in, first source first; anything but mappings ends decoding."""
        target = _target(value)
        sources: list[yaml.Node] = [target] if isinstance(target, yaml.MappingNode) else []
        if isinstance(target, yaml.SequenceNode):
            sources = [_target(item) for item in target.value]
        if not sources or not all(isinstance(s, yaml.MappingNode) for s in sources):
            mark = target.start_mark
            self.fatal.append(
                (mark.line + 1, mark.column + 1, "yaml: map merge requires map or sequence of maps as the value")
            )
            return []
        pairs: list[tuple[yaml.Node, yaml.Node]] = []
        for source in sources:
            own = [(k, v) for k, v in source.value if k.tag != "tag:yaml.org,2002:merge"]
            inner = [p for k, v in source.value if k.tag == "tag:yaml.org,2002:merge" for p in self._merge_pairs(v)]
            pairs.extend(own + inner)
        return pairs

    def seq(self, node: yaml.Node | None, into: str) -> list[yaml.Node]:
        if self.is_null(node):
            return []
        assert node is not None
        if not isinstance(node, yaml.SequenceNode):
            self.cannot_unmarshal(node, into)
            return []
        return list(_target(node).value)

    def string(self, node: yaml.Node | None) -> str:
        if self.is_null(node):
            return ""
        assert node is not None
        if not isinstance(node, yaml.ScalarNode):
            self.cannot_unmarshal(node, "string")
            return ""
        if go_short_tag(node) == "!!binary":
            return self.binary(node) or ""
        return str(_target(node).value)

    def string_map(self, node: yaml.Node | None) -> dict[str, str]:
        if self.is_null(node):
            return {}
        assert node is not None
        if not isinstance(node, yaml.MappingNode):
            self.cannot_unmarshal(node, "map[string]string")
            return {}
        if not self.unique_keys(node):
            return {}
        out: dict[str, str] = {}
        for key_node, value_node in _target(node).value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                for merged_key, merged_value in self._merge_pairs(value_node):
                    out.setdefault(self.string(merged_key), self.string(merged_value))
                continue
            out[self.string(key_node)] = self.string(value_node)
        return out

    def integer(self, node: yaml.Node | None, into: str = "int") -> int:
        if self.is_null(node):
            return 0
        assert node is not None
        tag = go_short_tag(node) if isinstance(node, yaml.ScalarNode) else ""
        if tag == "!!int":
            value = _go_int(str(_target(node).value))
            if value is not None:
                return value
        elif tag == "!!float":
            number = float(str(_target(node).value).replace("_", ""))
            if math.isfinite(number) and number == int(number) and abs(number) < 2**63:
                return int(number)
        self.cannot_unmarshal(node, into)
        return 0

    def duration(self, node: yaml.Node | None, parse: object) -> int | None:
        """model.Duration: the text through ParseDuration; a bad one ends decoding."""
        if self.is_null(node):
            return None
        assert node is not None
        if not isinstance(node, yaml.ScalarNode):
            self.cannot_unmarshal(node, "string")
            return None
        text = str(_target(node).value)
        mark = _target(node).start_mark
        if text == "":
            self.fatal.append((mark.line + 1, mark.column + 1, "empty duration string"))
            return None
        try:
            assert callable(parse)
            result = parse(text)
        except ValueError as exc:
            self.fatal.append((mark.line + 1, mark.column + 1, str(exc)))
            return None
        return int(result)


def _go_int(text: str) -> int | None:
    """strconv.ParseInt(text, 0, 64) as yaml.v3 applies it to a plain !!int scalar."""
    sign = -1 if text.startswith("-") else 1
    body = text.lstrip("+-")
    try:
        if body[:2] in ("0x", "0X"):
            value = int(body[2:], 16)
        elif body[:2] in ("0o", "0O"):
            value = int(body[2:], 8)
        elif body[:2] in ("0b", "0B"):
            value = int(body[2:], 2)
        else:
            value = int(body, 10)
    except ValueError:
        return None
    value *= sign
    return value if -(2**63) <= value < 2**63 else None


# PyYAML's problem texts and libyaml's (which go-yaml ports) for the same errors.
_PROBLEMS = (
    (re.compile(r"^expected <block end>, but found"), None),  # depends on the context
    (re.compile(r"^expected the node content, but found"), "did not find expected node content"),
    (re.compile(r"^found character .* that cannot start any token$"), "found character that cannot start any token"),
    (re.compile(r"^mapping values are not allowed here$"), "mapping values are not allowed in this context"),
    (re.compile(r"^expected ',' or '}', but got"), "did not find expected ',' or '}'"),
    (re.compile(r"^expected ',' or ']', but got"), "did not find expected ',' or ']'"),
    (re.compile(r"^expected <document start>, but found"), "did not find expected <document start>"),
    (re.compile(r"^found undefined tag handle"), "found undefined tag handle"),
    (re.compile(r"^sequence entries are not allowed here$"), "block sequence entries are not allowed in this context"),
)


def go_syntax_error(exc: yaml.YAMLError, fallback: str) -> str:
    """go-yaml's text for a PyYAML syntax error: `yaml: line N: did not find expected key`.

    go-yaml takes the line of the error's context (else of the problem) as libyaml keeps
    it, zero-based, adding one for scanner errors only, and omits a line 0.
    """
    if isinstance(exc, yaml.composer.ComposerError) and exc.problem and exc.problem.startswith("found undefined alias"):
        name = exc.problem.removeprefix("found undefined alias").strip()
        return f"yaml: unknown anchor {name} referenced"
    if not isinstance(exc, yaml.MarkedYAMLError):
        return f"yaml: {fallback}"
    problem = exc.problem or fallback
    for pattern, text in _PROBLEMS:
        if pattern.search(problem):
            if text is None:
                text = (
                    "did not find expected key"
                    if "mapping" in (exc.context or "")
                    else "did not find expected '-' indicator"
                )
            problem = text
            break
    scanner = isinstance(exc, yaml.scanner.ScannerError)
    line = 0
    for mark in (exc.context_mark, exc.problem_mark):
        if mark is not None and mark.line != 0:
            line = mark.line + (1 if scanner else 0)
            break
    return f"yaml: line {line}: {problem}" if line else f"yaml: {problem}"
