"""Prometheus alert templates: Go text/template with Prometheus's data and functions.

Alert `labels` and `annotations` are Go templates. Prometheus parses each with the
preamble `{{$labels := .Labels}}{{$externalLabels := .ExternalLabels}}{{$externalURL :=
.ExternalURL}}{{$value := .Value}}` and `missingkey=zero`, then executes it per alert;
this module does the same, so a rule renders here exactly as Prometheus would render it:

    tmpl = parse("{{ $labels.instance }} at {{ $value | humanizePercentage }}")  # at rule load
    tmpl.render(TemplateContext(labels={"instance": "gpu0"}, value=0.97))      # per alert
    # -> "gpu0 at 97%"

`parse` raises `TemplateError` for a template Prometheus would refuse to load (what
`promtool check rules` reports); `render` raises it for what would fail at evaluation.

The lexer lives in `lex`, the parser in `parse`, the Go value model in `values`, fmt in
`format` and the function table in `funcs`; this module executes the parsed trees.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NoReturn, Protocol

from sentinel.gotemplate.format import go_format, go_sprint
from sentinel.gotemplate.funcs import FUNCS, PARAM_TYPES, GoFunc, ParamKind
from sentinel.gotemplate.parse import (
    ActionNode,
    BoolNode,
    BreakNode,
    ChainNode,
    CommandNode,
    ContinueNode,
    DotNode,
    FieldNode,
    IdentifierNode,
    IfNode,
    ListNode,
    NilNode,
    Node,
    NumberNode,
    PipeNode,
    RangeNode,
    StringNode,
    TemplateError,
    TemplateNode,
    TextNode,
    VariableNode,
    WithNode,
    parse_trees,
)
from sentinel.gotemplate.values import (
    AlertData,
    AnyMap,
    GoFuncError,
    GoHTML,
    GoMethod,
    GoStruct,
    GoTime,
    QueryResult,
    QuerySample,
    go_quote,
    go_type_name,
    is_true,
)

__all__ = [
    "QueryFunc",
    "SampleLike",
    "Template",
    "TemplateContext",
    "TemplateError",
    "go_format",
    "parse",
    "render",
]

# The variables Prometheus's preamble declares before every alert template.
PREAMBLE_VARIABLES = ("$labels", "$externalLabels", "$externalURL", "$value")

# Nested {{template}} calls allowed before giving up (Go allows 100000; Python's stack is shallower).
MAX_TEMPLATE_DEPTH = 50


class SampleLike(Protocol):
    """One result of a query: labels (a mapping or name/value pairs) and a value."""

    @property
    def labels(self) -> Mapping[str, str] | Iterable[tuple[str, str]]: ...

    @property
    def value(self) -> float: ...


QueryFunc = Callable[[str], Iterable[SampleLike]]
"""Runs a PromQL instant query at the alert's evaluation time, for the `query` function."""


@dataclass(frozen=True)
class TemplateContext:
    """What one alert's templates see: its labels and value, and the server's identity."""

    labels: Mapping[str, str]
    value: float
    external_labels: Mapping[str, str] = field(default_factory=dict)
    external_url: str = ""
    query: QueryFunc | None = None


class Template:
    """A parsed template; immutable, so one instance serves every alert of a rule."""

    __slots__ = ("_trees", "name", "text")

    def __init__(self, name: str, text: str, trees: Mapping[str, ListNode]):
        self.name = name
        self.text = text
        self._trees = dict(trees)

    def __repr__(self) -> str:
        return f"Template(name={self.name!r}, text={self.text!r})"

    def render(self, ctx: TemplateContext) -> str:
        """Execute the template for one alert; raises TemplateError where Prometheus's expansion fails."""
        # Prometheus's value is always a float64: an int here must not make `gt $value 0.9` fail.
        value = float(ctx.value)
        data = AlertData(ctx.labels, ctx.external_labels, ctx.external_url, value)
        preamble: list[tuple[str, object]] = [
            ("$", data),
            ("$labels", ctx.labels),
            ("$externalLabels", ctx.external_labels),
            ("$externalURL", ctx.external_url),
            ("$value", value),
        ]
        state = _Exec(self, _Env(ctx), preamble)
        try:
            state.walk(data, self._trees[self.name])
        except RecursionError:
            # The depth limits should prevent this; never let it escape as a crash.
            state.fail("template nested too deeply to execute", self._trees[self.name])
        return "".join(state.out)


