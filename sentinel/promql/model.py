"""Typed values of PromQL evaluation: Scalar, String, Vector, Matrix, and the error type.

Range data stays in the store's compact `array` buffers (int64 ms, float64 values);
only one Python object exists per series, never one per sample.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

from sentinel.store import Labels

__all__ = [
    "Annotations",
    "Matrix",
    "PromQLError",
    "RangeSeries",
    "Sample",
    "Scalar",
    "String",
    "Value",
    "Vector",
]


class PromQLError(Exception):
    """Any error Prometheus would report for a query (parse, matching, bad argument)."""


class Sample:
    """One element of an instant vector.

    `drop_name` implements Prometheus 3's delayed `__name__` removal: functions mark
    the sample instead of stripping the name at once, so `label_replace` can still read
    it; the engine strips marked names when it returns a result, so results never
    carry a set flag.
    """

    __slots__ = ("drop_name", "labels", "value")

    def __init__(self, labels: Labels, value: float, drop_name: bool = False) -> None:
        self.labels = labels
        self.value = value
        self.drop_name = drop_name

    def __repr__(self) -> str:
        return f"Sample({self.labels!r}, {self.value!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sample):
            return NotImplemented
        return self.labels == other.labels and _same_float(self.value, other.value)

    __hash__ = None  # type: ignore[assignment]


class RangeSeries:
    """One series of a range vector: labels plus parallel timestamp/value arrays.

    Read straight from the store, it also carries what the store knew about the window
    without a scan (`Series.range_hinted`): `hints` bits (0: unknown) and the counter
    reset correction (None: unknown), so kernels can skip per-sample passes.
    """

    __slots__ = ("drop_name", "hints", "labels", "reset_correction", "timestamps", "values")

    def __init__(
        self,
        labels: Labels,
        timestamps: array[int],
        values: array[float],
        drop_name: bool = False,
        hints: int = 0,
        reset_correction: float | None = None,
    ) -> None:
        self.labels = labels
        self.timestamps = timestamps
        self.values = values
        self.drop_name = drop_name
        self.hints = hints
        self.reset_correction = reset_correction

    def __len__(self) -> int:
        return len(self.timestamps)

    def points(self) -> list[tuple[int, float]]:
        """The samples as (timestamp_ms, value) pairs (convenience for callers and tests)."""
        return list(zip(self.timestamps, self.values, strict=True))

    def __repr__(self) -> str:
        return f"RangeSeries({self.labels!r}, {self.points()!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RangeSeries):
            return NotImplemented
        return (
            self.labels == other.labels
            and list(self.timestamps) == list(other.timestamps)
            and all(_same_float(a, b) for a, b in zip(self.values, other.values, strict=True))
        )

    __hash__ = None  # type: ignore[assignment]


class Vector(list[Sample]):
    """An instant vector: one sample per series, all at the evaluation time."""


class Matrix(list[RangeSeries]):
    """A range vector, or the result of a range query."""


@dataclass(frozen=True)
class Scalar:
    value: float


@dataclass(frozen=True)
class String:
    value: str


Value = Scalar | String | Vector | Matrix


@dataclass
class Annotations:
    """Prometheus's non-fatal warnings and infos collected during one evaluation."""

    warnings: list[str] = field(default_factory=list)
    infos: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def info(self, message: str) -> None:
        if message not in self.infos:
            self.infos.append(message)


def _same_float(a: float, b: float) -> bool:
    return a == b or (a != a and b != b)
