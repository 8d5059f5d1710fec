"""OICM-Request-Timeout: a finite positive decimal, clamped to the maximum; else a 400."""

from __future__ import annotations

import pytest

from proxy.config import TimeoutsConfig
from proxy.errors import InvalidRequest
from proxy.timeouts import TIMEOUT_HEADER, request_budget

TIMEOUTS = TimeoutsConfig(request_s=120.0, max_request_s=600.0)


def test_header_name() -> None:
    """The header is the one DESIGN.md documents."""
    assert "OICM-Request-Timeout" == TIMEOUT_HEADER


def test_no_header_means_the_default() -> None:
    """Without the header the request has `timeouts.request_s`."""
    assert 120.0 == request_budget(None, TIMEOUTS)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("30", 30.0),
        ("1.5", 1.5),
        (".5", 0.5),
        ("5.", 5.0),
        (" 7 ", 7.0),
        ("\t8\t", 8.0),
        ("0.001", 0.001),
        ("007", 7.0),
        ("600", 600.0),
        ("600.0001", 600.0),
        ("3600", 600.0),
        ("99999999999999999999", 600.0),
    ],
)
def test_valid_values(header: str, expected: float) -> None:
    """Decimal seconds are taken as given, and values over max_request_s are clamped to it."""
    assert expected == request_budget(header, TIMEOUTS)


@pytest.mark.parametrize(
    "header",
    ["abc", "-5", "0", "0.0", "000", ".0", "nan", "NaN", "inf", "Infinity", "1s", "", "  ",
     "1e3", "+5", "1,5", "1 2", "0x10", ".", "5..", "1_000"],
)  # fmt: skip
def test_invalid_values(header: str) -> None:
    """Anything but a finite positive decimal number is a 400 invalid_request naming the header."""
    with pytest.raises(InvalidRequest) as caught:
        request_budget(header, TIMEOUTS)
    assert 400 == caught.value.status
    assert caught.value.message.startswith(
        "OICM-Request-Timeout must be a positive number of seconds, got "
    )


def test_invalid_value_is_quoted_short() -> None:
    """The refused value is echoed back, cut to 40 characters."""
    with pytest.raises(InvalidRequest) as caught:
        request_budget("y" * 1000, TIMEOUTS)
    assert caught.value.message.endswith(repr("y" * 40))


def test_a_huge_decimal_is_clamped() -> None:
    """A valid but enormous decimal is clamped like any other value above the maximum."""
    assert 600.0 == request_budget("9" * 400, TIMEOUTS)
