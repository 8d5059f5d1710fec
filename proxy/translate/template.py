"""Render a client's Jinja chat template in a sandbox whose work, size and time are bounded.

The template sees one variable, `messages`. Jinja's `ImmutableSandboxedEnvironment` refuses
attribute access to Python internals; on top of it each render gets a budget: a deadline, a cap on
loop iterations, on the size of every value the template builds and on all the text it writes
(captured blocks and macro output included). Before compiling, the parsed template is rewritten so
that its loops, its output, `~` and its literals go through that budget; calls, filters and the
operators that can multiply sizes (`*`, `**`, `%`, `+`) are checked by the environment itself.
This bounds a hostile template without a subprocess; it is defence in depth, not a proof.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from types import CodeType
from typing import Any, NoReturn, cast

from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, nodes
from jinja2.ext import Extension
from jinja2.runtime import Context, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer

from proxy.errors import InvalidRequest

MAX_TEMPLATE_CHARS = 32 * 1024  # compiling is Python work in proportion (about 20 ms a KiB)
MAX_LOOP_ITERATIONS = 1_000_000  # all loops of one render together
MAX_INT_ARGUMENT = 100_000  # a larger integer passed to a function or filter is refused
_MAX_INT_BITS = 4096  # integers the template computes stay below 2**4096
_WRITTEN_FACTOR = 4  # all text written, captured or not, stays below this many times max_chars
_FILTER_NAMES = (
    "abs attr batch capitalize count d default dictsort e escape first float groupby int items "
    "join last length list lower map max min reject rejectattr replace reverse round safe select "
    "selectattr slice sort string sum title tojson trim truncate unique upper wordcount"
)
_STR_METHOD_NAMES = (
    "capitalize count endswith find isalnum isalpha isdigit islower isspace isupper join lower "
    "lstrip removeprefix removesuffix replace rfind rsplit rstrip split splitlines startswith "
    "strip title upper"
)
_FILTERS = frozenset(_FILTER_NAMES.split())
_STR_METHODS = frozenset(_STR_METHOD_NAMES.split())
_METHODS: tuple[tuple[type | tuple[type, ...], frozenset[str]], ...] = (
    (str, _STR_METHODS),
    (dict, frozenset({"get", "items", "keys", "values"})),
    ((list, tuple), frozenset({"count", "index"})),
    ((int, float), frozenset()),
)
_PERCENT_FIELD = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
# What a template may raise while it runs: Jinja's own errors and those of the Python operations
# it performs (1/0, int('x'), a recursive macro). MemoryError and the like are not the client's.
_RENDER_ERRORS = (
    TemplateError,
    ArithmeticError,
    LookupError,
    TypeError,
    ValueError,
    AttributeError,
    RecursionError,
)


class _Refused(Exception):
    """The render went past one of its bounds; the message says which."""


def render_prompt(
    template: str, messages: object, *, max_chars: int = 1_000_000, timeout_s: float = 1.0
) -> str:
    """The text `template` renders for `messages`, or `InvalidRequest` naming the problem.

    `timeout_s` counts from the call, compiling included (a compile cannot be interrupted:
    its size bound, MAX_TEMPLATE_CHARS, is what bounds it; the caller keeps it off the loop).
    """
    started = time.monotonic()
    if not isinstance(template, str):
        raise InvalidRequest("chat_template: expected a string")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise InvalidRequest(f"chat_template: longer than {MAX_TEMPLATE_CHARS} characters")
    if not isinstance(messages, list):
        raise InvalidRequest("messages: expected a list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages[{i}]: expected an object")
    try:
        code = _compile(template)
    except TemplateSyntaxError as exc:
        raise InvalidRequest(f"chat_template: {exc.message} (line {exc.lineno})") from None
    except (RecursionError, SyntaxError):  # SyntaxError: Python's, on absurdly nested input
        raise InvalidRequest("chat_template: nested too deeply") from None
    if time.monotonic() - started > timeout_s:
        raise InvalidRequest(f"chat_template: compiling took longer than {timeout_s:g}s")
    env = _Sandbox(max_chars=max_chars, timeout_s=timeout_s, started=started)
    compiled = env.template_class.from_code(env, code, env.make_globals(None))
    pieces: list[str] = []
    size = 0
    try:
        for piece in compiled.generate(messages=messages):
            size += len(piece)
            if size > max_chars:
                raise _Refused(f"the prompt grew past {max_chars} characters")
            env.budget.tick()
            pieces.append(piece)
    except (_Refused, *_RENDER_ERRORS) as exc:
        raise InvalidRequest(f"chat_template: {_describe(exc)}{_line(exc)}") from None
    return "".join(pieces)


# Memoised because compiling costs milliseconds where rendering costs microseconds, and clients
# send the same template with every request. It maps text to immutable code: nothing else is kept.
@functools.lru_cache(maxsize=64)
def _compile(template: str) -> CodeType:
    """The template's Python code, rewritten so that it runs within the render's budget."""
    env = _Sandbox(max_chars=0, timeout_s=0.0, started=0.0)
    return env.compile(_Rewrite().visit(env.parse(template)).set_environment(env))


class _Budget(Extension):
    """One render's bounds; the rewritten template reaches these methods as extension attributes."""

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.max_chars, self.timeout_s, self.deadline = 0, 0.0, 0.0
        self.iterations = self.written = 0

    def start(self, max_chars: int, timeout_s: float, started: float) -> None:
        self.max_chars, self.timeout_s = max_chars, timeout_s
        self.deadline = started + timeout_s

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _Refused(f"rendering took longer than {self.timeout_s:g}s")

    def check(self, value: Any) -> Any:
        if _weight(value, self.max_chars) > self.max_chars:
            raise _Refused(f"a value grew past {self.max_chars} characters")
        return value

    def loop(self, iterable: Iterable[Any]) -> Iterator[Any]:
        for item in iterable:
            self.iterations += 1
            if self.iterations > MAX_LOOP_ITERATIONS:
                raise _Refused(f"loops ran more than {MAX_LOOP_ITERATIONS} times")
            self.tick()
            yield item

    def out(self, value: Any) -> str:
        self.tick()
        text = str(self.check(value))
        self.written += len(text)
        if self.written > _WRITTEN_FACTOR * self.max_chars:
            raise _Refused(
                f"the template wrote more than {_WRITTEN_FACTOR * self.max_chars} "
                "characters (captured blocks and macro output included)"
            )
        return text

    def concat(self, *parts: Any) -> str:
        if sum(_weight(part, self.max_chars) for part in parts) > self.max_chars:
            raise _Refused(f"a value grew past {self.max_chars} characters")
        return "".join(str(part) for part in parts)

    def presize(self, size: int) -> None:
        if size > self.max_chars:
            raise _Refused(f"a value would grow past {self.max_chars} characters")


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with a method and filter allow-list and size-checked operators."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self, *, max_chars: int, timeout_s: float, started: float) -> None:
        # The settings and helpers of Hugging Face chat templates, as vLLM renders them.
        super().__init__(
            undefined=StrictUndefined,
            autoescape=False,
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_Budget, "jinja2.ext.loopcontrols"],
        )
        self.budget = cast(_Budget, self.extensions[_Budget.identifier])
        self.budget.start(max_chars, timeout_s, started)
        del self.globals["lipsum"]  # it writes paragraphs by the thousand in one call
        self.globals["raise_exception"] = _raise_exception
        filters = {name: f for name, f in self.filters.items() if name in _FILTERS}
        filters["tojson"] = _tojson
        self.filters = {name: self._guard(name, f) for name, f in filters.items()}

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if not super().is_safe_attribute(obj, attr, value):
            return False
        for kinds, allowed in _METHODS:
            if isinstance(obj, kinds):
                return attr in allowed
        return True

    def wrap_str_format(self, value: Any) -> None:
        """No `str.format`: widths like `{:>99999999}` build huge strings in one call."""
        return None

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        owner = getattr(obj, "__self__", None)
        if owner is self.budget:
            return super().call(context, obj, *args, **kwargs)
        self.budget.tick()
        _check_ints(args, kwargs)
        name = getattr(obj, "__name__", "")
        if isinstance(owner, str) and name == "join" and args:
            args = (self._presize_join(owner, args[0]), *args[1:])
        elif isinstance(owner, str) and name == "replace" and len(args) >= 2:
            self._presize_replace(owner, args[0], args[1])
        return self.budget.check(super().call(context, obj, *args, **kwargs))

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        self.budget.tick()
        if operator == "**" and _is_int(left) and _is_int(right) and right > 0:
            if right * max(abs(left).bit_length(), 1) > _MAX_INT_BITS:
                raise _Refused(f"a number grew past {_MAX_INT_BITS} bits")
        elif operator == "*" and _is_int(left) and _is_int(right):
            if abs(left).bit_length() + abs(right).bit_length() > _MAX_INT_BITS:
                raise _Refused(f"a number grew past {_MAX_INT_BITS} bits")
        elif operator == "*" and (_is_int(left) or _is_int(right)):
            times, sequence = (left, right) if _is_int(left) else (right, left)
            self.budget.presize(max(times, 0) * _weight(sequence, self.budget.max_chars))
        elif operator == "%" and isinstance(left, str):
            for field in _PERCENT_FIELD.finditer(left):
                if any(g == "*" or (g and len(g) > 3) for g in field.groups()):
                    raise _Refused("a % format width or precision over 999")
        return self.budget.check(super().call_binop(context, operator, left, right))

    def _guard(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        budget = self.budget

        @functools.wraps(func)  # keeps Jinja's pass_context/pass_eval_context marker
        def guarded(*args: Any, **kwargs: Any) -> Any:
            budget.tick()
            _check_ints(args, kwargs)
            if name == "join" and len(args) >= 2:  # (eval_ctx, value, d="", attribute=None)
                separator = args[2] if len(args) >= 3 else kwargs.get("d", "")
                args = (args[0], self._presize_join(str(separator), args[1]), *args[2:])
            elif name == "replace" and len(args) >= 4:  # (eval_ctx, s, old, new, count=None)
                self._presize_replace(str(args[1]), args[2], args[3])
            return budget.check(func(*args, **kwargs))

        return guarded

    def _presize_join(self, separator: str, items: Iterable[Any]) -> list[Any]:
        listed = list(items)
        limit = self.budget.max_chars
        self.budget.presize(_weight(listed, limit) + len(separator) * len(listed))
        return listed

    def _presize_replace(self, text: str, old: object, new: object) -> None:
        old_text, new_text = str(old), str(new)
        count = text.count(old_text) if old_text else len(text) + 1
        self.budget.presize(len(text) + count * max(len(new_text) - len(old_text), 0))


class _Rewrite(NodeTransformer):
    """Routes a parsed template's loops, output, `~` and literals through the render's budget."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = _budget_call("loop", [node.iter], node)
        return node

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        self.generic_visit(node)
        node.nodes = [
            _budget_call(
                "out", [nodes.Const(c.data) if isinstance(c, nodes.TemplateData) else c], c
            )
            for c in node.nodes
        ]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return _budget_call("concat", node.nodes, node)

    def visit_List(self, node: nodes.List) -> nodes.Node:
        return _budget_call("check", [self.generic_visit(node)], node)

    def visit_Dict(self, node: nodes.Dict) -> nodes.Node:
        return _budget_call("check", [self.generic_visit(node)], node)

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
        self.generic_visit(node)
        return node if node.ctx != "load" else _budget_call("check", [node], node)


def _budget_call(method: str, args: list[Any], like: nodes.Node) -> nodes.Call:
    callee = nodes.ExtensionAttribute(_Budget.identifier, method, lineno=like.lineno)
    return nodes.Call(callee, args, [], None, None, lineno=like.lineno)


def _weight(value: object, limit: int) -> int:
    """About how many characters `value` prints as, shared parts counted each time they appear.

    Counting stops soon after `limit`, so the cost is bounded whatever the value.
    """
    total, stack = 0, [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, int):
            total += 1 + item.bit_length() // 3
        elif isinstance(item, Namespace):
            stack.append(object.__getattribute__(item, "_Namespace__attrs"))
        elif isinstance(item, Undefined | range) or not isinstance(item, Collection):
            total += 1  # numbers, None, ranges, macros, generators: short when printed
        else:
            total += 1 + len(item)
            if total <= limit:
                stack.extend(item.items() if isinstance(item, Mapping) else item)
    return total


def _tojson(
    value: Any,
    indent: int | None = None,
    ensure_ascii: bool = False,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """JSON as Hugging Face templates expect it: not HTML-escaped, non-ASCII kept."""
    if indent is not None and not (_is_int(indent) and 0 <= indent <= 16):
        raise _Refused("tojson indent must be an integer from 0 to 16")
    if separators is not None and sum(len(str(s)) for s in separators) > 16:
        raise _Refused("tojson separators must be short")
    return json.dumps(
        value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> NoReturn:
    """What a template calls to refuse its input (Hugging Face templates do)."""
    raise TemplateError(message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_ints(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    for value in (*args, *kwargs.values()):
        if _is_int(value) and abs(value) > MAX_INT_ARGUMENT:
            raise _Refused(f"an integer argument over {MAX_INT_ARGUMENT}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TemplateError) and exc.message:
        return exc.message
    if isinstance(exc, _Refused):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _line(exc: BaseException) -> str:
    """` (line N)` for the template line the error came from, when the traceback tells."""
    line, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return "" if line is None else f" (line {line})"
