"""The probe report's wire shape, validated by pydantic models (version 1).

`sentinel.probe.report` builds the report inside the worker; this module is the
daemon's contract for it. Types are strict: a count is a JSON integer (not `true`, not
`"8"`, not `8.0`) between 0 and 2**63 - 1, a label a non-empty string of at most 128
characters, a number finite. Unknown keys are ignored, so a newer probe can add fields.
Sizes are bounded before anything is written: at most 4,096 layers, 1,024 hot experts
per layer and 256 GPUs per report (the registry also caps the series a report writes).

`parse_report` raises `ReportError`, whose message names the first bad field as a
path (`report.layers[0].balancedness: ...`), and nothing else, whatever the input.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, ValidationError, model_validator

__all__ = [
    "MAX_COUNT",
    "MAX_GPUS",
    "MAX_HOT_EXPERTS",
    "MAX_LABEL",
    "MAX_LAYERS",
    "MAX_MESSAGE",
    "REPORT_VERSION",
    "GpuReport",
    "HotExpert",
    "LayerReport",
    "OomInfo",
    "PlacementAnswer",
    "PlacementReport",
    "ProbeReport",
    "ReportError",
    "parse_report",
]

REPORT_VERSION = 1
MAX_LAYERS = 4096
MAX_HOT_EXPERTS = 1024
MAX_GPUS = 256
MAX_EXPERTS = 4096
MAX_SLOTS = 4096
MAX_LABEL = 128
MAX_MESSAGE = 1000
MAX_COUNT = 2**63 - 1
"""Counters are int64 on the wire, as in Prometheus; larger integers are refused, not a 500."""


class ReportError(ValueError):
    """A report that does not have the documented shape; the message names the field."""


Count = Annotated[int, Field(strict=True, ge=0, le=MAX_COUNT)]
Label = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=MAX_LABEL)]


def _zero_if_null(value: object) -> object:
    return 0 if value is None else value


def _message(value: object) -> str:
    # The OOM's text is informative only: never a reason to drop the OOM report itself.
    return value[:MAX_MESSAGE] if isinstance(value, str) else ""


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class HotExpert(_Wire):
    expert: Count
    tokens: Count
    tokens_total: Count


class LayerReport(_Wire):
    layer: Count
    tokens: Count
    balancedness: Annotated[float, Field(strict=True, ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    hot_experts: tuple[HotExpert, ...] = Field((), max_length=MAX_HOT_EXPERTS)
    # Every expert's tokens in the interval: the planner's input, never a series.
    expert_tokens: tuple[Count, ...] = Field((), max_length=MAX_EXPERTS)


class GpuReport(_Wire):
    """One GPU's entry; every field is optional (a GPU without experts, a client without CUDA)."""

    tokens_total: Count | None = None
    num_ooms: Count | None = None
    num_alloc_retries: Count | None = None
    allocated_bytes: Count | None = None
    reserved_bytes: Count | None = None


class PlacementAnswer(_Wire):
    """The worker's answer to the newest placement request (`sentinel.probe.control`)."""

    requested_version: Count
    status: Literal["applied", "refused", "timed_out"]
    reason: Annotated[str, BeforeValidator(_message)] = ""
    version: Count | None = None
    copies: Count | None = None
    copy_bytes: Count | None = None
    seconds: Annotated[float, Field(strict=False, ge=0.0, allow_inf_nan=False)] | None = None
    step: Count | None = None


SlotRow = Annotated[tuple[Annotated[int, Field(strict=True, ge=-1, lt=MAX_EXPERTS)], ...], Field(max_length=MAX_SLOTS)]


class PlacementReport(_Wire):
    """The placement the worker runs: version and digest always, the layers when they changed."""

    version: Count
    digest: Label
    step: Count | None = None
    num_experts: Annotated[int, Field(strict=True, ge=1, le=MAX_EXPERTS)] | None = None
    slots_per_gpu: tuple[Count, ...] = Field((), max_length=MAX_GPUS)
    layers: tuple[tuple[SlotRow, ...], ...] | None = Field(None, max_length=MAX_LAYERS)
    last: PlacementAnswer | None = None


class OomInfo(_Wire):
    gpu: Label
    message: Annotated[str, BeforeValidator(_message)] = ""


class ProbeReport(_Wire):
    """One validated report (see `sentinel.probe.report` for how the probe builds it)."""

    version: Annotated[int, Field(strict=True)]
    kind: Literal["interval", "oom"]
    worker: Label
    probe_id: Label
    seq: Count
    interval_s: Annotated[float, Field(strict=True, gt=0.0, le=3600.0, allow_inf_nan=False)]
    batch_limit: Count | None = None
    # False: the serving loop cannot take a batch limit live (vLLM's plugin: the
    # scheduler lives in another process), so `reduce_batch` must restart on a profile.
    live_batch_limit: Annotated[bool, Field(strict=True)] = True
    report_failures_total: Annotated[Count, BeforeValidator(_zero_if_null)] = 0
    hook_errors_total: Annotated[Count, BeforeValidator(_zero_if_null)] = 0
    layers: tuple[LayerReport, ...] = Field((), max_length=MAX_LAYERS)
    gpus: dict[Label, GpuReport] = Field(default_factory=dict, max_length=MAX_GPUS)
    oom: OomInfo | None = None
    placement: PlacementReport | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ProbeReport:
        if self.version != REPORT_VERSION:
            raise ValueError(f"version: expected {REPORT_VERSION}, got {self.version!r}")
        if self.kind == "oom" and self.oom is None:
            raise ValueError("oom: an 'oom' report needs an oom object with the GPU")
        return self

    @property
    def oom_gpu(self) -> str | None:
        return self.oom.gpu if self.kind == "oom" and self.oom is not None else None

    @property
    def oom_message(self) -> str:
        return self.oom.message if self.kind == "oom" and self.oom is not None else ""


def parse_report(obj: object) -> ProbeReport:
    """Validate a decoded JSON report; raises `ReportError` naming the first bad field."""
    if not isinstance(obj, dict):
        raise ReportError(f"report: expected an object, got {type(obj).__name__}")
    try:
        return ProbeReport.model_validate(obj)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ReportError(f"{_where(first)}: {_describe(first)}{more}") from None
    except RecursionError:  # unreachable for decoded JSON of the accepted depth; never a 500
        raise ReportError("report: nested too deeply") from None


def _where(error: Any) -> str:
    loc = list(error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    if not loc and ":" in message:
        # A model-level check names its own field first ("version: expected 1 ...").
        loc = [message.split(":", 1)[0]]
    out = "report"
    for i, part in enumerate(loc):
        if part == "[key]":
            out += " (the GPU name)"
        elif isinstance(part, int):
            out += f"[{part}]"
        elif i == 1 and loc[0] == "gpus":
            out += f"[{part!r}]"
        else:
            out += f".{part}"
    return out


def _describe(error: Any) -> str:
    message = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"] and ":" in message:
        return message.split(":", 1)[1].strip()
    given = error.get("input")
    shown = repr(given)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{message}, got {shown}" if error["type"] not in ("missing",) else message
