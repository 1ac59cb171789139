"""Generates the configuration reference (docs/configuration.md) from the config models.

The models are the source of truth; a test regenerates the reference and fails when
the committed file differs, so the docs cannot drift from what the loader accepts.
Run `python -m sentinel.config.doc > docs/configuration.md` after changing a model.
"""

from __future__ import annotations

import json
import sys
import types
import typing
from collections.abc import Iterator
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from sentinel.config.base import parse_duration
from sentinel.config.models import Config

__all__ = ["render"]

HEADER = """# Configuration reference

Generated from the configuration models by `python -m sentinel.config.doc`; a test
checks that this file matches them. `examples/sentinel.yaml` shows every setting with
comments. Durations are Prometheus-style (`500ms`, `15s`, `1m30s`) or plain seconds.
Unknown keys are errors, and `sentinel check config FILE` reports every problem with
its file, line and field path.
"""


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _type_name(tp: Any) -> str:
    tp, optional = _strip_optional(tp)
    origin = get_origin(tp)
    if origin is typing.Annotated:
        return _type_name(get_args(tp)[0]) + (" or null" if optional else "")
    if origin is Literal:
        text = " \\| ".join(json.dumps(a) for a in get_args(tp))
    elif origin in (tuple, list):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        text = f"list of {_type_name(args[0])}" if args else "list"
    elif origin is dict:
        key, value = get_args(tp)
        text = f"map of {_type_name(key)} to {_type_name(value)}"
    elif origin in (Union, types.UnionType):
        text = " or ".join(_type_name(a) for a in get_args(tp))
    elif _is_model(tp):
        text = tp.__name__
    elif tp is float:
        text = "number"
    elif tp is int:
        text = "integer"
    elif tp is bool:
        text = "boolean"
    elif tp is str:
        text = "string"
    else:
        text = getattr(tp, "__name__", str(tp))
    return text + (" or null" if optional else "")


def _field_type(info: FieldInfo) -> str:
    is_duration = any(getattr(m, "func", None) is parse_duration for m in info.metadata)
    if is_duration:
        return "duration"
    return _type_name(info.annotation)


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    if info.default_factory is not None:
        value: Any = info.default_factory()  # type: ignore[call-arg]
    else:
        value = info.default
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        return "see below"
    if isinstance(value, tuple):
        value = [v.model_dump(by_alias=True) if isinstance(v, BaseModel) else v for v in value]
    return f"`{json.dumps(value)}`"


def _models_in(tp: Any) -> Iterator[type[BaseModel]]:
    tp, _ = _strip_optional(tp)
    if get_origin(tp) is typing.Annotated:
        tp = get_args(tp)[0]
    if _is_model(tp):
        yield tp
        return
    for arg in get_args(tp):
        yield from _models_in(arg)


def _sections(model: type[BaseModel], path: str) -> Iterator[tuple[str, type[BaseModel]]]:
    yield path, model
    for name, info in model.model_fields.items():
        key = info.alias or name
        for sub in _models_in(info.annotation):
            child = f"{path}.{key}" if path else key
            if get_origin(_strip_optional(info.annotation)[0]) in (tuple, list):
                child += "[]"
            yield from _sections(sub, child)


def render() -> str:
    """The whole reference as Markdown."""
    out = [HEADER]
    seen: set[tuple[str, type[BaseModel]]] = set()
    for path, model in _sections(Config, ""):
        if (path, model) in seen:
            continue
        seen.add((path, model))
        title = path or "top level"
        kind = model.model_fields.get("type")
        suffix = ""
        if kind is not None and get_origin(kind.annotation) is Literal:
            suffix = f" (`type: {get_args(kind.annotation)[0]}`)"
        out.append(f"\n## `{title}`{suffix}\n")
        doc = (model.__doc__ or "").strip()
        if doc and not doc.startswith("!!!") and "Usage docs" not in doc:
            out.append(doc.splitlines()[0] + "\n")
        out.append("| key | type | default | meaning |")
        out.append("| --- | --- | --- | --- |")
        for name, info in model.model_fields.items():
            key = info.alias or name
            meaning = (info.description or "").replace("|", "\\|")
            out.append(f"| `{key}` | {_field_type(info)} | {_default(info)} | {meaning} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
