"""The metric-name reader the dashboard and rules tests rely on must itself be right."""

from __future__ import annotations

from tests.deploy.promql import as_promql, metric_names, variable_query_names


def test_reads_metric_names_and_skips_functions_labels_and_keywords() -> None:
    expr = (
        'sum by (tenant, model) (rate(abstain_choices_total{decision="abstain|x"}[5m] offset 1h))\n'
        "/ on (tenant) group_left () tenant:abstain_budget:ratio\n"
        "or histogram_quantile(0.99, sum by (le) (rate(abstain_overhead_seconds_bucket[$__range])))"
        " > bool 0.5 unless vector(1) and up"
    )
    assert metric_names(expr) == {
        "abstain_choices_total",
        "tenant:abstain_budget:ratio",
        "abstain_overhead_seconds_bucket",
        "up",
    }


def test_label_values_and_grafana_variables() -> None:
    assert variable_query_names(
        'label_values(abstain_choices_total{tenant=~"$tenant"}, model)'
    ) == {"abstain_choices_total"}
    assert as_promql('rate(x{tenant=~"$tenant"}[$__rate_interval])') == 'rate(x{tenant=~".*"}[5m])'
