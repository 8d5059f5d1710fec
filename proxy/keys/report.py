"""Usage tallies summed for people: per key and model, over a span of minutes. [pure]"""

from __future__ import annotations

from proxy.keys.record import UsageRow, iso


def usage_report(rows: list[UsageRow], since: float) -> dict[str, object]:
    """The rows summed per key and model (by key, then model), with the span they cover."""
    totals: dict[tuple[str, str], list[int]] = {}
    for row in rows:
        t = totals.setdefault((row.key, row.model), [0, 0, 0])
        t[0] += row.requests
        t[1] += row.prompt_tokens
        t[2] += row.completion_tokens
    return {
        "since": iso(since),
        "usage": [
            {
                "key": key,
                "model": model,
                "requests": requests,
                "prompt_tokens": prompt,
                "completion_tokens": completion,
            }
            for (key, model), (requests, prompt, completion) in sorted(totals.items())
        ],
    }
