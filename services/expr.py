"""The expression language of derived points, alert rules and saga `wait` conditions.

A tokenizer and a Pratt parser, written out: no `eval`, no `ast`, no attribute access, no
subscripts, no strings, no loops. Names are the inputs a rule declares; the only calls are
`min max abs round clamp if`. An expression is parsed once (at config load) into a tree of
closures; evaluating it cannot run for long (powers are bounded and computed in floats) and
any arithmetic failure (division by zero, overflow, a non-number input) makes the result
missing (`EvalError`), never wrong.

    expr    := cond
    cond    := or ("if" or "else" cond)?        # x if c else y; also if(c, x, y)
    or      := and ("or" and)*
    and     := not ("and" not)*
    not     := "not" not | cmp
    cmp     := sum (("<"|"<="|">"|">="|"=="|"!=") sum)*      # chained like Python
    sum     := term (("+"|"-") term)*
    term    := unary (("*"|"/"|"%") unary)*
    unary   := "-" unary | "+" unary | power
    power   := atom ("**" unary)?
    atom    := number | name | "true" | "false" | name "(" args ")" | "(" expr ")"
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final

MAX_LENGTH: Final = 2000  # characters in one expression
MAX_DEPTH: Final = 60  # nesting (parentheses, operators): bounds the parser's recursion
MAX_EXPONENT: Final = 1000.0  # |b| in a ** b (the result is a float: overflow -> missing)
FUNCTIONS: Final = ("min", "max", "abs", "round", "clamp", "if")
KEYWORDS: Final = frozenset({"and", "or", "not", "if", "else", "true", "false"})

Value = float | int | bool
Env = Mapping[str, Any]
Node = Callable[[Env], Value]


class ExprSyntaxError(ValueError):
    """The expression cannot be parsed; `column` is 1-based."""

    def __init__(self, message: str, column: int) -> None:
        super().__init__(f"column {column}: {message}")
        self.message = message
        self.column = column


class EvalError(ArithmeticError):
    """Evaluation failed (division by zero, overflow, a missing or non-number input)."""


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str  # "num", "name", "op", "end"
    text: str
    col: int
    value: float | int = 0


_OPS2 = ("**", "<=", ">=", "==", "!=")
_OPS1 = "+-*/%<>(),"


def tokenize(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        col = i + 1
        if c in " \t\r\n":
            i += 1
            continue
        if c.isdigit() or (c == "." and i + 1 < n and text[i + 1].isdigit()):
            j = i
            while j < n and text[j].isdigit():
                j += 1
            is_float = False
            if j < n and text[j] == ".":
                is_float = True
                j += 1
                while j < n and text[j].isdigit():
                    j += 1
            if j < n and text[j] in "eE":
                k = j + 1
                if k < n and text[k] in "+-":
                    k += 1
                if k < n and text[k].isdigit():
                    is_float = True
                    j = k
                    while j < n and text[j].isdigit():
                        j += 1
            lit = text[i:j]
            if j - i > 40:
                raise ExprSyntaxError(f"number {lit[:20]}... is too long", col)
            if j < n and (text[j].isalpha() or text[j] == "_" or text[j] == "."):
                raise ExprSyntaxError(f"unexpected {text[j]!r} after the number {lit}", j + 1)
            value: float | int = float(lit) if is_float else int(lit)
            if isinstance(value, float) and not math.isfinite(value):
                raise ExprSyntaxError(f"number {lit} is out of range", col)
            out.append(_Tok("num", lit, col, value))
            i = j
            continue
        if c.isascii() and (c.isalpha() or c == "_"):
            j = i
            while j < n and text[j].isascii() and (text[j].isalnum() or text[j] == "_"):
                j += 1
            name = text[i:j]
            if j < n and text[j] == ".":
                raise ExprSyntaxError(f"attribute access ({name}.) is not allowed", j + 1)
            out.append(_Tok("name", name, col))
            i = j
            continue
        two = text[i : i + 2]
        if two in _OPS2:
            out.append(_Tok("op", two, col))
            i += 2
            continue
        if c in _OPS1:
            out.append(_Tok("op", c, col))
            i += 1
            continue
        if c == ".":
            raise ExprSyntaxError("attribute access ('.') is not allowed", col)
        if c in "[]{}":
            raise ExprSyntaxError(f"{c!r}: subscripts and literals are not allowed", col)
        if c in "'\"":
            raise ExprSyntaxError("strings are not allowed", col)
        if c == "=":
            raise ExprSyntaxError("'=' is not an operator (compare with '==')", col)
        raise ExprSyntaxError(f"unexpected character {c!r}", col)
    out.append(_Tok("end", "", n + 1))
    return out


# -- evaluation helpers (closures call these; each raises EvalError on bad input) ---------


def _num(v: Any) -> float | int:
    if type(v) is float or type(v) is int:
        return v
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int | float):
        return v
    raise EvalError(f"not a number: {v!r}")


def _finite(v: float | int) -> float | int:
    if type(v) is float and not math.isfinite(v):
        raise EvalError("result is not a finite number")
    return v


def _div(a: Any, b: Any) -> float:
    x, y = _num(a), _num(b)
    if y == 0:
        raise EvalError("division by zero")
    return _finite(x / y)


def _mod(a: Any, b: Any) -> float | int:
    x, y = _num(a), _num(b)
    if y == 0:
        raise EvalError("modulo by zero")
    return x % y


def _pow(a: Any, b: Any) -> float:
    x, y = float(_num(a)), float(_num(b))
    if abs(y) > MAX_EXPONENT:
        raise EvalError(f"exponent {y:g} is too large")
    try:
        return _finite(math.pow(x, y))
    except (OverflowError, ValueError, ZeroDivisionError) as exc:
        raise EvalError(f"{x:g} ** {y:g}: {exc}") from None


def _round(args: list[Any]) -> float | int:
    x = _num(args[0])
    if len(args) == 1:
        return round(x)
    nd = _num(args[1])
    if nd != int(nd) or not 0 <= nd <= 15:
        raise EvalError("round(x, n): n must be a whole number from 0 to 15")
    return round(x, int(nd))


def _clamp(args: list[Any]) -> float | int:
    x, lo, hi = (_num(a) for a in args)
    return min(max(x, lo), hi)


_ARITY: Final = {"min": (1, 16), "max": (1, 16), "abs": (1, 1), "round": (1, 2),
                 "clamp": (3, 3), "if": (3, 3)}  # fmt: skip

_BINARY: dict[str, Callable[[Any, Any], Value]] = {
    "+": lambda a, b: _finite(_num(a) + _num(b)),
    "-": lambda a, b: _finite(_num(a) - _num(b)),
    "*": lambda a, b: _finite(_num(a) * _num(b)),
    "/": _div,
    "%": _mod,
    "**": _pow,
}

_CMP: dict[str, Callable[[Any, Any], bool]] = {
    "<": lambda a, b: _num(a) < _num(b),
    "<=": lambda a, b: _num(a) <= _num(b),
    ">": lambda a, b: _num(a) > _num(b),
    ">=": lambda a, b: _num(a) >= _num(b),
    "==": lambda a, b: _num(a) == _num(b),
    "!=": lambda a, b: _num(a) != _num(b),
}


def _truth(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    return _num(v) != 0


class _Parser:
    def __init__(self, text: str, names: Collection[str] | None) -> None:
        self.toks = tokenize(text)
        self.pos = 0
        self.names = names
        self.used: set[str] = set()
        self.depth = 0

    @property
    def tok(self) -> _Tok:
        return self.toks[self.pos]

    def take(self) -> _Tok:
        t = self.toks[self.pos]
        self.pos += 1
        return t

    def at_op(self, *ops: str) -> bool:
        return self.tok.kind == "op" and self.tok.text in ops

    def at_kw(self, kw: str) -> bool:
        return self.tok.kind == "name" and self.tok.text == kw

    def expect(self, op: str) -> _Tok:
        if not self.at_op(op):
            raise ExprSyntaxError(f"expected {op!r}, got {self._show(self.tok)}", self.tok.col)
        return self.take()

    @staticmethod
    def _show(t: _Tok) -> str:
        return "end of expression" if t.kind == "end" else repr(t.text)

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ExprSyntaxError(f"nested more than {MAX_DEPTH} deep", self.tok.col)

    # -- grammar ------------------------------------------------------------------------
    def parse(self) -> Node:
        if self.tok.kind == "end":
            raise ExprSyntaxError("empty expression", 1)
        node = self.cond()
        if self.tok.kind != "end":
            raise ExprSyntaxError(f"unexpected {self._show(self.tok)}", self.tok.col)
        return node

    def cond(self) -> Node:
        self.enter()
        then = self.or_()
        if self.at_kw("if"):
            self.take()
            test = self.or_()
            if not self.at_kw("else"):
                raise ExprSyntaxError(f"expected 'else', got {self._show(self.tok)}", self.tok.col)
            self.take()
            other = self.cond()
            self.depth -= 1
            return lambda env: then(env) if _truth(test(env)) else other(env)
        self.depth -= 1
        return then

    def or_(self) -> Node:
        left = self.and_()
        while self.at_kw("or"):
            self.take()
            right = self.and_()
            left = (lambda a, b: lambda env: _truth(a(env)) or _truth(b(env)))(left, right)
        return left

    def and_(self) -> Node:
        left = self.not_()
        while self.at_kw("and"):
            self.take()
            right = self.not_()
            left = (lambda a, b: lambda env: _truth(a(env)) and _truth(b(env)))(left, right)
        return left

    def not_(self) -> Node:
        if self.at_kw("not"):
            self.take()
            self.enter()
            inner = self.not_()
            self.depth -= 1
            return lambda env: not _truth(inner(env))
        return self.cmp()

    def cmp(self) -> Node:
        first = self.sum()
        parts: list[tuple[Callable[[Any, Any], bool], Node]] = []
        while self.at_op("<", "<=", ">", ">=", "==", "!="):
            op = self.take().text
            parts.append((_CMP[op], self.sum()))
        if not parts:
            return first

        def chain(env: Env) -> bool:
            left = first(env)
            for fn, node in parts:
                right = node(env)
                if not fn(left, right):
                    return False
                left = right
            return True

        return chain

    def sum(self) -> Node:
        left = self.term()
        while self.at_op("+", "-"):
            fn = _BINARY[self.take().text]
            right = self.term()
            left = (lambda f, a, b: lambda env: f(a(env), b(env)))(fn, left, right)
        return left

    def term(self) -> Node:
        left = self.unary()
        while self.at_op("*", "/", "%"):
            fn = _BINARY[self.take().text]
            right = self.unary()
            left = (lambda f, a, b: lambda env: f(a(env), b(env)))(fn, left, right)
        return left

    def unary(self) -> Node:
        if self.at_op("-", "+"):
            neg = self.take().text == "-"
            self.enter()
            inner = self.unary()
            self.depth -= 1
            if neg:
                return lambda env: -_num(inner(env))
            return lambda env: _num(inner(env))
        return self.power()

    def power(self) -> Node:
        base = self.atom()
        if self.at_op("**"):
            self.take()
            self.enter()
            exp_start = self.tok
            exp = self.unary()
            self.depth -= 1
            # A constant exponent is judged now: `9 ** 999999` is refused at load.
            try:
                constant = float(_num(exp({})))
            except (EvalError, ArithmeticError, TypeError, ValueError):
                constant = None
            if constant is not None and abs(constant) > MAX_EXPONENT:
                raise ExprSyntaxError(
                    f"exponent {constant:g} is too large (at most {MAX_EXPONENT:g})",
                    exp_start.col,
                )
            return lambda env: _pow(base(env), exp(env))
        return base

    def atom(self) -> Node:
        t = self.tok
        if t.kind == "num":
            self.take()
            v = t.value
            return lambda env: v
        if t.kind == "op" and t.text == "(":
            self.take()
            self.enter()
            inner = self.cond()
            self.depth -= 1
            self.expect(")")
            return inner
        if t.kind == "name":
            self.take()
            if self.at_op("("):
                return self.call(t)
            if t.text == "true":
                return lambda env: True
            if t.text == "false":
                return lambda env: False
            if t.text in KEYWORDS:
                raise ExprSyntaxError(f"unexpected {t.text!r}", t.col)
            if t.text in FUNCTIONS:
                raise ExprSyntaxError(f"{t.text} is a function: call it as {t.text}(...)", t.col)
            if self.names is not None and t.text not in self.names:
                known = ", ".join(sorted(self.names)) or "none declared"
                raise ExprSyntaxError(f"unknown name {t.text!r} (inputs: {known})", t.col)
            self.used.add(t.text)
            name = t.text

            def lookup(env: Env) -> Value:
                try:
                    v = env[name]
                except KeyError:
                    raise EvalError(f"{name} has no value") from None
                if v is None:
                    raise EvalError(f"{name} has no value")
                return v  # type: ignore[no-any-return]

            return lookup
        raise ExprSyntaxError(f"unexpected {self._show(t)}", t.col)

    def call(self, fname: _Tok) -> Node:
        if fname.text not in FUNCTIONS:
            raise ExprSyntaxError(
                f"unknown function {fname.text!r} (functions: {', '.join(FUNCTIONS)})", fname.col
            )
        self.expect("(")
        self.enter()
        args: list[Node] = []
        if not self.at_op(")"):
            args.append(self.cond())
            while self.at_op(","):
                self.take()
                args.append(self.cond())
        self.expect(")")
        self.depth -= 1
        lo, hi = _ARITY[fname.text]
        if not lo <= len(args) <= hi:
            want = str(lo) if lo == hi else f"{lo} to {hi}"
            raise ExprSyntaxError(
                f"{fname.text}() takes {want} arguments, got {len(args)}", fname.col
            )
        f = fname.text
        if f == "if":
            c, a, b = args
            return lambda env: a(env) if _truth(c(env)) else b(env)
        if f == "min":
            return lambda env: min(_num(a(env)) for a in args)
        if f == "max":
            return lambda env: max(_num(a(env)) for a in args)
        if f == "abs":
            (x,) = args
            return lambda env: abs(_num(x(env)))
        if f == "round":
            return lambda env: _round([a(env) for a in args])
        return lambda env: _clamp([a(env) for a in args])


class Expr:
    """A parsed expression. `names`: the inputs it uses; `evaluate(env)` -> value, or raises
    EvalError (the caller reports the result as missing)."""

    __slots__ = ("_node", "names", "text")

    def __init__(self, text: str, names: Collection[str] | None = None) -> None:
        if len(text) > MAX_LENGTH:
            raise ExprSyntaxError(f"longer than {MAX_LENGTH} characters", MAX_LENGTH + 1)
        p = _Parser(text, names)
        self._node = p.parse()
        self.names = frozenset(p.used)
        self.text = text

    def evaluate(self, env: Env) -> Value:
        try:
            return self._node(env)
        except EvalError:
            raise
        except (ArithmeticError, TypeError, ValueError, RecursionError) as exc:
            raise EvalError(str(exc)) from None

    def __repr__(self) -> str:
        return f"Expr({self.text!r})"


def compile_expr(text: str, names: Collection[str] | None = None) -> Expr:
    """Parse `text`; names outside `names` (when given) are errors. Raises ExprSyntaxError."""
    return Expr(text, names)
