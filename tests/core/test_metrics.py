"""Metrics: `gatewayctl metrics` (OpenMetrics) and the `[metrics] textfile` node_exporter
reads (Prometheus 0.0.4), both parsed by prometheus_client's own parsers."""

from __future__ import annotations

import json
import os
from pathlib import Path

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus

from tests.support.daemon import VIRTUAL_CONFIG, Daemon, run_cli, start_daemon, write_config


def samples(families: object) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in families:  # type: ignore[attr-defined]
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def one(
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    want = {"gateway": "gw-test", **labels}
    hits = [v for (n, lab), v in found.items() if n == name and dict(lab) == want]
    assert len(hits) == 1, (name, labels, sorted(k for k in found if k[0] == name))
    return hits[0]


def test_metrics_verb_and_textfile_parse_and_agree_with_status(
    tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    prom = tmp_path / "textfile" / "gatewayd.prom"
    prom.parent.mkdir()
    text = VIRTUAL_CONFIG + f'\n[metrics]\ntextfile = "{prom}"\ninterval = 1\n'
    config = write_config(tmp_path, text)
    d = start_daemon(config, tmp_path)
    daemon_factory.append(d)

    def written() -> int:
        r = run_cli(config, "--json", "status")
        return int(json.loads(r.stdout)["services"]["metrics"]["written"])

    # Read the textfile over and over while the daemon rewrites it: never half a file.
    reads = 0
    while written() < 3:
        if prom.exists():
            body = prom.read_text()
            assert body.endswith("\n") and "gatewayd_uptime_seconds" in body
            samples(parse_prometheus(body))
            reads += 1
    assert reads > 0
    assert [p.name for p in prom.parent.iterdir()] == ["gatewayd.prom"]  # no temporaries left
    assert oct(os.stat(prom).st_mode & 0o777) == "0o644"
    found = samples(parse_prometheus(prom.read_text()))
    assert one(found, "gatewayd_service_up", service="collection") == 1
    assert one(found, "gatewayd_polls_total", service="collection") > 0

    r = run_cli(config, "metrics")
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("# EOF\n")
    found = samples(parse_openmetrics(r.stdout))  # type: ignore[no-untyped-call]
    status = json.loads(run_cli(config, "--json", "status").stdout)
    assert one(found, "gatewayd_up") == 1
    assert one(found, "gatewayd_store_quota_bytes") == status["store"]["quota_bytes"]
    assert one(found, "gatewayd_configured_devices") == 2
    assert one(found, "gatewayd_service_up", service="metrics") == 1
    assert one(found, "gatewayd_poll_failures_total", service="collection") >= 0
    assert one(found, "gatewayd_store_events") > 0
    assert one(found, "gatewayd_device_polls_total", service="collection", device="boiler-1") > 0
    assert one(found, "gatewayd_device_up", service="collection", device="meter-1") == 1
    assert (
        one(found, "gatewayd_device_last_read_seconds", service="collection", device="meter-1") >= 0
    )
    assert one(found, "gatewayd_info", version=status["version"]) == 1
    r = run_cli(config, "metrics", "--format", "prometheus")
    assert r.returncode == 0 and "# EOF" not in r.stdout
    assert one(samples(parse_prometheus(r.stdout)), "gatewayd_up") == 1

    assert d.stop() == 0
    r = run_cli(config, "metrics")  # the daemon is down: figures from the file, up = 0
    assert r.returncode == 0, r.stderr
    found = samples(parse_openmetrics(r.stdout))  # type: ignore[no-untyped-call]
    assert one(found, "gatewayd_up") == 0 and one(found, "gatewayd_store_events") > 0


def test_metrics_config_errors_name_the_key(tmp_path: Path) -> None:
    for body, message in [
        ('textfile = "gatewayd.prom"', "metrics.textfile: must be an absolute path"),
        ('textfile = "/tmp/gatewayd.txt"', "metrics.textfile: node_exporter's textfile"),
        ('textfile = "/tmp/g.prom"\ninterval = 0.1', "metrics.interval: must be >= 1"),
        ('textfile = "/tmp/g.prom"\nintervall = 5', "metrics.intervall: unknown key"),
        ("interval = 5", "metrics.textfile: "),
    ]:
        config = write_config(tmp_path, VIRTUAL_CONFIG + f"\n[metrics]\n{body}\n")
        r = run_cli(config, "config", "check")
        assert r.returncode == 3 and message in r.stderr, (body, r.stderr)
