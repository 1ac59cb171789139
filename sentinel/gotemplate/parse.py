"""Recursive-descent parser for Go's text/template (text/template/parse/parse.go).

The grammar, the token rules (trim markers, comments, number syntax) and the error
messages follow Go's package, so a template Sentinel accepts is one Prometheus accepts
and the reason for a rejection reads the same. Positions are kept as character offsets
into the template and reported as 1-based line:column.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal, NoReturn

from sentinel.gotemplate.lex import T, Token, lex
from sentinel.gotemplate.values import (
    go_parse_float,
    go_parse_int,
    go_quote,
    go_unquote,
    go_unquote_char,
)

__all__ = [
    "ActionNode",
    "BoolNode",
    "BreakNode",
    "ChainNode",
    "CommandNode",
    "ContinueNode",
    "DotNode",
    "FieldNode",
    "IdentifierNode",
    "IfNode",
    "ListNode",
    "NilNode",
    "Node",
    "NumberNode",
    "PipeNode",
    "RangeNode",
    "StringNode",
    "TemplateError",
    "TemplateNode",
    "TextNode",
    "VariableNode",
    "WithNode",
    "parse_trees",
]

# Deeper nesting than this is refused rather than risking Python's recursion limit;
# Go stops at 10000, far beyond anything an alert annotation needs.
MAX_DEPTH = 100


class TemplateError(Exception):
    """A template that does not parse, or that fails while rendering; names where and why."""

    def __init__(self, name: str, text: str, pos: int, detail: str, phase: Literal["parse", "exec"]):
        self.name = name
        self.line = text.count("\n", 0, pos) + 1
        self.col = pos - (text.rfind("\n", 0, pos) + 1) + 1
        self.detail = detail
        self.phase = phase
        super().__init__(f"template: {name}:{self.line}:{self.col}: {detail}")


# --- AST ---------------------------------------------------------------------------------------


class Node:
    """A node of the template tree; `pos` is a character offset into the template text."""

    __slots__ = ()
    pos: int


@dataclass(frozen=True, slots=True)
class TextNode(Node):
    pos: int
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class IdentifierNode(Node):
    pos: int
    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class VariableNode(Node):
    pos: int
    idents: tuple[str, ...]  # "$x", then any field names

    def __str__(self) -> str:
        return ".".join(self.idents)


@dataclass(frozen=True, slots=True)
class FieldNode(Node):
    pos: int
    idents: tuple[str, ...]

    def __str__(self) -> str:
        return "".join("." + ident for ident in self.idents)


@dataclass(frozen=True, slots=True)
class DotNode(Node):
    pos: int

    def __str__(self) -> str:
        return "."


@dataclass(frozen=True, slots=True)
class NilNode(Node):
    pos: int

    def __str__(self) -> str:
        return "nil"


@dataclass(frozen=True, slots=True)
class BoolNode(Node):
    pos: int
    value: bool

    def __str__(self) -> str:
        return "true" if self.value else "false"


@dataclass(frozen=True, slots=True)
class NumberNode(Node):
    """A numeric constant with each interpretation Go's parser found valid."""

    pos: int
    text: str
    int_value: int | None  # fits int64
    uint_value: int | None  # fits uint64
    float_value: float | None

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class StringNode(Node):
    pos: int
    quoted: str
    text: str

    def __str__(self) -> str:
        return self.quoted


@dataclass(frozen=True, slots=True)
class ChainNode(Node):
    """Field access on a term that is neither `.` nor a variable: (pipeline).Field."""

    pos: int
    node: Node
    fields: tuple[str, ...]

    def __str__(self) -> str:
        inner = f"({self.node})" if isinstance(self.node, PipeNode) else str(self.node)
        return inner + "".join("." + f for f in self.fields)


@dataclass(frozen=True, slots=True)
class CommandNode(Node):
    pos: int
    args: tuple[Node, ...]

    def __str__(self) -> str:
        return " ".join(f"({a})" if isinstance(a, PipeNode) else str(a) for a in self.args)


@dataclass(frozen=True, slots=True)
class PipeNode(Node):
    pos: int
    decls: tuple[VariableNode, ...]
    is_assign: bool
    cmds: tuple[CommandNode, ...]

    def __str__(self) -> str:
        head = ""
        if self.decls:
            head = ", ".join(map(str, self.decls)) + (" = " if self.is_assign else " := ")
        return head + " | ".join(map(str, self.cmds))


