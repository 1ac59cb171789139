"""The log pattern catalogue: which lines are events and what to extract from them.

The built-in entries live in `sentinel/data/log_patterns.yaml`; the operator's
`collectors.logs.patterns` are appended after them. Each entry compiles into a
`Pattern`; `Pattern.extract` turns one regex match into labels and a value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import yaml

__all__ = [
    "BUILTIN_EVENTS",
    "Catalogue",
    "CatalogueError",
    "Pattern",
    "PatternLike",
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

_ID = re.compile(r"[a-z_][a-z0-9_]*\Z")
_PCI = re.compile(
    r"(?:PCI:)?(?:(?P<domain>[0-9A-Fa-f]{1,8}):)?(?P<bus>[0-9A-Fa-f]{1,2}):(?P<dev>[0-9A-Fa-f]{1,2})(?:\.(?P<fn>[0-7]))?"
)


def normalise_pci_bus_id(text: str) -> str:
    """One spelling of a PCI address: `PCI:0000:3b:00`, `00000000:3B:00.0` -> `0000:3b:00.0`.

    The kernel prints a 4-digit domain and sometimes no function, NVML an 8-digit
    upper-case domain; matching a GPU across both needs one form (sysfs's, as `lspci -D`).
    """
    m = _PCI.fullmatch(text.strip())
    if m is None:
        return text.strip().lower()
    domain = int(m.group("domain") or "0", 16)
    width = 4 if domain <= 0xFFFF else 8
    return f"{domain:0{width}x}:{int(m.group('bus'), 16):02x}:{int(m.group('dev'), 16):02x}.{m.group('fn') or '0'}"


class CatalogueError(ValueError):
    """A catalogue entry is malformed; the message names its source and index."""


class PatternLike(Protocol):
    """What the config's `LogPattern` offers (keywords are optional there)."""

    @property
    def id(self) -> str: ...

    @property
    def regex(self) -> str: ...

    @property
    def labels(self) -> Mapping[str, str]: ...

    @property
    def value(self) -> str | None: ...


# Labels whose raw text is rewritten into one canonical form.
_NORMALISERS = {"pci_bus_id": normalise_pci_bus_id}


@dataclass(frozen=True)
class Pattern:
    """One compiled catalogue entry."""

    id: str
    regex: re.Pattern[str]
    labels: Mapping[str, str] = field(default_factory=dict)
    value: str | None = None
    keywords: tuple[str, ...] = ()

    def extract(self, m: re.Match[str]) -> tuple[dict[str, str], float | None]:
        """Labels and value of one match; groups that did not take part give nothing."""
        labels: dict[str, str] = {}
        for name, spec in self.labels.items():
            if spec.startswith("="):
                labels[name] = spec[1:]
                continue
            text = m.group(spec)
            if text:
                normalise = _NORMALISERS.get(name)
                labels[name] = normalise(text) if normalise else text
        value: float | None = None
        if self.value is not None:
            raw = m.group(self.value)
            if raw:
                try:
                    value = float(raw)
                except ValueError:
                    value = None
        return labels, value


def compile_pattern(
    id_: str, regex: str, labels: Mapping[str, str], value: str | None, keywords: Sequence[str], where: str
) -> Pattern:
    """Validate and compile one entry; raise CatalogueError naming `where`."""
    if not _ID.match(id_):
        raise CatalogueError(f"{where}.id: {id_!r} is not a valid event id (lower-case letters, digits, '_')")
    try:
        compiled = re.compile(regex)
    except re.error as exc:
        raise CatalogueError(f"{where}.regex: not a valid regular expression: {exc}") from None
    for name, spec in labels.items():
        if not spec.startswith("=") and spec not in compiled.groupindex:
            raise CatalogueError(f"{where}.labels.{name}: the regex has no group named {spec!r}")
    if value is not None and value not in compiled.groupindex:
        raise CatalogueError(f"{where}.value: the regex has no group named {value!r}")
    if any(not isinstance(k, str) or not k or "\n" in k for k in keywords):
        raise CatalogueError(f"{where}.keywords: expected non-empty one-line strings")
    return Pattern(id_, compiled, dict(labels), value, tuple(keywords))


class Catalogue:
    """An ordered list of patterns: the built-in ones, then the operator's."""

    def __init__(self, patterns: Sequence[Pattern]) -> None:
        self.patterns: tuple[Pattern, ...] = tuple(patterns)

    @property
    def event_ids(self) -> tuple[str, ...]:
        """Every event id, in catalogue order, each once."""
        return tuple(dict.fromkeys(p.id for p in self.patterns))

    @classmethod
    def load(cls, extra: Sequence[PatternLike] = (), path: Path | None = None) -> Catalogue:
        """The shipped catalogue (or the file at `path`) followed by `extra` entries."""
        if path is None:
            text = (
                resources.files("sentinel").joinpath("data").joinpath("log_patterns.yaml").read_text(encoding="utf-8")
            )
            source = "sentinel/data/log_patterns.yaml"
        else:
            text = path.read_text(encoding="utf-8")
            source = str(path)
        patterns = _parse(yaml.safe_load(text), source)
        for i, p in enumerate(extra):
            keywords = tuple(getattr(p, "keywords", None) or ())
            patterns.append(
                compile_pattern(p.id, p.regex, dict(p.labels), p.value, keywords, f"collectors.logs.patterns.{i}")
            )
        return cls(patterns)


def _parse(data: Any, source: str) -> list[Pattern]:
    if not isinstance(data, dict) or not isinstance(data.get("patterns"), list):
        raise CatalogueError(f"{source}: patterns: expected a list of entries")
    out = []
    for i, entry in enumerate(data["patterns"]):
        where = f"{source}: patterns.{i}"
        if not isinstance(entry, dict):
            raise CatalogueError(f"{where}: expected a mapping with id and regex")
        unknown = set(entry) - {"id", "regex", "labels", "value", "keywords"}
        if unknown:
            raise CatalogueError(f"{where}.{sorted(unknown)[0]}: unknown key")
        id_, regex = entry.get("id"), entry.get("regex")
        labels, value, keywords = entry.get("labels") or {}, entry.get("value"), entry.get("keywords") or []
        if not isinstance(id_, str) or not isinstance(regex, str):
            raise CatalogueError(f"{where}: id and regex are required strings")
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise CatalogueError(f"{where}.labels: expected a mapping of label name to group name")
        if value is not None and not isinstance(value, str):
            raise CatalogueError(f"{where}.value: expected a group name")
        if not isinstance(keywords, list):
            raise CatalogueError(f"{where}.keywords: expected a list of strings")
        out.append(compile_pattern(id_, regex, labels, value, keywords, where))
    return out
