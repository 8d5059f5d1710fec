"""The chat template sandbox: real templates render as vLLM would; hostile ones stay in bounds."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from proxy.errors import InvalidRequest
from proxy.translate.template import MAX_LOOP_ITERATIONS, render_prompt

PAYLOADS = Path(__file__).parent / "payloads"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def refusal(template: str, messages: object = MESSAGES, **limits: Any) -> str:
    """The message of the InvalidRequest that rendering `template` raises."""
    with pytest.raises(InvalidRequest) as caught:
        render_prompt(template, messages, **limits)
    return caught.value.message


def hugging_face_render(template: str, messages: list[dict[str, Any]]) -> str:
    """What a plain Jinja sandbox set up as Hugging Face's (and so vLLM's) renders."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = lambda value, indent=None: json.dumps(
        value, ensure_ascii=False, indent=indent
    )

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages)


def test_chatml_template_renders_the_expected_prompt() -> None:
    """A ChatML template with tool calls and tool results renders the prompt a model expects."""
    body = json.loads((PAYLOADS / "oicm_chat_template_request.json").read_text())
    expected = (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "lookup", "arguments": '
        '"{\\"q\\": \\"France\\"}"}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"capital": "Paris"}\n</tool_response><|im_end|>\n'
        "<|im_start|>user\nJust the city, please.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert expected == render_prompt(body["chat_template"], body["messages"])


TEMPLATES = [
    (PAYLOADS / "oicm_chat_template_request.json").read_text(),
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m['content'] | trim }}\n{% endfor %}<|assistant|>",
    "{%- set ns = namespace(n=0) -%}{%- for m in messages if m.role != 'system' -%}"
    "{%- set ns.n = ns.n + 1 -%}{{ loop.index }}/{{ loop.length }} {{ m.content|upper }}"
    "{%- if loop.last %}!{% endif %}{%- endfor %} n={{ ns.n }}",
    "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{{ m.role }}"
    "{% break %}{% endfor %}{{ messages|selectattr('role', 'equalto', 'user')|map(attribute="
    "'content')|join(', ') }} {{ messages|tojson(indent=2) }} {{ (1, 2)|list }} {{ 'a' ~ 1 }}",
    "{% macro turn(m) %}[{{ m.role }}]{{ caller() if caller is defined }}{% endmacro %}"
    "{% for m in messages %}{% call turn(m) %}{{ m.content.strip().split()|length }}{% endcall %}"
    "{% endfor %}{{ {'k': 1}.items()|list }} {{ '%s-%d' % ('a', 1) }} {{ 'ab'.replace('a', 'x') }}",
]


@pytest.mark.parametrize("template", TEMPLATES[1:])
def test_sandbox_renders_what_hugging_face_settings_render(template: str) -> None:
    """Rewriting for the budget changes nothing a well-behaved template renders."""
    assert hugging_face_render(template, MESSAGES) == render_prompt(template, MESSAGES)


def test_chatml_fixture_matches_hugging_face_settings() -> None:
    """The recorded ChatML template renders the same in the sandbox and in a plain one."""
    body = json.loads(TEMPLATES[0])
    expected = hugging_face_render(body["chat_template"], body["messages"])
    assert expected == render_prompt(body["chat_template"], body["messages"])


INTERNALS = [
    ("{{ messages.__class__ }}", "access to attribute '__class__' of 'list' object is unsafe."),
    ("{{ ''.__class__.__mro__ }}", "access to attribute '__class__' of 'str' object is unsafe."),
    (
        "{{ ''.__class__.__base__.__subclasses__() }}",
        "access to attribute '__class__' of 'str' object is unsafe.",
    ),
    (
        "{{ cycler.__init__.__globals__ }}",
        "access to attribute '__init__' of 'type' object is unsafe.",
    ),
    (
        "{{ self.__init__.__globals__.os }}",
        "access to attribute '__init__' of 'TemplateReference' object is unsafe.",
    ),
    (
        "{{ messages|attr('__class__') }}",
        "access to attribute '__class__' of 'list' object is unsafe.",
    ),
    (
        "{{ '{0.__class__}'.format(messages) }}",
        "access to attribute 'format' of 'str' object is unsafe.",
    ),
    ("{{ messages.append(1) }}", "access to attribute 'append' of 'list' object is unsafe."),
    ("{{ 'x'.ljust(100) }}", "access to attribute 'ljust' of 'str' object is unsafe."),
]


@pytest.mark.parametrize(("template", "reason"), INTERNALS)
def test_reaching_for_python_internals_is_refused(template: str, reason: str) -> None:
    """`__class__`, `__globals__`, `__subclasses__`, `format` and mutation are 400s naming them."""
    assert f"chat_template: {reason} (line 1)" == refusal(template)


def test_a_loop_that_runs_too_long_is_stopped_by_the_deadline() -> None:
    """Nested loops of 10**10 iterations stop at the deadline, reported as such."""
    started = time.monotonic()
    assert "chat_template: rendering took longer than 0.05s (line 1)" == refusal(
        NESTED_LOOPS, timeout_s=0.05
    )
    assert time.monotonic() - started < 1.0


def test_loop_iterations_are_capped() -> None:
    """However long the deadline, all loops together stop after MAX_LOOP_ITERATIONS."""
    expected = f"chat_template: loops ran more than {MAX_LOOP_ITERATIONS} times (line 1)"
    assert expected == refusal(NESTED_LOOPS, timeout_s=60)


def test_a_huge_range_is_refused() -> None:
    """`range(10**9)` never starts: large integer arguments are refused."""
    expected = "chat_template: an integer argument over 100000 (line 1)"
    assert expected == refusal("{% for i in range(10**9) %}x{% endfor %}")


