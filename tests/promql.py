"""The metric and label names a PromQL expression refers to, read without a full parser.

Enough of PromQL for our dashboard and alert rules: string literals, label matchers in braces,
range and subquery brackets, grouping clauses (`by`, `without`, `on`, `ignoring`,
`group_left`, `group_right`), function calls and the binary keywords. Whatever identifier is
left is a metric name.
"""

from __future__ import annotations

import re

KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "inf", "nan"}
    | {"group_left", "group_right", "atan2"}
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_NUMBER = re.compile(r"(?<![A-Za-z0-9_:])\d[0-9A-Za-z_.]*")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_LABEL_LIST = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) that `expr` selects, groups or matches on."""
    text = _STRING.sub('""', expr)
    labels: set[str] = set()
    for block in _MATCHERS.findall(text):
        labels.update(_MATCHER_LABEL.findall(block))
    text = _MATCHERS.sub(" ", text)
    for _, listed in _GROUPING.findall(text):
        labels.update(_LABEL_LIST.findall(listed))
    text = _GROUPING.sub(" ", text)
    text = _NUMBER.sub(" ", _RANGE.sub(" ", text))
    metrics = {
        match.group()
        for match in _IDENT.finditer(text)
        if match.group() not in KEYWORDS and not text[match.end() :].lstrip().startswith("(")
    }
    return metrics, labels


def unknown(exprs: list[str], metrics: set[str], labels: set[str]) -> list[str]:
    """A line for each name in `exprs` that is not among the exported `metrics` and `labels`."""
    out = []
    for expr in exprs:
        used_metrics, used_labels = names(expr)
        out += [f"metric {name} in {expr}" for name in sorted(used_metrics - metrics)]
        out += [f"label {name} in {expr}" for name in sorted(used_labels - labels)]
    return out
