"""The Xid policy: what an NVIDIA Xid error means and what Sentinel suggests doing about it.

Loaded from `sentinel/data/xid_policy.yaml` (or a file given for tests), validated by
pydantic models like the rest of the configuration, then the operator's per-Xid
overrides (`collectors.nvml.xid_overrides`) are applied. An Xid missing from the policy
is classed "unknown". A malformed file raises `XidPolicyError`, whose message names
the file and the field (`xid_policy.yaml: xids.79.class: ...`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from sentinel.config.models import XidOverride

__all__ = ["MAX_POLICY_BYTES", "XID_CLASSES", "XidInfo", "XidPolicy", "XidPolicyError"]

XID_CLASSES = ("hardware", "application", "informational", "unknown")
"""Every class an Xid can have; "unknown" is only for Xids missing from the policy."""

MAX_POLICY_BYTES = 1024 * 1024
"""A policy file is a few kilobytes; a larger one is refused before it is parsed."""

_SHIPPED = "sentinel/data/xid_policy.yaml"


class XidPolicyError(ValueError):
    """The policy file is malformed; the message names the file and the field."""


@dataclass(frozen=True)
class XidInfo:
    """What one Xid means and what to do about it."""

    xid: int
    xid_class: str
    action: str
    description: str


_Text = Annotated[str, StringConstraints(strict=True, min_length=1)]


class _Entry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    xid_class: Literal["hardware", "application", "informational"] = Field(alias="class")
    action: _Text
    description: _Text


class _PolicyFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    xids: dict[Annotated[int, Field(strict=True, gt=0)], _Entry]


class XidPolicy:
    """Xid number -> `XidInfo`; Xids missing from the policy are classed "unknown"."""

    def __init__(self, entries: Mapping[int, XidInfo]) -> None:
        self._entries = dict(entries)

    @classmethod
    def load(cls, overrides: Mapping[int, XidOverride] | None = None, path: Path | None = None) -> XidPolicy:
        """The shipped policy (or the file at `path`) with the operator's overrides applied."""
        if path is None:
            text = resources.files("sentinel").joinpath("data/xid_policy.yaml").read_text(encoding="utf-8")
            source = _SHIPPED
        else:
            source = str(path)
            try:
                if path.stat().st_size > MAX_POLICY_BYTES:
                    raise XidPolicyError(f"{source}: larger than {MAX_POLICY_BYTES} bytes")
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise XidPolicyError(f"{source}: cannot read: {exc}") from None
        entries = parse_policy(text, source)
        for xid, override in (overrides or {}).items():
            entries[xid] = _apply_override(entries.get(xid) or _unknown(xid), override)
        return cls(entries)

    def classify(self, xid: int) -> XidInfo:
        """The policy entry for `xid`, or an "unknown" entry."""
        return self._entries.get(xid) or _unknown(xid)

    def __contains__(self, xid: object) -> bool:
        return xid in self._entries

    def __len__(self) -> int:
        return len(self._entries)


def parse_policy(text: str, source: str) -> dict[int, XidInfo]:
    """Xid -> entry from a policy file's text; raises `XidPolicyError` naming the field."""
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise XidPolicyError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("xids"), dict):
        raise XidPolicyError(f"{source}: xids: expected a mapping of Xid number to entry")
    try:
        policy = _PolicyFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise XidPolicyError(f"{source}: {_where(first['loc'])}: {_message(first)}") from None
    return {xid: XidInfo(xid, entry.xid_class, entry.action, entry.description) for xid, entry in policy.xids.items()}


def _where(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p != "[key]"]
    return ".".join(parts) if parts else "xids"


def _message(error: Any) -> str:
    if error["type"] == "missing":
        return "required (each entry has class, action and description)"
    if error["type"] == "extra_forbidden":
        return "unknown key"
    if error["type"] == "literal_error":
        return f"expected one of {', '.join(XID_CLASSES[:-1])}, got {error['input']!r}"
    if "[key]" in error["loc"]:
        return f"an Xid is a positive integer, got {error['input']!r}"
    return (
        f"expected a non-empty string, got {error['input']!r}"
        if error["type"].startswith("string")
        else str(error["msg"])
    )


def _unknown(xid: int) -> XidInfo:
    return XidInfo(xid, "unknown", "none", f"Xid {xid} is not in Sentinel's policy; see NVIDIA's Xid catalogue.")


def _apply_override(base: XidInfo, override: XidOverride) -> XidInfo:
    return replace(
        base,
        xid_class=override.xid_class or base.xid_class,
        action=override.action or base.action,
        description=override.description or base.description,
    )
