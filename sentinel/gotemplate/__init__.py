"""Prometheus alert templates: Go's text/template with Prometheus's data and functions.

What it offers, the whole API the rule engine uses:

    tmpl = parse("{{ $labels.instance }} at {{ $value | humanizePercentage }}")  # at rule load
    tmpl.render(TemplateContext(labels={"instance": "gpu0"}, value=0.97))      # per alert

`parse` raises `TemplateError` where Prometheus would refuse to load a template,
`Template.render` where its expansion would fail; `go_format` prints a value the way
Go's fmt does. Inside: `lex` and `parse` (Go's lexer and parser), `values` (the Go value
model and strconv), `format` (fmt), `funcs` (the builtins and Prometheus's functions)
and `execute` (the tree walker). The promtool differential test
(tests/test_templates.py) is the contract.
"""

from sentinel.gotemplate.execute import (
    QueryFunc,
    SampleLike,
    Template,
    TemplateContext,
    TemplateError,
    go_format,
    parse,
    render,
)

__all__ = ["QueryFunc", "SampleLike", "Template", "TemplateContext", "TemplateError", "go_format", "parse", "render"]
