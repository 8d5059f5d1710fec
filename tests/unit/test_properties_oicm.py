"""Properties of OICM's translators (TGI payloads, chat templates) and the MLflow listing's page
token: any value gives a request, a prompt or a page, or an `InvalidRequest`."""

from __future__ import annotations

import base64

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import InvalidRequest
from proxy.routes.mlflow import page
from proxy.translate.oicm import chat_template_to_completion_request, tgi_to_chat_request
from proxy.translate.template import render_prompt
from tests.unit.test_properties_json import FAST, JSON, OBJECT, TEXT, mutated, shaped

PARAMETERS = {
    "max_new_tokens": st.integers(-1, 512),
    "do_sample": st.booleans(),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1),
    "stop": TEXT | st.lists(TEXT, max_size=2),
    "seed": st.integers(0, 2**32),
    "frequency_penalty": st.floats(-2, 2),
    "stream": st.booleans(),
    "top_k": st.integers(0, 50),
    "details": st.booleans(),
}
TGI = mutated(shaped({"inputs": TEXT}, parameters=shaped({}, **PARAMETERS), **PARAMETERS))


@FAST
@given(TGI | JSON)
def test_tgi_payloads_give_a_chat_request_or_invalid_request(body: object) -> None:
    """Any TGI-shaped payload or JSON value is a sendable chat request or a 400."""
    try:
        chat = tgi_to_chat_request(body, upstream_model="up")
    except InvalidRequest as err:
        assert err.message
        return
    assert "up" == chat["model"]
    orjson.dumps(chat)


# --- chat templates ------------------------------------------------------------------------

TEMPLATES = st.sampled_from(
    [
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}",
        "{{ messages|length }}",
        "{{ messages[0]['content'] }}",
        "{% for m in messages %}{{ m['content']|upper }}{% endfor %}",
        "{{ messages|tojson }}",
        "{{ messages|map(attribute='role')|join(',') }}",
        "{% if messages[0].role == 'system' %}{{ raise_exception('no system') }}{% endif %}",
    ]
)
TOKENS = st.sampled_from(
    [
        "{{", "}}", "{%", "%}", "{#", "#}", " for m in messages ", " endfor ", " if ", " endif ",
        " m ", "messages", ".content", "[0]", "|join", "|tojson", "|length", "(", ")", "'x'",
        " * ", " ~ ", " + ", "9", "loop.index", " set x = ", " macro f() ", " endmacro ",
        "f()", "raise_exception('e')", "range(", "text",
    ]
)  # fmt: skip
TEMPLATE_TEXT = st.lists(TOKENS, max_size=12).map("".join)
MESSAGES = st.lists(
    mutated(shaped({"role": st.sampled_from(["user", "system"]), "content": TEXT})), max_size=3
)
SLOW = settings(FAST, max_examples=60)


@SLOW
@given(TEMPLATES | TEMPLATE_TEXT | st.text(max_size=20), MESSAGES | JSON)
def test_any_template_and_messages_give_a_prompt_or_invalid_request(
    template: str, messages: object
) -> None:
    """Any template text and messages value renders to a string or is a 400."""
    try:
        prompt = render_prompt(template, messages, timeout_s=5.0)
    except InvalidRequest as err:
        assert err.message
        return
    assert isinstance(prompt, str)


CHAT_TEMPLATE_BODY = mutated(
    shaped(
        {"chat_template": TEMPLATES, "messages": MESSAGES},
        max_tokens=st.integers(1, 100),
        max_completion_tokens=st.integers(1, 100),
        stop=TEXT,
        tools=st.lists(OBJECT, max_size=1),
        stream=st.booleans(),
        logit_bias=OBJECT,
    )
)


@SLOW
@given(CHAT_TEMPLATE_BODY)
def test_chat_template_bodies_give_a_completion_request_or_invalid_request(
    body: dict[str, object],
) -> None:
    """A chat body with a template is a sendable completions request or a 400."""
    try:
        completion = chat_template_to_completion_request(body, upstream_model="up")
    except InvalidRequest as err:
        assert err.message
        return
    assert isinstance(completion["prompt"], str)
    orjson.dumps(completion)


# --- the MLflow listing's page token -------------------------------------------------------

ITEMS = [{"name": str(n)} for n in range(7)]
TOKEN_TEXT = st.sampled_from(["0", "3", "6", "7", "-1", "-7", " 2", "+2", "1_0", "\u0663", "x"])
PAGE_TOKENS = (
    st.none()
    | TOKEN_TEXT.map(lambda t: base64.urlsafe_b64encode(t.encode()).decode())
    | st.binary(max_size=8).map(lambda b: base64.urlsafe_b64encode(b).decode())
    | st.text(max_size=10)
)


@FAST
@given(PAGE_TOKENS, st.integers(1, 4))
def test_any_page_token_gives_a_page_of_the_listing_or_invalid_request(
    token: str | None, size: int
) -> None:
    """Any token gives a run of the listing starting at a non-negative offset, or a 400."""
    try:
        body = page(ITEMS, token, size)
    except InvalidRequest as err:
        assert "page_token is not one this gateway gave out" == err.message
        return
    shown = body["endpoints"]
    assert isinstance(shown, list)
    starts = [n for n in range(len(ITEMS) + 1) if ITEMS[n : n + size] == shown]
    assert starts, f"{shown} is no run of the listing"
    if "next_page_token" in body:
        assert ITEMS[starts[0] + size :] != []


@pytest.mark.parametrize("offset", ["-1", "-7", " 2", "+2", "1_0", "\u0663"])
def test_a_page_token_that_is_no_plain_offset_is_a_400(offset: str) -> None:
    """A token that decodes to a negative or decorated number was taken (-1 gave the last item)."""
    token = base64.urlsafe_b64encode(offset.encode()).decode()
    with pytest.raises(InvalidRequest) as caught:
        page(ITEMS, token, 2)
    assert "page_token is not one this gateway gave out" == caught.value.message
