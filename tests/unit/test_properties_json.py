"""JSON-value strategies the property suites share, and the properties of `JsonObject`, the reader
the Gemini translator reads a body with: any value gives a value of the asked kind or a 400."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.errors import InvalidRequest
from proxy.translate.json_object import JsonObject

FAST = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TEXT = st.text(max_size=8)
# What `decode_object` gives a translator: integers of 64 bits, finite floats.
INTEGERS = st.integers(-(2**63), 2**64 - 1)
SCALARS = (
    st.none()
    | st.booleans()
    | INTEGERS
    | st.integers(-3, 3)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT
)
JSON: st.SearchStrategy[Any] = st.recursive(
    SCALARS,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(TEXT, kids, max_size=3),
    max_leaves=12,
)
OBJECT = st.dictionaries(TEXT, JSON, max_size=3)


def shaped(
    required: dict[str, st.SearchStrategy[Any]], /, **optional: st.SearchStrategy[Any]
) -> st.SearchStrategy[dict[str, Any]]:
    """An object with the real field names and plausible values (`mutated` spoils one of them)."""
    return st.fixed_dictionaries(required, optional=optional)


def _slots(value: Any) -> list[tuple[Any, Any]]:
    """Every (container, key or index) in a JSON tree, parents before children."""
    found: list[tuple[Any, Any]] = []
    stack = [value]
    while stack:
        item = stack.pop()
        keys = list(item) if isinstance(item, dict) else range(len(item))
        for key in keys:
            found.append((item, key))
            if isinstance(item[key], dict | list):
                stack.append(item[key])
    return found


@st.composite
def mutated(
    draw: st.DrawFn, base: st.SearchStrategy[Any], junk: st.SearchStrategy[Any] = JSON
) -> Any:
    """A plausible value with up to two of its slots spoilt: replaced by junk, or removed."""
    value = draw(base)
    for _ in range(draw(st.integers(0, 2))):
        slots = _slots(value) if isinstance(value, dict | list) else []
        if not slots:
            break
        container, key = draw(st.sampled_from(slots))
        if draw(st.booleans()) or isinstance(container, list):
            container[key] = draw(junk)
        else:
            del container[key]
    return value


# --- JsonObject --------------------------------------------------------------------------

NAMES = st.sampled_from(["maxOutputTokens", "topK", "text", "parts"])
SNAKE_OR_CAMEL = st.dictionaries(
    NAMES | NAMES.map(lambda n: "".join(f"_{c.lower()}" if c.isupper() else c for c in n)),
    JSON,
    max_size=4,
)


@FAST
@given(JSON | SNAKE_OR_CAMEL, NAMES, st.booleans())
def test_json_object_reads_give_the_kind_asked_or_invalid_request(
    value: object, name: str, flag: bool
) -> None:
    """Every reader gives a value of its kind (or None when allowed), or a 400 naming the path."""
    try:
        obj = JsonObject(value, "at")
    except InvalidRequest as err:
        assert err.message.startswith("at: ")
        return
    readers = [
        lambda: obj.string(name, required=flag),
        lambda: obj.number(name, whole=flag),
        lambda: obj.array(name, required=flag),
        lambda: obj.obj(name),
        lambda: obj.child(name),
    ]
    kinds = [str, int | float, tuple, JsonObject, JsonObject]
    for read, kind in zip(readers, kinds, strict=True):
        try:
            result = read()
        except InvalidRequest as err:
            assert err.message.startswith("at.")
            continue
        assert result is None or isinstance(result, kind)


@FAST
@given(st.floats(allow_nan=False) | INTEGERS | st.sampled_from([10**400, -(10**400), 2**1030]))
def test_whole_numbers_of_any_size_give_a_number_or_invalid_request(number: float) -> None:
    """A whole-number field of any magnitude is an int or a 400."""
    try:
        result = JsonObject({"topK": number}, "").number("topK", whole=True)
    except InvalidRequest as err:
        assert err.message.startswith("topK: ")
        return
    assert isinstance(result, int)


@pytest.mark.parametrize(
    ("number", "message"),
    [
        (
            10**400,
            "topK: expected a whole number of 64 bits or fewer",
        ),  # float() raised OverflowError
        (
            1e300,
            "topK: expected a whole number of 64 bits or fewer",
        ),  # int(1e300) orjson cannot send
        (2**63, "topK: expected a whole number of 64 bits or fewer"),
    ],
)
def test_whole_numbers_past_64_bits_are_a_400(number: float, message: str) -> None:
    """A whole number no chat request can carry is a 400 naming its path."""
    with pytest.raises(InvalidRequest) as caught:
        JsonObject({"topK": number}, "").number("topK", whole=True)
    assert message == caught.value.message