@dataclass(frozen=True, slots=True)
class ActionNode(Node):
    pos: int
    pipe: PipeNode

    def __str__(self) -> str:
        return "{{" + str(self.pipe) + "}}"


@dataclass(frozen=True, slots=True)
class ListNode(Node):
    pos: int
    nodes: tuple[Node, ...]

    def __str__(self) -> str:
        return "".join(map(str, self.nodes))


@dataclass(frozen=True, slots=True)
class _BranchNode(Node):
    pos: int
    pipe: PipeNode
    list: ListNode
    else_list: ListNode | None

    def _render(self, keyword: str) -> str:
        tail = "" if self.else_list is None else "{{else}}" + str(self.else_list)
        return f"{{{{{keyword} {self.pipe}}}}}{self.list}{tail}{{{{end}}}}"


@dataclass(frozen=True, slots=True)
class IfNode(_BranchNode):
    def __str__(self) -> str:
        return self._render("if")


@dataclass(frozen=True, slots=True)
class WithNode(_BranchNode):
    def __str__(self) -> str:
        return self._render("with")


@dataclass(frozen=True, slots=True)
class RangeNode(_BranchNode):
    def __str__(self) -> str:
        return self._render("range")


@dataclass(frozen=True, slots=True)
class TemplateNode(Node):
    pos: int
    name: str
    pipe: PipeNode | None

    def __str__(self) -> str:
        return "{{template " + go_quote(self.name) + ("" if self.pipe is None else f" {self.pipe}") + "}}"


@dataclass(frozen=True, slots=True)
class BreakNode(Node):
    pos: int

    def __str__(self) -> str:
        return "{{break}}"


@dataclass(frozen=True, slots=True)
class ContinueNode(Node):
    pos: int

    def __str__(self) -> str:
        return "{{continue}}"


@dataclass(frozen=True, slots=True)
class _EndNode(Node):
    pos: int

    def __str__(self) -> str:
        return "{{end}}"


@dataclass(frozen=True, slots=True)
class _ElseNode(Node):
    pos: int

    def __str__(self) -> str:
        return "{{else}}"


# --- parser ------------------------------------------------------------------------------------

_OPERAND_START = frozenset(
    {T.BOOL, T.CHAR_CONSTANT, T.COMPLEX, T.DOT, T.FIELD, T.IDENT, T.NUMBER, T.NIL}
    | {T.RAW_STRING, T.STRING, T.VARIABLE, T.LEFT_PAREN}
)


