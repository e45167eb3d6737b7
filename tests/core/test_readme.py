"""The configuration examples in README.md are valid configurations (docs that drift lie)."""

from __future__ import annotations

import re
from pathlib import Path

from gateway import config as cfg

ROOT = Path(__file__).resolve().parents[2]


def test_every_toml_example_in_the_readme_validates() -> None:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 6
    # All examples together, on top of the shipped config, form one valid configuration.
    c = cfg.loads((ROOT / "config.toml").read_text() + "\n" + "\n".join(blocks), "README.md")
    assert {"meter-2", "gps", "kitchen", "thermostat-1"} <= set(c.devices)
    assert {"coap", "sync"} <= set(c.sections)
