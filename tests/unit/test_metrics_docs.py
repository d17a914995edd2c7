"""The README's operator section shows what the tests run: the scrape configuration
(testkit.prometheus.scrape_config, which the process test gives a real Prometheus) and
holderd's drop-in (docs/prometheus/holderd-metrics.conf, which the systemd test installs)."""

from pathlib import Path

from testkit.prometheus import scrape_config

ROOT = Path(__file__).resolve().parents[2]


def indented(text: str, by: int) -> str:
    return "".join(" " * by + line + "\n" if line else "\n" for line in text.splitlines())


def test_the_readme_shows_the_scrape_configuration_the_test_runs():
    shown = scrape_config(["127.0.0.1:9471"], ["127.0.0.1:9472"]) + "rule_files: [chatd-alerts.yml]\n"
    assert indented(shown, 4) in (ROOT / "README.md").read_text()


def test_the_readme_shows_holderds_drop_in_as_installed():
    drop_in = (ROOT / "docs" / "prometheus" / "holderd-metrics.conf").read_text()
    assert indented(drop_in, 6) in (ROOT / "README.md").read_text()


def test_the_units_port_is_the_one_the_readme_scrapes():
    assert '"CHATD_METRICS=--metrics-port 9471"' in (ROOT / "units" / "chatd@.service").read_text()
    assert "--metrics-port 9472" in (ROOT / "docs" / "prometheus" / "holderd-metrics.conf").read_text()
