"""Fuzzing the log matcher and the pattern loaders (issue 15, item 4), bounded in time.

The matcher never raises, whatever the bytes; an operator's pattern or a catalogue file
fails only with its documented error (pydantic's ValidationError for the config model,
CatalogueError for the catalogue), naming the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sentinel.config.models import LogPattern
from sentinel.logs import Catalogue, CatalogueError, LogMatcher
from tests.logs_wild import load_corpus

MATCHER = LogMatcher(Catalogue.load())
REAL = [line.text for line in load_corpus()]
BOUNDED = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Pieces of real lines, structure tokens and hostile repetitions, mixed with noise.
PIECES = st.one_of(
    st.sampled_from(REAL),
    st.sampled_from(["[rank0]:", "NCCL WARN ", "NVRM: Xid (", "Killed process ", "((", "\x1b[31m", "\ufffd", "\r"]),
    st.builds(lambda s, n: s * n, st.sampled_from(["NCCL WARN ", "[", "(", " ", "GPU ", "0"]), st.integers(1, 3000)),
    st.text(max_size=40),
)


@BOUNDED
@given(st.lists(PIECES, max_size=12), st.booleans())
def test_matcher_never_raises_and_batches_agree_with_lines(parts: list[str], newline_between: bool) -> None:
    text = ("\n" if newline_between else "").join(parts)
    data = text.encode("utf-8", "surrogatepass")
    batch = MATCHER.scan_bytes(data, line_numbers=True)
    lines = data.split(b"\n")
    single = [(i, m.event) for i, line in enumerate(lines) for m in MATCHER.scan_bytes(line, line_numbers=False)]
    assert [(m.line_index, m.event) for m in batch] == single


@BOUNDED
@given(st.binary(max_size=4000))
def test_matcher_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    for m in MATCHER.scan_bytes(data, line_numbers=True):
        assert isinstance(m.line, str) and m.event


REGEX_PIECES = st.sampled_from(
    [
        "(",
        ")",
        "(?P<g>",
        "(?P<g>x)",
        "(?!x)",
        "(?<=x)",
        "\\1",
        "[",
        "]",
        "a*",
        "*",
        "+?",
        "{2,}",
        "{{head}}",
        "{{nope}}",
        "\\Z",
        "\\z",
        "x{99999}",
        ".*",
        "|",
        "^",
        "$",
        "\\",
        "(?i)",
        "\\p{Greek}",
    ]
)


@BOUNDED
@given(
    st.lists(st.one_of(REGEX_PIECES, st.text(max_size=5)), max_size=8).map("".join),
    st.dictionaries(st.text(max_size=6), st.one_of(st.text(max_size=6), st.just("g"), st.just("=x")), max_size=3),
    st.one_of(st.none(), st.just("g"), st.text(max_size=4)),
    st.lists(st.text(max_size=8), max_size=3),
    st.text(max_size=8),
)
def test_operator_patterns_fail_only_with_a_validation_error(
    regex: str, labels: dict[str, str], value: str | None, keywords: list[str], id_: str
) -> None:
    raw = {"id": id_, "regex": regex, "labels": labels, "value": value, "keywords": keywords}
    try:
        pattern = LogPattern.model_validate(raw)
    except ValidationError:
        return
    matcher = LogMatcher(Catalogue.load([pattern]))  # what validated must compile and run
    matcher.scan_bytes(b"a line\nanother (x) [y] NCCL WARN z\n")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.text(max_size=200),
        st.sampled_from(
            [
                "patterns: 3",
                "patterns: [1]",
                "fragments: [x]\npatterns: []",
                "patterns:\n  - {id: a, regex: '(?!x)'}",
                "patterns:\n  - {id: a, regex: x, keywords: ['']}",
                "patterns:\n  - {id: A, regex: x}",
                "\x00",
                "{",
            ]
        ),
    )
)
def test_a_broken_catalogue_file_fails_only_with_catalogue_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "catalogue.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        Catalogue.load(path=path)
    except CatalogueError as exc:
        assert str(exc).startswith(str(path))


def test_catalogue_errors_name_the_field_for_linear_time_violations(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("patterns:\n  - {id: a, regex: '^(?!.*what).*x'}\n")
    with pytest.raises(CatalogueError, match=r"patterns\.0\.regex: .*lookahead and lookbehind are not supported"):
        Catalogue.load(path=path)
    path.write_text("patterns:\n  - {id: a, regex: '(a)\\1'}\n")
    with pytest.raises(CatalogueError, match=r"backreferences are not supported"):
        Catalogue.load(path=path)


@BOUNDED
@given(st.lists(PIECES, min_size=1, max_size=6).map("".join))
def test_labels_from_the_body_are_those_of_the_whole_regex(text: str) -> None:
    # The matcher takes labels from an entry's body checked against the head grammar
    # (fast); they must be exactly what the whole regex's submatches give.
    line = text.split("\n")[0].encode("utf-8", "replace")[:4096]
    for pattern in MATCHER.catalogue.patterns:
        assert _groups(pattern.find_spans(line)) == _groups(pattern.regex.spans(line)), (pattern.id, line)


def test_labels_from_the_body_match_the_whole_regex_on_every_real_line() -> None:
    for text in REAL:
        line = text.encode()
        for pattern in MATCHER.catalogue.patterns:
            assert _groups(pattern.find_spans(line)) == _groups(pattern.regex.spans(line)), (pattern.id, text)


def _groups(spans: Sequence[tuple[int, int]] | None) -> list[tuple[int, int]] | None:
    """The named groups' spans (group 0 is the body's match there, the whole line's here)."""
    return None if spans is None else list(spans[1:])
