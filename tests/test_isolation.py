"""Every plugin installs and works with only core beside it, in a fresh virtual environment.

This is the packaging promise: `pip install ./core ./plugins/X` gives a working diffplug with
X's components; asking for another plugin's component exits 2 saying that no installed plugin
registers it (core names no plugin, so it cannot say which one would).
"""

import json
import subprocess
from pathlib import Path

import pytest
from venvs import ROOT, install

PLUGINS = sorted(
    [p for p in (ROOT / "plugins").iterdir() if (p / "pyproject.toml").exists()]
    + [p for p in (ROOT / "docs" / "examples").iterdir() if (p / "pyproject.toml").exists()]
)


#: runs `diffplug run` in-process for each (sampler, output) and prints their exit codes
DRIVER = """
import json, sys
from diffplug.cli import main
codes = {}
for sampler, out in json.loads(sys.argv[1]):
    try:
        main(["run", "--sampler", sampler, "--steps", "4", "--num-samples", "2", "-q", "-o", out])
        codes[sampler] = 0
    except SystemExit as exc:
        codes[sampler] = exc.code
print(json.dumps(codes))
"""


def _diffplug(exe: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda p: p.name)
def test_plugin_works_with_only_core(plugin, tmp_path):
    exe = install(tmp_path / "venv", ROOT / "core", plugin)
    listing = _diffplug(exe, "plugins", "--json", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    rows = {row["name"]: row for row in json.loads(listing.stdout)}
    dist = "diffplug-" + plugin.name.removeprefix("diffplug-")
    assert set(rows) == {"diffplug", dist}, rows
    assert rows[dist]["error"] is None
    samplers = rows[dist]["components"].get("scheduler", [])
    models = rows[dist]["components"].get("pretrained", [])
    # every sampler in one process (a `diffplug run` each would import torch each time)
    jobs = [(sampler, str(tmp_path / f"{sampler}.png")) for sampler in samplers]
    driven = subprocess.run([str(exe.parent / "python"), "-c", DRIVER, json.dumps(jobs)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=600)  # fmt: skip
    assert driven.returncode == 0, driven.stderr
    codes = json.loads(driven.stdout.splitlines()[-1])
    for sampler, out in jobs:
        assert codes[sampler] == 0, (sampler, driven.stderr)
        assert Path(out).read_bytes().startswith(b"\x89PNG")
    for model in models:
        info = _diffplug(exe, "info", model, cwd=tmp_path)
        assert info.returncode == 0, info.stderr
    # a first-party component from a plugin that is not installed: exit 2 and where to look
    missing = "ddpm" if dist != "diffplug-ddpm" else "ddim"
    result = _diffplug(
        exe, "run", "--sampler", missing, "-o", str(tmp_path / "m.png"), cwd=tmp_path
    )
    assert result.returncode == 2
    assert f"unknown sampler '{missing}'" in result.stderr
    assert "No installed plugin registers it" in result.stderr
    assert "Traceback" not in result.stderr