@functools.lru_cache(maxsize=4096)
def parse(text: str, name: str = "template") -> Template:
    """Parse (and cache) a template; raises TemplateError with line:column if Go would refuse it.

    `name` is what errors call the template; Prometheus uses `__alert_<alertname>`.
    """
    funcs = frozenset(FUNCS)
    return Template(name, text, parse_trees(text, name, funcs, PREAMBLE_VARIABLES))


def render(text: str, ctx: TemplateContext, name: str = "template") -> str:
    """Parse (cached) and render in one step."""
    return parse(text, name).render(ctx)


class _Env:
    """The render-time services template functions may use (funcs.FuncEnv)."""

    def __init__(self, ctx: TemplateContext):
        self._ctx = ctx

    @property
    def external_url(self) -> str:
        return self._ctx.external_url

    def run_query(self, query: str) -> QueryResult:
        if self._ctx.query is None:
            raise GoFuncError("no query engine: pass query= in the TemplateContext to use query()")
        try:
            samples = list(self._ctx.query(query))
        except Exception as e:
            # Prometheus turns any query failure into an expansion error of this template;
            # the alert itself still fires with the error text in place of the annotation.
            raise GoFuncError(str(e) or type(e).__name__) from e
        result = QueryResult()
        for sample in samples:
            labels = sample.labels
            pairs = labels.items() if isinstance(labels, Mapping) else labels
            result.append(QuerySample({str(k): str(v) for k, v in pairs}, float(sample.value)))
        return result


def _printable(value: object) -> str:
    """An action's output: Go's "<no value>" for nothing, pointers dereferenced, else fmt.Print."""
    if value is None:
        return "<no value>"
    if isinstance(value, GoStruct) and value.pointer:
        return "{" + " ".join(go_sprint([v]) for v in value.fields().values()) + "}"
    return go_sprint([value])


class _Missing:
    """No final value: the command is the first of its pipeline."""


_MISSING = _Missing()


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