def test_output_over_max_chars_is_refused() -> None:
    """The prompt stops growing at max_chars."""
    template = "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}"
    expected = "chat_template: the prompt grew past 1000 characters"
    assert expected == refusal(template, max_chars=1000)


def test_output_at_max_chars_is_fine() -> None:
    """A prompt of exactly max_chars characters renders."""
    assert "x" * 1000 == render_prompt("{{ 'x' * 1000 }}", [], max_chars=1000)


BLOWUPS = [
    ("{{ 'x' * 10**7 }}", "a value would grow past 1000000 characters (line 1)"),
    ("{{ 2 ** 100000 }}", "a number grew past 4096 bits (line 1)"),
    ("{{ '%0999999d' % 1 }}", "a % format width or precision over 999 (line 1)"),
    (
        "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}",
        "a value grew past 1000000 characters (line 1)",
    ),
    (
        "{% set ns = namespace(s='x' * 1000) %}{% for i in range(40) %}"
        "{% set ns.s = [ns.s, ns.s] %}{% endfor %}",
        "a value grew past 1000000 characters (line 1)",
    ),
    ("{{ ''.join(['x' * 100000] * 100) }}", "a value would grow past 1000000 characters (line 1)"),
    (
        "{{ ([none] * 100000) | map('default', 'y' * 100000, true) | join }}",
        "a value would grow past 1000000 characters (line 1)",
    ),
    (
        "{{ ('x' * 100000).replace('', 'yyyyyyyyyy') }}",
        "a value would grow past 1000000 characters (line 1)",
    ),
    (
        "{% set y %}{% for i in range(5000) %}{{ 'x' * 1000 }}{% endfor %}{% endset %}",
        "the template wrote more than 4000000 characters (captured blocks and macro output "
        "included) (line 1)",
    ),
    (
        "{{ messages|tojson(indent=1000) }}",
        "tojson indent must be an integer from 0 to 16 (line 1)",
    ),
    ("{{ lipsum(1000) }}", "'lipsum' is undefined (line 1)"),
]


@pytest.mark.parametrize(("template", "reason"), BLOWUPS)
def test_values_that_would_blow_up_are_refused(template: str, reason: str) -> None:
    """Repetition, powers, widths, doubling, joins and captured output cannot exhaust memory."""
    assert f"chat_template: {reason}" == refusal(template)


# (template, what our message starts with, the line it names). Jinja's and Python's own words
# follow our prefix and are not checked; the class name and the line are ours.
ERRORS = [
    ("{% if %}", "chat_template: ", 1),
    ("line one\n{% for m in messages %}\n{% endif %}", "chat_template: ", 3),
    ("{{ messages|center(80) }}", "chat_template: ", 1),
    ("\n\n{{ add_generation_prompt }}", "chat_template: ", 3),
    ("{{ messages[0].name }}", "chat_template: ", 1),
    ("{{ 1 / 0 }}", "chat_template: ZeroDivisionError: ", 1),
    ("{{ raise_exception('roles must alternate') }}", "chat_template: roles must alternate", 1),
    ("{% include 'other.jinja' %}", "chat_template: TypeError: ", 1),
]


@pytest.mark.parametrize(("template", "prefix", "line"), ERRORS)
def test_template_errors_are_400s_with_their_line(template: str, prefix: str, line: int) -> None:
    """Syntax errors, unknown filters, undefined names and runtime errors are 400s that say
    they are the template's, name the line, and (for Python's errors) the error's class."""
    message = refusal(template)
    assert prefix == message[: len(prefix)]
    assert f" (line {line})" == message[-len(f" (line {line})") :]
    if prefix == "chat_template: ":
        assert message[len(prefix) : -len(f" (line {line})")].strip()  # Jinja says what is wrong


def test_raise_exception_carries_the_templates_own_words() -> None:
    """`raise_exception(text)` is a 400 whose message is exactly the template's text and line."""
    assert "chat_template: roles must alternate (line 1)" == refusal(
        "{{ raise_exception('roles must alternate') }}"
    )


def test_recursion_is_a_400() -> None:
    """A macro that calls itself forever is a 400, not a crash."""
    message = refusal("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}")
    assert message.startswith("chat_template: RecursionError: ")


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ({"role": "user"}, "messages: expected a list"),
        (None, "messages: expected a list"),
        ([{"role": "user", "content": "x"}, "hi"], "messages[1]: expected an object"),
    ],
)
def test_messages_must_be_a_list_of_objects(messages: object, message: str) -> None:
    """`messages` that is not a list of objects is refused before any rendering."""
    assert message == refusal("{{ messages }}", messages)


def test_template_must_be_a_short_string() -> None:
    """A template that is not a string, or is over 32 KiB, is refused before compiling."""
    assert "chat_template: expected a string" == refusal(42)  # type: ignore[arg-type]
    assert "chat_template: longer than 32768 characters" == refusal("x" * 32769)


def test_compiling_counts_in_the_time_budget() -> None:
    """The time budget starts before compiling: a template that takes longer than the budget
    to compile is refused even though rendering it would be instant."""
    unique = f"{time.monotonic_ns()}"  # never in the compile cache
    template = unique + "".join(f"{{% if messages[{i}] %}}{i}{{% endif %}}" for i in range(600))
    message = refusal(template, timeout_s=0.001)
    assert message.startswith("chat_template: compiling took longer than 0.001s")


def test_the_template_cannot_change_the_messages() -> None:
    """Rendering leaves the caller's messages as they were."""
    messages = [{"role": "user", "content": "x"}]
    refusal("{% set _ = messages[0].update({'content': 'y'}) %}", messages)
    assert [{"role": "user", "content": "x"}] == messages
