"""The log pattern catalogue: which lines are events and what to extract from them.

The built-in entries live in `sentinel/data/log_patterns.yaml`; the operator's
`collectors.logs.patterns` are appended after them. Both are validated by one schema,
the config's pydantic `LogPattern` (id, regex, labels, value, keywords), so a built-in
entry and an operator's entry accept exactly the same fields and get the same checks.
Each entry compiles into a `Pattern` (an RE2 regex, see `sentinel.logs.regex`);
`Pattern.extract` turns one match into labels and a value.

Patterns may name the catalogue's *fragments* with `{{name}}`: `{{head}}` is the
grammar of what loggers and launchers put before a message (timestamps, levels,
`[rank0]:`, `(VllmWorker rank=0 pid=1)`, syslog and dmesg prefixes). Anchoring a
pattern to the line's head is what keeps a request prompt that merely *contains*
"CUDA out of memory." from becoming an event.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from sentinel.logs.regex import LineRegex, RegexError, Spans, expand_fragments

if TYPE_CHECKING:
    from sentinel.config.models import LogPattern

__all__ = [
    "BUILTIN_EVENTS",
    "Catalogue",
    "CatalogueError",
    "Pattern",
    "builtin_fragments",
    "compile_entry",
    "normalise_pci_bus_id",
]

BUILTIN_EVENTS = (
    "nccl_warn",
    "nccl_error",
    "nccl_cuda_failure",
    "nccl_net_error",
    "collective_timeout",
    "watchdog_stuck",
    "cuda_oom",
    "engine_dead",
    "xid",
    "gpu_fallen_off_bus",
    "host_oom_kill",
    "health_check_failed",
    "expert_balancedness",
)
"""Event ids that rules use by name; the shipped catalogue must produce each of them."""

_BUILTIN = "sentinel/data/log_patterns.yaml"
_BODY_TRIES = 4
_PCI = re.compile(
    r"(?:PCI:)?(?:(?P<domain>[0-9A-Fa-f]{1,8}):)?(?P<bus>[0-9A-Fa-f]{1,2}):(?P<dev>[0-9A-Fa-f]{1,2})(?:\.(?P<fn>[0-7]))?"
)


def normalise_pci_bus_id(text: str) -> str:
    """One spelling of a PCI address: `PCI:0000:3b:00`, `00000000:3B:00.0` -> `0000:3b:00.0`.

    The kernel prints a 4-digit domain and sometimes no function, NVML an 8-digit
    upper-case domain; matching a GPU across both needs one form (sysfs's, as `lspci -D`).
    A domain above 0xffff keeps its 8 digits.
    """
    m = _PCI.fullmatch(text.strip())
    if m is None:
        return text.strip().lower()
    domain = int(m.group("domain") or "0", 16)
    width = 4 if domain <= 0xFFFF else 8
    return f"{domain:0{width}x}:{int(m.group('bus'), 16):02x}:{int(m.group('dev'), 16):02x}.{m.group('fn') or '0'}"


class CatalogueError(ValueError):
    """A catalogue entry is malformed; the message names its source and index."""


# Labels whose raw text is rewritten into one canonical form.
_NORMALISERS = {"pci_bus_id": normalise_pci_bus_id}


@dataclass(frozen=True)
class Pattern:
    """One compiled catalogue entry."""

    id: str
    regex: LineRegex
    labels: Mapping[str, str] = field(default_factory=dict)
    """Label name -> group name, or `=literal`."""
    value: str | None = None
    keywords: tuple[str, ...] = ()
    _groups: tuple[tuple[str, int, str | None], ...] = ()
    _value_group: int = -1

    needs_spans: bool = False
    """True when a label or the value comes from a group (else the labels are fixed)."""
    _body: LineRegex | None = None
    _head: LineRegex | None = None

    def find_spans(self, line: bytes, heads: dict[int, bool] | None = None) -> Spans | None:
        """The match's spans (group numbers as in `regex`), cheaply.

        Submatches of the whole regex make RE2 walk the head grammar with its slow
        engines (about 20 us a line here). The same groups come from the body alone:
        its leftmost match whose start the head grammar reaches exactly (checked by a
        DFA-only regex) is where the whole regex's body matches. A few tries, then the
        whole regex: linear either way.
        """
        body, head = self._body, self._head
        if body is None or head is None:
            return self.regex.spans(line)
        pos = 0
        for _ in range(_BODY_TRIES):
            spans = body.spans(line, pos)
            if spans is None:
                break
            start = spans[0][0]
            if start == 0:  # the head may be empty
                return spans
            ok = heads.get(start) if heads is not None else None
            if ok is None:
                ok = head.matches_exactly(line, 0, start)
                if heads is not None:  # entries of one line share their head: check each start once
                    heads[start] = ok
            if ok:
                return spans
            pos = start + 1
        return self.regex.spans(line)

    def literal_labels(self) -> dict[str, str]:
        """The fixed labels, for an entry that extracts nothing from the line."""
        return {name: literal for name, _, literal in self._groups if literal is not None}

    def extract(self, line: bytes, spans: Spans) -> tuple[dict[str, str], float | None]:
        """Labels and value of one match; groups that did not take part give nothing."""
        labels: dict[str, str] = {}
        for name, group, literal in self._groups:
            if literal is not None:
                labels[name] = literal
                continue
            start, end = spans[group]
            if end > start >= 0:
                text = line[start:end].decode("utf-8", "replace")
                labels[name] = _NORMALISERS[name](text) if name in _NORMALISERS else text
        value: float | None = None
        if self._value_group >= 0:
            start, end = spans[self._value_group]
            if end > start >= 0:
                try:
                    value = float(line[start:end])
                except ValueError:
                    value = None
        return labels, value


def compile_entry(entry: LogPattern, fragments: Mapping[str, str] | None = None) -> Pattern:
    """Compile a validated entry; raise ValueError naming the field (`regex: ...`, `labels.x: ...`)."""
    fragments = builtin_fragments() if fragments is None else fragments
    try:
        expanded = expand_fragments(entry.regex, fragments)
        regex = LineRegex(expanded)
    except RegexError as exc:
        raise ValueError(f"regex: {exc}") from None
    body, head = _split_head(expanded, regex, fragments)
    groups: list[tuple[str, int, str | None]] = []
    for name, spec in entry.labels.items():
        if spec.startswith("="):
            groups.append((name, -1, spec[1:]))
        elif spec in regex.groupindex:
            groups.append((name, regex.groupindex[spec], None))
        else:
            raise ValueError(f"labels.{name}: the regex has no group named {spec!r}")
    value_group = -1
    if entry.value is not None:
        if entry.value not in regex.groupindex:
            raise ValueError(f"value: the regex has no group named {entry.value!r}")
        value_group = regex.groupindex[entry.value]
    needs_spans = value_group >= 0 or any(literal is None for _, _, literal in groups)
    return Pattern(
        entry.id,
        regex,
        dict(entry.labels),
        entry.value,
        tuple(entry.keywords),
        tuple(groups),
        value_group,
        needs_spans,
        body,
        head,
    )


def _split_head(
    expanded: str, regex: LineRegex, fragments: Mapping[str, str]
) -> tuple[LineRegex | None, LineRegex | None]:
    """The body after a leading `{{head}}` and the head alone (DFA-only), when the split keeps the groups."""
    if "head" not in fragments:
        return None, None
    head_text = expand_fragments("{{head}}", fragments)
    if not expanded.startswith(head_text) or len(expanded) == len(head_text):
        return None, None
    try:
        body = LineRegex(expanded[len(head_text) :])
    except RegexError:  # the head's text did not end on a boundary of the pattern's syntax
        return None, None
    if body.groupindex != regex.groupindex:  # the head captures something: group numbers would differ
        return None, None
    return body, _head_regex(head_text)


@functools.lru_cache(maxsize=8)
def _head_regex(head_text: str) -> LineRegex:
    return LineRegex(head_text, captures=False)


class Catalogue:
    """An ordered list of patterns: the built-in ones, then the operator's."""

    def __init__(self, patterns: Sequence[Pattern]) -> None:
        self.patterns: tuple[Pattern, ...] = tuple(patterns)

    @property
    def event_ids(self) -> tuple[str, ...]:
        """Every event id, in catalogue order, each once."""
        return tuple(dict.fromkeys(p.id for p in self.patterns))

    @classmethod
    def load(cls, extra: Sequence[LogPattern] = (), path: Path | None = None) -> Catalogue:
        """The shipped catalogue (or the file at `path`) followed by `extra` entries."""
        patterns: Sequence[Pattern]
        if path is None:
            fragments, patterns = _builtin()
        else:
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise CatalogueError(f"{path}: cannot read: {exc}") from None
            fragments, patterns = _parse(_yaml(text, str(path)), str(path))
        out = list(patterns)
        for i, entry in enumerate(extra):
            try:
                out.append(compile_entry(entry, fragments))
            except ValueError as exc:
                raise CatalogueError(f"collectors.logs.patterns.{i}.{exc}") from None
        return cls(out)


@functools.cache
def _builtin() -> tuple[dict[str, str], tuple[Pattern, ...]]:
    text = resources.files("sentinel").joinpath("data").joinpath("log_patterns.yaml").read_text(encoding="utf-8")
    fragments, patterns = _parse(_yaml(text, _BUILTIN), _BUILTIN)
    return fragments, tuple(patterns)


def builtin_fragments() -> dict[str, str]:
    """The shipped catalogue's fragments (`{{head}}`, ...), which operator patterns may use too."""
    return dict(_builtin()[0])


def _yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CatalogueError(f"{source}: not valid YAML: {exc}") from None


def _parse(data: Any, source: str) -> tuple[dict[str, str], list[Pattern]]:
    # The one schema; imported here, as the config imports this module lazily.
    from sentinel.config.models import LogPattern

    if not isinstance(data, dict) or not isinstance(data.get("patterns"), list):
        raise CatalogueError(f"{source}: patterns: expected a list of entries")
    unknown = set(data) - {"patterns", "fragments"}
    if unknown:
        raise CatalogueError(f"{source}: {sorted(unknown)[0]}: unknown key")
    raw_fragments = data.get("fragments") or {}
    if not isinstance(raw_fragments, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw_fragments.items()
    ):
        raise CatalogueError(f"{source}: fragments: expected a mapping of name to regex text")
    # A long fragment may be written over several lines; the whitespace around them is not part of it.
    fragments = {k: "".join(part.strip() for part in v.splitlines()) for k, v in raw_fragments.items()}
    out = []
    for i, entry in enumerate(data["patterns"]):
        where = f"{source}: patterns.{i}"
        try:
            model = LogPattern.model_validate(entry, context={"fragments": fragments})
        except ValidationError as exc:
            raise CatalogueError(_first_problem(where, exc)) from None
        try:
            out.append(compile_entry(model, fragments))
        except ValueError as exc:
            raise CatalogueError(f"{where}.{exc}") from None
    return fragments, out


def _first_problem(where: str, exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"])
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    if err["type"] == "model_type":
        return f"{where}: expected a mapping with id and regex"
    if not loc:  # a model-level check names its field first ("labels.x: ...")
        return f"{where}.{message}"
    return f"{where}.{loc}: {message}"
