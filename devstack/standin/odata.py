"""A tiny OData ``$filter`` tokenizer and parser.

Grammar (``and`` binds tighter than ``or``; keywords are case-sensitive like OData's)::

    expr       := term ("or" term)*
    term       := factor ("and" factor)*
    factor     := "(" expr ")" | comparison
    comparison := IDENT "eq" literal
    literal    := STRING | GUID | NUMBER | "null" | "true" | "false"

A string literal is single-quoted; inside it ``''`` stands for one quote. Anything else is a
``FilterError`` carrying the 0-based offset where the offending token starts.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

_GUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_IDENT_CHAR = re.compile(r"[A-Za-z0-9_]")
_LITERAL_WORDS = {"null": None, "true": True, "false": False}


class FilterError(ValueError):
    """A syntax error, with Dataverse's message text."""

    def __init__(self, position: int, text: str) -> None:
        self.position = position
        self.text = text
        super().__init__(f"Syntax error at position {position} in '{text}'.")


@dataclass(frozen=True)
class Token:
    kind: str  # "(" ")" string guid number ident eof error
    value: object
    pos: int


@dataclass(frozen=True)
class Comparison:
    """``column eq value``; ``kind`` is string, guid, number, null or bool."""

    column: str
    value: object
    kind: str
    pos: int


@dataclass(frozen=True)
class BoolOp:
    op: str  # "and" | "or"
    items: tuple[Node, ...]


Node = Comparison | BoolOp


def tokenize(text: str) -> list[Token]:
    """Split ``text`` into tokens, ending with "eof", or with "error" at an unterminated string or a stray
    character (so the parser reports whichever problem comes first)."""
    tokens: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch in "()":
            tokens.append(Token(ch, ch, i))
            i += 1
        elif ch == "'":
            start, i, buf = i, i + 1, []
            while True:
                if i >= n:
                    return [*tokens, Token("error", None, start)]
                if text[i] == "'":
                    if i + 1 < n and text[i + 1] == "'":
                        buf.append("'")
                        i += 2
                        continue
                    i += 1
                    break
                buf.append(text[i])
                i += 1
            tokens.append(Token("string", "".join(buf), start))
        else:
            for kind, pattern in (("guid", _GUID), ("number", _NUMBER), ("ident", _IDENT)):
                m = pattern.match(text, i)
                if m:
                    end = m.end()
                    if kind != "ident" and end < n and _IDENT_CHAR.match(text[end]):
                        continue
                    tokens.append(Token(kind, _convert(kind, m.group()), i))
                    i = end
                    break
            else:
                return [*tokens, Token("error", None, i)]
    tokens.append(Token("eof", None, n))
    return tokens


def _convert(kind: str, raw: str) -> object:
    if kind == "guid":
        return raw.lower()
    if kind == "number":
        return int(raw) if re.fullmatch(r"-?\d+", raw) else float(raw)
    return raw


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.i = 0

    def peek(self) -> Token:
        return self.tokens[self.i]

    def take(self) -> Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def fail(self, tok: Token) -> FilterError:
        return FilterError(tok.pos, self.text)

    def is_word(self, word: str) -> bool:
        tok = self.peek()
        return tok.kind == "ident" and tok.value == word

    def expr(self) -> Node:
        items = [self.term()]
        while self.is_word("or"):
            self.take()
            items.append(self.term())
        return items[0] if len(items) == 1 else BoolOp("or", tuple(items))

    def term(self) -> Node:
        items = [self.factor()]
        while self.is_word("and"):
            self.take()
            items.append(self.factor())
        return items[0] if len(items) == 1 else BoolOp("and", tuple(items))

    def factor(self) -> Node:
        tok = self.take()
        if tok.kind == "(":
            node = self.expr()
            close = self.take()
            if close.kind != ")":
                raise self.fail(close)
            return node
        if tok.kind != "ident" or tok.value in ("and", "or", "eq") or tok.value in _LITERAL_WORDS:
            raise self.fail(tok)
        op = self.take()
        if op.kind != "ident" or op.value != "eq":
            raise self.fail(op)  # also catches unknown functions: ident followed by "("
        lit = self.take()
        if lit.kind in ("string", "guid", "number"):
            return Comparison(str(tok.value), lit.value, lit.kind, tok.pos)
        if lit.kind == "ident" and lit.value in _LITERAL_WORDS:
            value = _LITERAL_WORDS[str(lit.value)]
            return Comparison(str(tok.value), value, "null" if value is None else "bool", tok.pos)
        raise self.fail(lit)


def parse_filter(text: str) -> Node:
    """Parse a ``$filter`` value; raises FilterError."""
    parser = _Parser(text)
    if parser.peek().kind == "eof":
        raise parser.fail(parser.peek())
    node = parser.expr()
    if parser.peek().kind != "eof":
        raise parser.fail(parser.peek())
    return node


def comparisons(node: Node) -> list[Comparison]:
    """All comparisons in source order."""
    if isinstance(node, Comparison):
        return [node]
    return [c for item in node.items for c in comparisons(item)]


def evaluate(node: Node, test: Callable[[Comparison], bool]) -> bool:
    """Evaluate the tree, deciding each comparison with ``test``."""
    if isinstance(node, Comparison):
        return test(node)
    results = (evaluate(item, test) for item in node.items)
    return all(results) if node.op == "and" else any(results)
