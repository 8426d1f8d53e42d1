"""`diffplug new-plugin` writes a package whose own tests pass in a fresh environment."""

import subprocess

import pytest
from cliutil import assert_clean_error, run_cli
from venvs import ROOT, install


@pytest.mark.slow
def test_generated_plugin_installs_and_its_tests_pass(tmp_path):
    result = run_cli("new-plugin", "my-sampler", "--dir", str(tmp_path))
    assert result.code == 0, result.err
    package = tmp_path / "diffplug-my-sampler"
    assert (package / "src" / "diffplug_my_sampler" / "plugin.py").exists()
    exe = install(tmp_path / "venv", ROOT / "core", f"{package}[test]")
    tests = subprocess.run(
        [str(exe.parent / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(package / "tests")],
        capture_output=True, text=True, cwd=package, timeout=600,
    )  # fmt: skip
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "3 passed" in tests.stdout
    listing = subprocess.run([str(exe), "list", "samplers"], capture_output=True, text=True)
    assert "my-sampler" in listing.stdout


def test_new_plugin_refuses_bad_names_and_existing_folders(tmp_path):
    assert_clean_error(run_cli("new-plugin", "Bad_Name", "--dir", str(tmp_path)), "lower-case")
    (tmp_path / "diffplug-taken").mkdir()
    assert_clean_error(run_cli("new-plugin", "taken", "--dir", str(tmp_path)), "exists")
