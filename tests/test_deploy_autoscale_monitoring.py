"""deploy/: the autoscaler's alert rules and dashboard use only metrics Tandem exports, and
promtool accepts the rules, their unit tests and every dashboard query."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from promtool_cli import promtool
from test_deploy_monitoring import BUILTIN_SERIES, series_names

from autoscale.metrics import DESIRED, exported_autoscale_names
from router.metrics import exported_metric_names
from tandem.commands import autoscale_cmd

yaml = pytest.importorskip("yaml")

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "autoscale.json"


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]


def alert_queries() -> list[str]:
    rules = yaml.safe_load((PROMETHEUS / "autoscale_alerts.yml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def test_the_autoscaler_exports_the_hpa_metric() -> None:
    names = exported_autoscale_names()
    assert DESIRED in names and all(n.startswith("tandem_") for n in names)
    assert not names & exported_metric_names(), "a name another server exports too"


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_queries_use_only_exported_metrics(source: str) -> None:
    known = exported_autoscale_names() | exported_metric_names() | BUILTIN_SERIES
    queries = dashboard_queries() if source == "dashboard" else alert_queries()
    used = set().union(*(series_names(q) for q in queries))
    assert DESIRED in used
    assert used <= known, f"not exported by any Tandem server: {sorted(used - known)}"


def test_dashboard_is_valid() -> None:
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert dash["uid"] != json.loads((DEPLOY / "grafana" / "tandem.json").read_text())["uid"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert set(p["gridPos"]) == {"h", "w", "x", "y"} and p["targets"], p["title"]


def test_prometheus_loads_the_rules_and_scrapes_the_autoscaler() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert "autoscale_alerts.yml" in config["rule_files"]
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "tandem-autoscaler"]
    targets = [t for c in job["static_configs"] for t in c["targets"]]
    assert all(t.endswith(f":{autoscale_cmd.METRICS_PORT}") for t in targets)


def test_promtool_checks_the_rules() -> None:
    promtool("check", "rules", "autoscale_alerts.yml")


def test_promtool_unit_tests_fire_the_alerts() -> None:
    promtool("test", "rules", "autoscale_alerts_test.yml")


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    rules = [{"record": f"tandem_autoscale_dashboard:query_{i}",
              "expr": q.replace("$__rate_interval", "5m")}
             for i, q in enumerate(dashboard_queries())]
    (tmp_path / "rules.yml").write_text(
        json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool("check", "rules", "rules.yml", cwd=tmp_path)
