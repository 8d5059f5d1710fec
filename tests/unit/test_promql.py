"""tests/promql.py: the names a PromQL expression uses, which the dashboard test checks."""

from tests.promql import names, unknown

EXPORTED = {"proxy_requests_total", "proxy_queue_depth", "proxy_ttft_seconds_bucket"}
LABELS = {"job", "instance", "model", "backend", "status", "le"}


def test_matchers_groupings_and_ranges_are_labels_not_metrics() -> None:
    """Label names come from matchers and grouping clauses; functions, keywords, durations,
    numbers and strings are neither."""
    expr = (
        'histogram_quantile(0.99, sum by (le, model) (rate(proxy_ttft_seconds_bucket{job=~"$job",'
        ' status!="2.."}[5m]))) > 1e3 and on (job, instance) proxy_queue_depth offset 1m'
    )
    assert ({"proxy_ttft_seconds_bucket", "proxy_queue_depth"}, LABELS - {"backend"}) == names(expr)


def test_aggregation_clause_after_the_call() -> None:
    """`sum(x) without (a)` names label a; `x > bool 0` names no metric `bool`."""
    assert ({"proxy_requests_total"}, {"backend"}) == names(
        "sum(proxy_requests_total) without (backend) > bool 0"
    )


def test_a_misspelt_metric_or_label_is_reported() -> None:
    """A metric or label the gateway does not export is named, with its expression."""
    exprs = ["sum by (modle) (rate(proxy_request_total[5m]))", "proxy_queue_depth"]
    assert [
        "metric proxy_request_total in " + exprs[0],
        "label modle in " + exprs[0],
    ] == unknown(exprs, EXPORTED, LABELS)