class _Exec:
    """The state of one execution (text/template's state): output, variables, error context."""

    def __init__(self, tmpl: Template, env: _Env, variables: list[tuple[str, object]]):
        self.tmpl = tmpl
        self.current = tmpl.name
        self.env = env
        self.vars = variables
        self.out: list[str] = []
        self.node: Node | None = None
        self.depth = 0

    def fail(self, message: str, node: Node | None = None) -> NoReturn:
        node = node or self.node
        pos = node.pos if node is not None else 0
        context = str(node) if node is not None else ""
        detail = f'executing "{self.current}" at <{context}>: {message}'
        raise TemplateError(self.tmpl.name, self.tmpl.text, pos, detail, "exec")

    # Variables.

    def var_value(self, name: str) -> object:
        for var_name, value in reversed(self.vars):
            if var_name == name:
                return value
        self.fail(f"undefined variable: {name}")

    def set_var(self, name: str, value: object) -> None:
        for i in range(len(self.vars) - 1, -1, -1):
            if self.vars[i][0] == name:
                self.vars[i] = (name, value)
                return
        self.fail(f"undefined variable: {name}")

    def set_top_var(self, n: int, value: object) -> None:
        self.vars[-n] = (self.vars[-n][0], value)

    # Statements.

    def walk(self, dot: object, node: Node) -> None:
        if isinstance(node, TextNode):
            self.out.append(node.text)
        elif isinstance(node, ListNode):
            for child in node.nodes:
                self.walk(dot, child)
        elif isinstance(node, ActionNode):
            value = self.eval_pipeline(dot, node.pipe)
            if not node.pipe.decls:
                self.node = node
                self.out.append(_printable(value))
        elif isinstance(node, (IfNode, WithNode)):
            self.walk_if_or_with(dot, node)
        elif isinstance(node, RangeNode):
            self.walk_range(dot, node)
        elif isinstance(node, TemplateNode):
            self.walk_template(dot, node)
        elif isinstance(node, BreakNode):
            raise _Break
        elif isinstance(node, ContinueNode):
            raise _Continue
        else:
            self.fail(f"unknown node: {node}", node)

    def walk_if_or_with(self, dot: object, node: IfNode | WithNode) -> None:
        mark = len(self.vars)
        try:
            value = self.eval_pipeline(dot, node.pipe)
            truth, ok = is_true(value)
            if not ok:
                self.fail(f"if/with can't use {go_sprint([value])}")
            if truth:
                self.walk(value if isinstance(node, WithNode) else dot, node.list)
            elif node.else_list is not None:
                self.walk(dot, node.else_list)
        finally:
            del self.vars[mark:]

    def walk_range(self, dot: object, node: RangeNode) -> None:
        self.node = node
        mark = len(self.vars)
        try:
            value = self.eval_pipeline(dot, node.pipe)
            body_mark = len(self.vars)
            decls = node.pipe.decls

            def iteration(index: object, elem: object) -> None:
                if decls:
                    if node.pipe.is_assign:
                        self.set_var(decls[0].idents[0], index if len(decls) > 1 else elem)
                    else:
                        self.set_top_var(1, elem)
                if len(decls) > 1:
                    if node.pipe.is_assign:
                        self.set_var(decls[1].idents[0], elem)
                    else:
                        self.set_top_var(2, index)
                try:
                    self.walk(elem, node.list)
                except _Continue:
                    pass
                finally:
                    del self.vars[body_mark:]

            items: Iterable[tuple[object, object]]
            if isinstance(value, list):
                items = list(enumerate(value))
            elif isinstance(value, Mapping):
                items = [(k, value[k]) for k in sorted(value)]  # Go ranges over maps in key order
            elif isinstance(value, int) and not isinstance(value, bool):
                if len(decls) > 1:
                    self.fail(f"can't use {value} to iterate over more than one variable")
                items = ((i, i) for i in range(value))  # Go 1.22 ranges over integers
            elif value is None:
                items = []
            else:
                self.fail(f"range can't iterate over {go_sprint([value])}")
            ran = False
            try:
                for index, elem in items:
                    ran = True
                    iteration(index, elem)
            except _Break:
                return
            if not ran and node.else_list is not None:
                self.walk(dot, node.else_list)
        finally:
            del self.vars[mark:]

    def walk_template(self, dot: object, node: TemplateNode) -> None:
        self.node = node
        root = self.tmpl._trees.get(node.name)
        if root is None:
            self.fail(f"template {go_quote(node.name)} not defined", node)
        if self.depth >= MAX_TEMPLATE_DEPTH:
            self.fail(f"exceeded maximum template depth ({MAX_TEMPLATE_DEPTH})", node)
        # Without a pipeline the invoked template runs with nil data, as in Go.
        new_dot = None if node.pipe is None else self.eval_pipeline(dot, node.pipe)
        saved = self.vars, self.current
        self.vars, self.current = [("$", new_dot)], node.name
        self.depth += 1
        try:
            self.walk(new_dot, root)
        finally:
            self.vars, self.current = saved
            self.depth -= 1

    # Expressions.

    def eval_pipeline(self, dot: object, pipe: PipeNode) -> object:
        self.node = pipe
        value: object = _MISSING
        for cmd in pipe.cmds:
            value = self.eval_command(dot, cmd, value)
        for var in pipe.decls:
            if pipe.is_assign:
                self.set_var(var.idents[0], value)
            else:
                self.vars.append((var.idents[0], value))
        return value

    def eval_command(self, dot: object, cmd: CommandNode, final: object) -> object:
        first = cmd.args[0]
        if isinstance(first, FieldNode):
            return self.eval_field_chain(dot, dot, first, first.idents, cmd.args, final)
        if isinstance(first, ChainNode):
            return self.eval_chain(dot, first, cmd.args, final)
        if isinstance(first, IdentifierNode):
            return self.eval_function(dot, first, cmd, cmd.args, final)
        if isinstance(first, PipeNode):
            self.not_a_function(cmd.args, final)
            return self.eval_pipeline(dot, first)
        if isinstance(first, VariableNode):
            return self.eval_variable(dot, first, cmd.args, final)
        self.node = first
        self.not_a_function(cmd.args, final)
        if isinstance(first, BoolNode):
            return first.value
        if isinstance(first, DotNode):
            return dot
        if isinstance(first, NilNode):
            self.fail("nil is not a command")
        if isinstance(first, NumberNode):
            return self.ideal_constant(first)
        if isinstance(first, StringNode):
            return first.text
        self.fail(f"can't evaluate command {first}")

    def not_a_function(self, args: Sequence[Node] | None, final: object) -> None:
        if (args is not None and len(args) > 1) or final is not _MISSING:
            assert args is not None
            self.fail(f"can't give argument to non-function {args[0]}")

    def ideal_constant(self, n: NumberNode) -> object:
        """An untyped numeric constant: float when written like one, else int (as Go decides)."""
        self.node = n
        # Go's isHexInt looks at the raw text, so a signed hex constant such as -0x1E is a float.
        hex_int = n.text[:2] in ("0x", "0X") and not any(c in n.text for c in "pP")
        looks_float = any(c in n.text for c in ".eEpP") and not hex_int and not n.text.startswith("'")
        if n.float_value is not None and looks_float:
            return n.float_value
        if n.int_value is not None:
            return n.int_value
        self.fail(f"{n.text} overflows int")

    def eval_variable(self, dot: object, var: VariableNode, args: Sequence[Node] | None, final: object) -> object:
        self.node = var
        value = self.var_value(var.idents[0])
        if len(var.idents) == 1:
            self.not_a_function(args, final)
            return value
        return self.eval_field_chain(dot, value, var, var.idents[1:], args, final)

    def eval_chain(self, dot: object, chain: ChainNode, args: Sequence[Node] | None, final: object) -> object:
        self.node = chain
        if isinstance(chain.node, NilNode):
            self.fail(f"indirection through explicit nil in {chain}")
        receiver = self.eval_arg(dot, "any", chain.node)
        return self.eval_field_chain(dot, receiver, chain, chain.fields, args, final)

    def eval_field_chain(
        self,
        dot: object,
        receiver: object,
        node: Node,
        idents: Sequence[str],
        args: Sequence[Node] | None,
        final: object,
    ) -> object:
        self.node = node
        for name in idents[:-1]:
            receiver = self.eval_field(dot, name, node, None, _MISSING, receiver)
        return self.eval_field(dot, idents[-1], node, args, final, receiver)

    def eval_field(
        self, dot: object, name: str, node: Node, args: Sequence[Node] | None, final: object, receiver: object
    ) -> object:
        if receiver is None:
            return None  # a field of nothing is nothing, as Go's missingkey=zero has it
        method: GoMethod | None = receiver.method(name) if isinstance(receiver, GoTime) else None
        if method is not None:
            fn = GoFunc(method.params, None, lambda _env, a: method.call(a))
            return self.eval_call(dot, fn, name, node, args, final)
        has_args = (args is not None and len(args) > 1) or final is not _MISSING
        if isinstance(receiver, GoStruct):
            fields = receiver.fields()
            if name in fields:
                if has_args:
                    self.fail(f"{name} has arguments but cannot be invoked as function")
                return fields[name]
        elif isinstance(receiver, Mapping):
            if has_args:
                self.fail(f"{name} is not a method but has arguments")
            if name in receiver:
                return receiver[name]
            # missingkey=zero: the element type's zero value ("" for labels, nil for args).
            return None if isinstance(receiver, AnyMap) else ""
        self.fail(f"can't evaluate field {name} in type {go_type_name(receiver)}")

    def eval_function(
        self, dot: object, ident: IdentifierNode, node: Node, args: Sequence[Node] | None, final: object
    ) -> object:
        self.node = ident
        return self.eval_call(dot, FUNCS[ident.name], ident.name, node, args, final)

    def eval_call(
        self, dot: object, fn: GoFunc, name: str, node: Node, args: Sequence[Node] | None, final: object
    ) -> object:
        call_args = list(args[1:]) if args else []  # args[0] names the function itself
        num_in = len(call_args) + (final is not _MISSING)
        if fn.variadic is not None:
            if num_in < len(fn.params):
                self.fail(f"wrong number of args for {name}: want at least {len(fn.params)} got {len(call_args)}")
        elif num_in != len(fn.params):
            self.fail(f"wrong number of args for {name}: want {len(fn.params)} got {num_in}")
        if fn is FUNCS.get(name) and name in ("and", "or"):
            # Go's and/or stop at the first argument that decides the result.
            result: object = None
            for arg in call_args:
                result = self.eval_arg(dot, "value", arg)
                if is_true(result)[0] == (name == "or"):
                    return result
            return final if final is not _MISSING else result
        argv: list[object] = []
        for i, arg in enumerate(call_args):
            kind = fn.params[i] if i < len(fn.params) else fn.variadic
            assert kind is not None
            argv.append(self.eval_arg(dot, kind, arg))
        if final is not _MISSING:
            kind = fn.params[num_in - 1] if num_in - 1 < len(fn.params) else fn.variadic
            assert kind is not None
            argv.append(self.validate(final, kind))
        try:
            return fn.impl(self.env, argv)
        except GoFuncError as e:
            self.fail(f"error calling {name}: {e}", node)

    def eval_arg(self, dot: object, kind: ParamKind, node: Node) -> object:
        """One argument, checked against its parameter kind as Go's evalArg checks it."""
        self.node = node
        if isinstance(node, DotNode):
            return self.validate(dot, kind)
        if isinstance(node, NilNode):
            if kind == "string":
                self.fail(f"cannot assign nil to {PARAM_TYPES[kind]}")
            return QueryResult() if kind == "samples" else None
        if isinstance(node, FieldNode):
            return self.validate(self.eval_field_chain(dot, dot, node, node.idents, [node], _MISSING), kind)
        if isinstance(node, VariableNode):
            return self.validate(self.eval_variable(dot, node, None, _MISSING), kind)
        if isinstance(node, PipeNode):
            return self.validate(self.eval_pipeline(dot, node), kind)
        if isinstance(node, IdentifierNode):
            return self.validate(self.eval_function(dot, node, node, None, _MISSING), kind)
        if isinstance(node, ChainNode):
            return self.validate(self.eval_chain(dot, node, None, _MISSING), kind)
        if kind in ("any", "value"):
            if isinstance(node, BoolNode):
                return node.value
            if isinstance(node, NumberNode):
                return self.ideal_constant(node)
            if isinstance(node, StringNode):
                return node.text
        elif kind == "string":
            if isinstance(node, StringNode):
                return node.text
            self.fail(f"expected string; found {node}")
        self.fail(f"can't handle {node} for arg of type {PARAM_TYPES[kind]}")

    def validate(self, value: object, kind: ParamKind) -> object:
        """Go's validateType: a computed value must be assignable to the parameter."""
        if kind in ("any", "value"):
            return value
        if value is None:
            if kind == "samples":
                return QueryResult()  # a nil slice: empty
            if kind == "sample":
                return None  # a nil pointer; the function reports the dereference
            self.fail(f"invalid value; expected {PARAM_TYPES[kind]}")
        ok = {
            "string": isinstance(value, str) and not isinstance(value, GoHTML),
            "sample": isinstance(value, QuerySample),
            "samples": isinstance(value, QueryResult),
        }[kind]
        if not ok:
            self.fail(f"wrong type for value; expected {PARAM_TYPES[kind]}; got {go_type_name(value)}")
        return value