class _Parser:
    """Recursive descent over the token list, mirroring text/template/parse.Tree."""

    def __init__(self, text: str, name: str, funcs: Collection[str], predeclared: Sequence[str]):
        self.text = text
        self.name = name
        self.funcs = funcs
        self.toks = lex(text)
        self.i = 0
        self.furthest = 0
        self.vars = ["$", *predeclared]
        self.range_depth = 0
        self.depth = 0
        self.action_pos: int | None = None
        self.trees: dict[str, ListNode] = {}

    # Token stream.

    def next(self) -> Token:
        tok = self.toks[min(self.i, len(self.toks) - 1)]
        self.i = min(self.i + 1, len(self.toks))
        self.furthest = max(self.furthest, self.i - 1)
        return tok

    def backup(self, n: int = 1) -> None:
        self.i -= n

    def peek(self) -> Token:
        tok = self.next()
        self.backup()
        return tok

    def next_non_space(self) -> Token:
        tok = self.next()
        while tok.typ is T.SPACE:
            tok = self.next()
        return tok

    def peek_non_space(self) -> Token:
        tok = self.next_non_space()
        self.backup()
        return tok

    def errorf(self, message: str, pos: int | None = None) -> NoReturn:
        if pos is None:
            pos = self.toks[min(self.furthest, len(self.toks) - 1)].pos
        raise TemplateError(self.name, self.text, pos, message, "parse")

    def unexpected(self, tok: Token, context: str) -> NoReturn:
        if tok.typ is T.ERROR:
            extra = ""
            if self.action_pos is not None and self.text.count("\n", self.action_pos, tok.pos):
                line = self.text.count("\n", 0, self.action_pos) + 1
                extra = f" in action started at {self.name}:{line}"
                if tok.val.endswith(" action"):
                    extra = extra[len(" in action") :]  # avoid "action in action"
            self.errorf(tok.val + extra, tok.pos)
        self.errorf(f"unexpected {tok} in {context}", tok.pos)

    def expect(self, typ: T, context: str) -> Token:
        tok = self.next_non_space()
        if tok.typ is not typ:
            self.unexpected(tok, context)
        return tok

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.errorf(f"max expression depth exceeded ({MAX_DEPTH})")

    # Templates and lists.

    def parse(self) -> dict[str, ListNode]:
        nodes: list[Node] = []
        start = self.peek().pos
        while self.peek().typ is not T.EOF:
            if self.peek().typ is T.LEFT_DELIM:
                mark = self.i
                self.next()
                if self.next_non_space().typ is T.DEFINE:
                    self.parse_definition()
                    continue
                self.i = mark
            node = self.text_or_action()
            if isinstance(node, (_EndNode, _ElseNode)):
                self.errorf(f"unexpected {node}", node.pos)
            nodes.append(node)
        self.add_tree(self.name, ListNode(start, tuple(nodes)))
        return self.trees

    def add_tree(self, name: str, root: ListNode) -> None:
        existing = self.trees.get(name)
        if existing is None or _is_empty(existing):
            self.trees[name] = root
        elif not _is_empty(root):
            self.errorf(f"template: multiple definition of template {go_quote(name)}")

    def in_new_tree(self, parse_body: str) -> ListNode:
        """Parse a define/block body: a separate tree that sees none of our variables."""
        saved = self.vars, self.range_depth
        self.vars, self.range_depth = ["$"], 0
        try:
            body, end = self.item_list()
        finally:
            self.vars, self.range_depth = saved
        if not isinstance(end, _EndNode):
            self.errorf(f"unexpected {end} in {parse_body}", end.pos)
        return body

    def parse_definition(self) -> None:
        tok = self.next_non_space()
        if tok.typ not in (T.STRING, T.RAW_STRING):
            self.unexpected(tok, "define clause")
        name = self.unquote(tok)
        self.expect(T.RIGHT_DELIM, "define clause")
        self.add_tree(name, self.in_new_tree("define clause"))

    def item_list(self) -> tuple[ListNode, Node]:
        start = self.peek_non_space().pos
        nodes: list[Node] = []
        while self.peek_non_space().typ is not T.EOF:
            node = self.text_or_action()
            if isinstance(node, (_EndNode, _ElseNode)):
                return ListNode(start, tuple(nodes)), node
            nodes.append(node)
        self.errorf("unexpected EOF")

    def text_or_action(self) -> Node:
        tok = self.next_non_space()
        if tok.typ is T.TEXT:
            return TextNode(tok.pos, tok.val)
        if tok.typ is T.LEFT_DELIM:
            saved, self.action_pos = self.action_pos, tok.pos
            try:
                return self.action()
            finally:
                self.action_pos = saved
        self.unexpected(tok, "input")

    def action(self) -> Node:
        tok = self.next_non_space()
        if tok.typ is T.BLOCK:
            return self.block_control()
        if tok.typ in (T.BREAK, T.CONTINUE):
            return self.loop_control(tok)
        if tok.typ is T.ELSE:
            return self.else_control()
        if tok.typ is T.END:
            return _EndNode(self.expect(T.RIGHT_DELIM, "end").pos)
        if tok.typ in (T.IF, T.RANGE, T.WITH):
            return self.branch_control(tok.typ)
        if tok.typ is T.TEMPLATE:
            return self.template_control()
        self.backup()
        return ActionNode(self.peek().pos, self.pipeline("command", T.RIGHT_DELIM))

    # Control structures.

    def loop_control(self, tok: Token) -> Node:
        context = "{{" + tok.val + "}}"
        nxt = self.next_non_space()
        if nxt.typ is not T.RIGHT_DELIM:
            self.unexpected(nxt, context)
        if self.range_depth == 0:
            self.errorf(f"{context} outside {{{{range}}}}", tok.pos)
        return BreakNode(tok.pos) if tok.typ is T.BREAK else ContinueNode(tok.pos)

    def else_control(self) -> Node:
        peek = self.peek_non_space()
        # "{{else if ...}}" and "{{else with ...}}" leave the keyword for branch_control.
        if peek.typ in (T.IF, T.WITH):
            return _ElseNode(peek.pos)
        return _ElseNode(self.expect(T.RIGHT_DELIM, "else").pos)

    def branch_control(self, typ: T) -> _BranchNode:
        context = {T.IF: "if", T.RANGE: "range", T.WITH: "with"}[typ]
        self.enter()
        mark = len(self.vars)
        pipe = self.pipeline(context, T.RIGHT_DELIM)
        if typ is T.RANGE:
            self.range_depth += 1
        body, nxt = self.item_list()
        if typ is T.RANGE:
            self.range_depth -= 1
        else_list: ListNode | None = None
        if isinstance(nxt, _ElseNode):
            # {{if a}}x{{else if b}}y{{end}} is {{if a}}x{{else}}{{if b}}y{{end}}{{end}}.
            if typ in (T.IF, T.WITH) and self.peek().typ is typ:
                self.next()
                else_list = ListNode(nxt.pos, (self.branch_control(typ),))
            else:
                else_list, nxt = self.item_list()
                if not isinstance(nxt, _EndNode):
                    self.errorf(f"expected end; found {nxt}", nxt.pos)
        del self.vars[mark:]
        self.depth -= 1
        cls = {T.IF: IfNode, T.RANGE: RangeNode, T.WITH: WithNode}[typ]
        return cls(pipe.pos, pipe, body, else_list)

    def template_name(self, context: str) -> tuple[Token, str]:
        tok = self.next_non_space()
        if tok.typ not in (T.STRING, T.RAW_STRING):
            self.unexpected(tok, context)
        return tok, self.unquote(tok)

    def template_control(self) -> Node:
        tok, name = self.template_name("template clause")
        pipe = None
        if self.next_non_space().typ is not T.RIGHT_DELIM:
            self.backup()
            pipe = self.pipeline("template clause", T.RIGHT_DELIM)
        return TemplateNode(tok.pos, name, pipe)

    def block_control(self) -> Node:
        tok, name = self.template_name("block clause")
        pipe = self.pipeline("block clause", T.RIGHT_DELIM)
        self.add_tree(name, self.in_new_tree("block clause"))
        return TemplateNode(tok.pos, name, pipe)

    # Pipelines.

    def pipeline(self, context: str, end: T) -> PipeNode:
        pos = self.peek_non_space().pos
        decls: list[VariableNode] = []
        is_assign = False
        while self.peek_non_space().typ is T.VARIABLE:
            mark = self.i
            var = self.next()
            nxt = self.peek_non_space()
            if nxt.typ in (T.ASSIGN, T.DECLARE):
                is_assign = nxt.typ is T.ASSIGN
                self.next_non_space()
                decls.append(VariableNode(var.pos, (var.val,)))
                self.vars.append(var.val)
                break
            if nxt.typ is T.CHAR and nxt.val == ",":
                self.next_non_space()
                decls.append(VariableNode(var.pos, (var.val,)))
                self.vars.append(var.val)
                if context == "range" and len(decls) < 2:
                    if self.peek_non_space().typ in (T.VARIABLE, T.RIGHT_DELIM, T.RIGHT_PAREN):
                        continue  # the second variable of "range $i, $e :="
                    self.errorf("range can only initialize variables")
                self.errorf(f"too many declarations in {context}")
            self.i = mark  # "$x foo": the variable is an argument, not a declaration
            break
        cmds: list[CommandNode] = []
        while True:
            tok = self.next_non_space()
            if tok.typ is end:
                if not cmds:
                    self.errorf(f"missing value for {context}")
                for n, cmd in enumerate(cmds[1:], start=2):
                    if isinstance(cmd.args[0], (BoolNode, DotNode, NilNode, NumberNode, StringNode)):
                        self.errorf(f"non executable command in pipeline stage {n}", cmd.pos)
                return PipeNode(pos, tuple(decls), is_assign, tuple(cmds))
            if tok.typ not in _OPERAND_START:
                self.unexpected(tok, context)
            self.backup()
            cmds.append(self.command())

    def command(self) -> CommandNode:
        pos = self.peek_non_space().pos
        args: list[Node] = []
        while True:
            self.peek_non_space()
            operand = self.operand()
            if operand is not None:
                args.append(operand)
            tok = self.next()
            if tok.typ is T.SPACE:
                continue
            if tok.typ in (T.RIGHT_DELIM, T.RIGHT_PAREN):
                self.backup()
            elif tok.typ is not T.PIPE:
                self.unexpected(tok, "operand")
            break
        if not args:
            self.errorf("empty command")
        return CommandNode(pos, tuple(args))

    def operand(self) -> Node | None:
        node = self.term()
        if node is None or self.peek().typ is not T.FIELD:
            return node
        fields: list[str] = []
        while self.peek().typ is T.FIELD:
            fields.append(self.next().val[1:])
        if isinstance(node, FieldNode):
            return FieldNode(node.pos, node.idents + tuple(fields))
        if isinstance(node, VariableNode):
            return VariableNode(node.pos, node.idents + tuple(fields))
        if isinstance(node, (BoolNode, StringNode, NumberNode, NilNode, DotNode)):
            self.errorf(f"unexpected . after term {go_quote(str(node))}")
        return ChainNode(node.pos, node, tuple(fields))

    def term(self) -> Node | None:
        tok = self.next_non_space()
        typ = tok.typ
        if typ is T.IDENT:
            if tok.val not in self.funcs:
                self.errorf(f"function {go_quote(tok.val)} not defined", tok.pos)
            return IdentifierNode(tok.pos, tok.val)
        if typ is T.DOT:
            return DotNode(tok.pos)
        if typ is T.NIL:
            return NilNode(tok.pos)
        if typ is T.VARIABLE:
            if tok.val not in self.vars:
                self.errorf(f"undefined variable {go_quote(tok.val)}", tok.pos)
            return VariableNode(tok.pos, (tok.val,))
        if typ is T.FIELD:
            return FieldNode(tok.pos, (tok.val[1:],))
        if typ is T.BOOL:
            return BoolNode(tok.pos, tok.val == "true")
        if typ in (T.CHAR_CONSTANT, T.COMPLEX, T.NUMBER):
            return self.number(tok)
        if typ is T.LEFT_PAREN:
            self.enter()
            pipe = self.pipeline("parenthesized pipeline", T.RIGHT_PAREN)
            self.depth -= 1
            return pipe
        if typ in (T.STRING, T.RAW_STRING):
            return StringNode(tok.pos, tok.val, self.unquote(tok))
        self.backup()
        return None

    def unquote(self, tok: Token) -> str:
        try:
            return go_unquote(tok.val)
        except ValueError as e:
            self.errorf(str(e), tok.pos)

    def number(self, tok: Token) -> NumberNode:
        """Go's newNumber: every reading of the constant (int, uint, float) that is valid."""
        text = tok.val
        if tok.typ is T.CHAR_CONSTANT:
            try:
                value, _, end = go_unquote_char(text, 1, "'")
            except ValueError as e:
                self.errorf(str(e), tok.pos)
            if text[end:] != "'":
                self.errorf(f"malformed character constant: {text}", tok.pos)
            return NumberNode(tok.pos, text, value, value, float(value))
        if tok.typ is T.COMPLEX or (text.endswith("i") and _parses_as_float(text[:-1])):
            # Go accepts complex constants; no alert template needs them, so refuse clearly.
            self.errorf(f"complex constants are not supported: {go_quote(text)}", tok.pos)
        uint_value = go_parse_int(text, unsigned=True)
        int_value = go_parse_int(text)
        if int_value == 0:
            uint_value = 0  # "-0" is a valid unsigned zero too
        float_value: float | None = None
        if int_value is not None:
            float_value = float(int_value)
        elif uint_value is not None:
            float_value = float(uint_value)
        else:
            try:
                float_value = go_parse_float(text)
            except ValueError:
                float_value = None
            if float_value is not None:
                if not any(ch in text for ch in ".eEpP"):
                    self.errorf(f"integer overflow: {go_quote(text)}", tok.pos)
                if float_value.is_integer() and -(2.0**63) <= float_value < 2.0**63:
                    int_value = int(float_value)
                if float_value.is_integer() and 0 <= float_value < 2.0**64:
                    uint_value = int(float_value)
        if int_value is None and uint_value is None and float_value is None:
            self.errorf(f"illegal number syntax: {go_quote(text)}", tok.pos)
        return NumberNode(tok.pos, text, int_value, uint_value, float_value)


def _parses_as_float(text: str) -> bool:
    try:
        go_parse_float(text)
    except ValueError:
        return False
    return True


def _is_empty(node: Node) -> bool:
    """parse.IsEmptyTree: only whitespace text (a define of nothing may be redefined)."""
    if isinstance(node, ListNode):
        return all(_is_empty(n) for n in node.nodes)
    return isinstance(node, TextNode) and not node.text.strip(" \t\r\n\v\f")


def parse_trees(text: str, name: str, funcs: Collection[str], predeclared: Sequence[str]) -> dict[str, ListNode]:
    """Parse `text` into its named trees: the template itself plus every define/block.

    `funcs` are the function names the template may call and `predeclared` the variables
    already in scope at its top level (Prometheus's $labels, $value, ...).
    """
    return _Parser(text, name, funcs, predeclared).parse()
