"""deploy/: the Grafana dashboard and Prometheus rules use only metrics Tandem exports, and
promtool accepts the rules, their unit tests, the example config and every dashboard query."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from promtool_cli import promtool

from router.metrics import exported_metric_names

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "tandem.json"
PROMETHEUS = DEPLOY / "prometheus"
# Series Prometheus makes itself, and the ones every scrape target has.
BUILTIN_SERIES = {"up"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                "unless", "offset", "bool", "inf", "nan"}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dash["panels"] if p["type"] != "row"]


def dashboard_queries() -> list[str]:
    return [t["expr"] for p in panels(dashboard()) for t in p["targets"]]


def alert_queries() -> list[str]:
    yaml = pytest.importorskip("yaml")
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def series_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (a small lexer, enough for our queries)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values may hold anything
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges: [5m], [$__rate_interval]
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    found = set()
    for m in re.finditer(r"(?<![\w$.])([a-zA-Z_:][\w:]*)\b(\s*\()?", expr):
        word, call = m.group(1), m.group(2)
        if not call and word.lower() not in PROMQL_WORDS and not re.fullmatch(r"\d+[smhdwy]", word):
            found.add(word)
    return found


def test_series_names_lexer() -> None:
    expr = ('histogram_quantile(0.99, sum by (tier, le) (rate(tandem_x_bucket{a="b c"}[5m]))) '
            "> 0.5 unless on (job) up offset 5m")
    assert series_names(expr) == {"tandem_x_bucket", "up"}


def test_dashboard_is_valid_and_uses_the_datasource_variable() -> None:
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = " ".join(p["title"].lower() for p in panels(dash))
    for wanted in ("tier", "time to first token", "end-to-end", "cache hit rate", "queue depth",
                   "rate-limit", "edge nodes up", "tokens/s", "model versions"):
        assert wanted in titles, f"no panel about {wanted!r}"
    for p in panels(dash):
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}" and t["expr"].strip(), p["title"]
        assert set(p["gridPos"]) == {"h", "w", "x", "y"}


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_queries_use_only_exported_metrics(source: str) -> None:
    known = exported_metric_names() | BUILTIN_SERIES
    queries = dashboard_queries() if source == "dashboard" else alert_queries()
    used = set().union(*(series_names(q) for q in queries))
    assert used, "no metric names found: the lexer is broken"
    assert used <= known, f"not exported by any Tandem server: {sorted(used - known)}"


def test_exported_metric_names() -> None:
    names = exported_metric_names()
    assert {"tandem_requests_total", "tandem_time_to_first_token_seconds_bucket",
            "tandem_router_backend_up", "tandem_model_info", "tandem_gpu_utilization_ratio",
            "tandem_router_cache_hits_total", "tandem_process_cpu_seconds_total"} <= names
    assert all(n.startswith("tandem_") for n in names)


def test_promtool_checks_alert_rules() -> None:
    promtool("check", "rules", "alerts.yml")


def test_promtool_unit_tests_fire_the_alerts() -> None:
    promtool("test", "rules", "alerts_test.yml")


def test_promtool_checks_example_config() -> None:
    promtool("check", "config", "prometheus.yml")


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    # Recording rules make promtool parse each query; Grafana's range variable becomes 5m.
    rules = [{"record": f"tandem_dashboard:query_{i}",
              "expr": q.replace("$__rate_interval", "5m")}
             for i, q in enumerate(dashboard_queries())]
    (tmp_path / "dashboard_rules.yml").write_text(
        json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    promtool("check", "rules", "dashboard_rules.yml", cwd=tmp_path)
