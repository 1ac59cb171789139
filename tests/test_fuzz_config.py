"""Fuzzing the config loader (build item 4): any file ends in a `Config` or a `ConfigError`.

An operator's typo, a truncated copy, a YAML feature nobody expected: `load_config` and
`parse_config` return a validated `Config` or raise `ConfigError` naming the problem,
never anything else (no RecursionError, no TypeError, no hang). Bounded in time.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sentinel.config.models import Config, ConfigError, load_config, parse_config

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=30)
    | st.sampled_from(["1s", "500ms", "1h30m", "-1s", "0660", "0.0.0.0:9847", "[::1]:0", "act", "observe", "$X"])
)
_KEYS = st.sampled_from(
    [
        "listen", "state_dir", "expected_gpus", "log", "store", "collectors", "workers", "rules", "remediation",
        "notify", "control", "http", "probe", "name", "gpus", "endpoint", "probe_token_file", "backend", "type",
        "profiles", "env", "socket", "socket_mode", "tcp", "allowed_hosts", "max_connections", "retention",
        "nvml", "endpoint", "sample_limit", "files", "mode", "routes", "match", "action", "token_file", "unknown",
    ]
) | st.text(max_size=12)  # fmt: skip
_VALUES = st.recursive(
    _SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_KEYS, children, max_size=5),
    max_leaves=25,
)
_DOCUMENTS = st.dictionaries(_KEYS, _VALUES, max_size=6)


def _check(text: str) -> None:
    try:
        config = parse_config(text, "fuzz.yaml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.yaml"), str(exc)
        return
    assert isinstance(config, Config)


@FUZZ
@given(_DOCUMENTS)
def test_structured_documents_load_or_raise_config_error(document: dict[str, object]) -> None:
    _check(yaml.safe_dump(document, allow_unicode=True))


@FUZZ
@given(
    st.lists(
        st.sampled_from(
            ["a: ", "- ", "[", "]", "{", "}", "&x ", "*x", "!!python/object ", "<<: ", "\n", "  ", "'", '"', ":",
             "workers:", "name: w", "? ", "|", ">", "---\n", "...\n", "%YAML 1.1\n", "\t", "#", "0x10", "~"]
        ),
        max_size=40,
    ).map("".join)
    | st.text(max_size=200)
)  # fmt: skip
def test_random_text_loads_or_raises_config_error(text: str) -> None:
    _check(text)


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_in_a_file_load_or_raise_config_error(tmp_path_factory: object, raw: bytes) -> None:
    path = Path(tmp_path_factory.mktemp("fuzz")) / "sentinel.yaml"  # type: ignore[attr-defined]
    path.write_bytes(raw)
    try:
        load_config(path)
    except ConfigError:
        return
