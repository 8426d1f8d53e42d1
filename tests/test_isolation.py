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


#: runs each `diffplug ARGS` of argv[1] (a JSON list) in this one process (a process each
#: would import torch each time) and prints a JSON list of [exit code, stdout, stderr]
DRIVER = """
import contextlib, io, json, sys
from diffplug.cli import main
results = []
for args in json.loads(sys.argv[1]):
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
        except SystemExit as exc:
            code = exc.code or 0
    results.append([code, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def _drive(exe: Path, commands: list[list[str]], cwd: Path) -> list[tuple[int, str, str]]:
    driven = subprocess.run([str(exe.parent / "python"), "-c", DRIVER, json.dumps(commands)],
                            capture_output=True, text=True, cwd=cwd, timeout=600)  # fmt: skip
    assert driven.returncode == 0, driven.stderr
    return [tuple(r) for r in json.loads(driven.stdout.splitlines()[-1])]


@pytest.mark.slow
@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda p: p.name)
def test_plugin_works_with_only_core(plugin, tmp_path):
    exe = install(tmp_path / "venv", ROOT / "core", plugin)
    # the console script itself, once
    listing = subprocess.run([str(exe), "plugins", "--json"], capture_output=True, text=True,
                             cwd=tmp_path, timeout=300)  # fmt: skip
    assert listing.returncode == 0, listing.stderr
    rows = {row["name"]: row for row in json.loads(listing.stdout)}
    dist = "diffplug-" + plugin.name.removeprefix("diffplug-")
    assert set(rows) == {"diffplug", dist}, rows
    assert rows[dist]["error"] is None
    samplers = rows[dist]["components"].get("scheduler", [])
    models = rows[dist]["components"].get("pretrained", [])
    outs = [tmp_path / f"{sampler}.png" for sampler in samplers]
    # a first-party component from a plugin that is not installed: exit 2 and where to look
    missing = "ddpm" if dist != "diffplug-ddpm" else "ddim"
    commands = [
        *(["run", "--sampler", s, "--steps", "4", "--num-samples", "2", "-q", "-o", str(o)]
          for s, o in zip(samplers, outs, strict=True)),
        *(["info", model] for model in models),
        ["run", "--sampler", missing, "-o", str(tmp_path / "m.png")],
    ]  # fmt: skip
    *ran, (code, _, err) = _drive(exe, commands, tmp_path)
    for args, (status, _, stderr) in zip(commands[:-1], ran, strict=True):
        assert status == 0, (args, stderr)
    for out in outs:
        assert out.read_bytes().startswith(b"\x89PNG")
    assert code == 2
    assert f"unknown sampler '{missing}'" in err
    assert "No installed plugin registers it" in err
    assert "Traceback" not in err
