"""Just enough PromQL reading to list the metric names an expression selects.

Not a parser: string literals, label matchers, range selectors, label lists (``by``,
``on``, ...) and Grafana variables are removed, and what is left that looks like an
identifier and is not a function call or keyword is a metric name. That suffices for
the expressions in our rules and dashboard, and promtool checks their syntax for real.
"""

from __future__ import annotations

import re

_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "atan2", "inf", "nan",
}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_IDENTIFIER = re.compile(r"(?<![\w.:$])([A-Za-z_:][\w:]*)")
_LABEL_VALUES = re.compile(r"label_values\(\s*([A-Za-z_:][\w:]*)")

#: What Grafana substitutes for its variables, so that a dashboard query becomes PromQL.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$tenant": ".*",
    "$model": ".*",
}


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects (recording-rule names included)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _LABEL_LIST.sub("", text)
    text = _VARIABLE.sub("", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name = match.group(1)
        is_call = text[match.end() :].lstrip().startswith("(")
        if not is_call and name not in _KEYWORDS:
            names.add(name)
    return names


def variable_query_names(query: str) -> set[str]:
    """The metric a Grafana ``label_values(metric{...}, label)`` query reads."""
    return set(_LABEL_VALUES.findall(query))


def as_promql(grafana_expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced by example values."""
    for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        grafana_expr = grafana_expr.replace(variable, value)
    return grafana_expr
