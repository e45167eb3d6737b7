"""The configuration examples in README.md are valid configurations (docs that drift lie)."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

from gateway import config as cfg
from gateway.errors import ConfigError
from tests.test_install import install_readme_command

ROOT = Path(__file__).resolve().parents[2]


def on_shipped(readme_toml: str) -> cfg.GatewayConfig:
    """README examples on top of the shipped config: a section the README shows replaces the
    shipped one (config.toml has its own `[coap]`, on loopback); devices are added."""
    shipped = tomllib.loads((ROOT / "config.toml").read_text())
    readme = tomllib.loads(readme_toml)
    merged = {**shipped, **readme}
    merged["devices"] = {**shipped.get("devices", {}), **readme.get("devices", {})}
    return cfg.parse(merged, "README.md")


def test_every_toml_example_in_the_readme_validates() -> None:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 6
    # All examples together, on top of the shipped config, form one valid configuration.
    c = on_shipped("\n".join(blocks))
    assert {"meter-2", "gps", "kitchen", "thermostat-1"} <= set(c.devices)
    assert {"coap", "sync"} <= set(c.sections)


#: `key = "value"   # alt | alt (default) | alt`: a comment listing what a key accepts.
_ALT = r"[\w-]+(?:\s*\([^)]*\))?"
ALTERNATIVES = re.compile(rf'^(\w+) = "([^"]*)"\s+#\s*({_ALT}(?:\s*\|\s*{_ALT})+)\s*$')


def test_every_value_a_readme_comment_lists_is_accepted() -> None:
    """`table = "input"  # coil | discrete | ...` once listed a value the code refused."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, flags=re.S)
    checked = 0
    for i, block in enumerate(blocks):
        lines = block.splitlines()
        for j, line in enumerate(lines):
            m = ALTERNATIVES.match(line)
            if m is None:
                continue
            key = m.group(1)
            for alt in re.split(r"\s*\|\s*", m.group(3)):
                alt = re.sub(r"\s*\(.*\)", "", alt)
                edited = [*lines[:j], f'{key} = "{alt}"', *lines[j + 1 :]]
                others = [b for k, b in enumerate(blocks) if k != i]
                doc = "\n".join([*others, "\n".join(edited)])
                try:
                    on_shipped(doc)
                except ConfigError as exc:
                    # Other keys may be needed with that value; the value itself must pass.
                    refused = [str(x) for x in exc.issues if f"got '{alt}'" in x.message]
                    assert not refused, f"README lists {key} = {alt!r}, the code says {refused}"
                checked += 1
    assert checked >= 10  # the table, format and payload lists at least


def test_the_systemd_steps_give_gatewayctl_the_units_directories(tmp_path: Path) -> None:
    """The shipped config's directories are relative; installed as /etc/gateway/config.toml
    they made `sudo gatewayctl status` look in the wrong place while the daemon ran. The
    README's one install command, run into a temporary root, gives the installed gatewayctl
    the unit's directories with no flags (only /etc is mapped into the root)."""
    root = tmp_path / "root"
    install_readme_command(root)
    unit = (ROOT / "systemd" / "gatewayd.service").read_text()
    state = re.search(r"^StateDirectory=(\S+)", unit, flags=re.M)
    runtime = re.search(r"^RuntimeDirectory=(\S+)", unit, flags=re.M)
    assert state is not None and runtime is not None
    c = cfg.load(root / "etc/gateway/config.toml")
    assert Path(c.gateway.state_dir) == Path("/var/lib") / state.group(1)
    assert Path(c.gateway.runtime_dir) == Path("/run") / runtime.group(1)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_DIRECTORY")}
    env["GATEWAY_CONFIG"] = str(root / "etc/gateway/config.toml")
    res = subprocess.run(
        [str(root / "usr/local/bin/gatewayctl"), "config", "check"],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert f"state in /var/lib/{state.group(1)}" in res.stdout, res.stdout
    assert f"socket /run/{runtime.group(1)}/" in res.stdout, res.stdout
