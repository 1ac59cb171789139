"""`sentinel.config.yamlpos`: what PyYAML's safe loader accepts, with positions; the rest is a YamlError."""

from __future__ import annotations

import datetime

import pytest
import yaml

from sentinel.config.yamlpos import Position, YamlError, alias_of, load_document, load_with_positions


def test_merge_keys_apply_as_yamls_merge_spec_and_go_do_and_keep_each_mappings_text() -> None:
    text = (
        "rules:\n"
        "- &a {alert: A, expr: up == 0, labels: {page: yes}}\n"
        "- <<: *a\n  alert: B\n"
        "- <<: [{expr: 'x > 1', for: 5m}, *a]\n  alert: C\n"
    )
    doc = load_document(text, "r.yml")
    assert doc.data["rules"][:2] == yaml.safe_load(text)["rules"][:2]
    # Of several merged mappings the first wins (the merge spec; Go's yaml.v3 and so
    # promtool agree). PyYAML 6.0.4 lets `*a` win in this block-style case.
    assert doc.data["rules"][2] == {"alert": "C", "expr": "x > 1", "for": "5m", "labels": {"page": True}}
    b, c = doc.raw["rules"][1], doc.raw["rules"][2]
    assert (b["alert"], b["expr"], b["labels"]) == ("B", "up == 0", {"page": "yes"})
    assert (c["expr"], c["for"]) == ("x > 1", "5m")
    # A merged entry points into the mapping it came from.
    assert doc.positions[("rules", 1, "expr")] == Position(2, 17)
    assert doc.positions[("rules", 2, "alert")] == Position(6, 3)


@pytest.mark.parametrize(
    "text",
    [
        "a: !!set {x, y}\nb: !!omap [{k: 1}]\nc: !!binary aGVsbG8=\nd: 2001-12-14\ne: !!str 123\nf: 0x1F\n",
        "a: &x [1, 2]\nb: *x\n",
        "a: .inf\nb: -.Inf\nc: ~\nd: 'it''s'\ne: |\n  block\nf: >-\n  folded\n",
    ],
)
def test_every_safe_loader_value_comes_out_as_the_safe_loader_makes_it(text: str) -> None:
    assert load_with_positions(text, "f.yml")[0] == yaml.safe_load(text)


def test_timestamps_and_binary_are_constructed() -> None:
    data, _ = load_with_positions("t: 2001-12-14\nb: !!binary aGVsbG8=\n", "f.yml")
    assert data == {"t": datetime.date(2001, 12, 14), "b": b"hello"}


@pytest.mark.parametrize(
    ("text", "where", "problem"),
    [
        ("a: !Ref x\n", "f.yml:1:4", "could not determine a constructor for the tag '!Ref'"),
        ("a: 1\na: 2\n", "f.yml:2:1", "duplicate key 'a'"),
        ("a: &x [1, *x]\n", "f.yml:1:11", "recursive alias"),
        ("a: &x {<<: *x}\n", "f.yml:1:12", "recursive alias"),
        ("<<: 3\n", "f.yml:1:5", "expected a mapping or list of mappings for merging"),
        ("a: *nope\n", "f.yml:1:4", "found undefined alias 'nope'"),
        ("a: !!int xyz\n", "f.yml:1:4", "cannot construct tag:yaml.org,2002:int"),
        ("a: [1, 2\n", "f.yml:2:1", "expected ',' or ']'"),
    ],
)
def test_unloadable_input_is_a_yaml_error_with_file_and_line(text: str, where: str, problem: str) -> None:
    with pytest.raises(YamlError) as err:
        load_document(text, "f.yml")
    assert str(err.value).startswith(where) and problem in str(err.value), str(err.value)


@pytest.mark.parametrize("text", ["[" * 5000 + "]" * 5000, "{a: " * 3000 + "1" + "}" * 3000])
def test_nesting_past_the_recursion_limit_is_an_error_not_a_crash(text: str) -> None:
    with pytest.raises(YamlError, match="nested too deeply"):
        load_document(text, "f.yml")


def test_an_alias_bomb_is_refused() -> None:
    text = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
    )
    with pytest.raises(YamlError, match="excessive aliasing"):
        load_document(text, "f.yml")


def test_text_only_keeps_source_text_and_leaves_decoding_errors_to_the_caller() -> None:
    doc = load_document("a: !Custom yes\nb: 1\nb: 2\nc: {<<: 3, d: 1.50}\ne: &x up\nf: *x\n", "f.yml", text_only=True)
    assert doc.data == {"a": "yes", "b": "1", "c": {"d": "1.50"}, "e": "up", "f": "up"}
    assert alias_of(doc.nodes[("f",)]) == "x" and alias_of(doc.nodes[("e",)]) is None


def test_only_the_first_document_is_read_as_go_does() -> None:
    assert load_with_positions("a: 1\n---\nb: [\n", "f.yml")[0] == {"a": 1}
