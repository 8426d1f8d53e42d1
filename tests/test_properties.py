"""Properties of the command line on hostile input (hypothesis, derandomized: CI draws the
same examples every run): any checkpoint header, any prompt, any value of every numeric
option of `run` gives exit 0, or exit 2 with one line saying what is wrong; never exit 1,
never a traceback.

Each property draws few examples (``EXAMPLES``, 25) so the file runs in well under a minute;
``DIFFPLUG_PROPERTY_EXAMPLES=500`` explores further. Values the properties found fatal once
(an allocation of 2**50 rows, an overflowing noise range, a NaN percentile) are pinned, one
by one, by the tests at the end.
"""

from __future__ import annotations

import json
import os
import struct

import pytest
from cliutil import run_cli
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from diffplug.checkpoint import DTYPE_SIZES

EXAMPLES = int(os.environ.get("DIFFPLUG_PROPERTY_EXAMPLES", "25"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip


def _clean(result, out=None):
    """Exit 0, or exit 2 with exactly one line that says what is wrong (click's usage
    errors add their usage lines before it); never exit 1, never a traceback."""
    assert result.code in (0, 2), (result.code, result.err)
    assert "Traceback" not in result.err, result.err
    if result.code == 2:
        said = [line for line in result.err.splitlines()
                if line.startswith(("diffplug: error:", "Error:"))]  # fmt: skip
        assert len(said) == 1, result.err
    if out is not None:
        assert out.exists() == (result.code == 0), result.err


# -- checkpoint headers -----------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=8,
)  # fmt: skip
dtypes = st.sampled_from(sorted(DTYPE_SIZES)) | st.text(max_size=6) | json_values
dims = st.integers(-2, 2**64) | st.floats() | st.text(max_size=2)
entries = (
    st.fixed_dictionaries(
        {
            "dtype": dtypes,
            "shape": st.lists(dims, max_size=4) | json_values,
            "data_offsets": st.lists(st.integers(-2, 2**64), max_size=3) | json_values,
        }
    )
    | json_values
)
#: small values for the config of a real component: a config that passes its checks is
#: built (on the meta device first) and then compared with the header
config_values = (st.integers(-2, 64) | st.floats() | st.booleans() | st.text(max_size=4)
                 | st.lists(st.integers(-1, 8), max_size=3) | json_values)  # fmt: skip
configs = st.dictionaries(
    st.sampled_from(["channels", "size", "width", "mults", "blocks", "attention", "heads",
                     "dropout", "num_classes", "prediction", "process", "conditioning",
                     "components", "means", "variance"]) | st.text(max_size=5),
    config_values,
    max_size=5,
)  # fmt: skip


DIFFPLUG_META = {"diffplug.format": "diffplug/1", "diffplug.kind": "denoiser",
                 "diffplug.plugin": "diffplug-ddpm", "diffplug.name": "unet",
                 "diffplug.config": "{}", "diffplug.extra": "{}"}  # fmt: skip


def _file(header):
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw


@st.composite
def diffplug_metadata(draw):
    """Metadata that looks like diffplug's: right keys, random (or broken) values."""
    meta = {
        "diffplug.format": draw(st.sampled_from(["diffplug/1", "diffplug/2", ""])),
        "diffplug.kind": draw(st.sampled_from(["denoiser", "autoencoder", "scheduler", "x"])),
        "diffplug.plugin": draw(
            st.sampled_from(["diffplug-ddpm", "diffplug", "diffplug-adm", "nope"])
        ),  # fmt: skip
        "diffplug.name": draw(st.sampled_from(["unet", "gmm-oracle", "dual-unet", "x"])),
        "diffplug.config": draw(configs.map(json.dumps) | st.text(max_size=10)),
        "diffplug.extra": draw(json_values.map(json.dumps) | st.text(max_size=10)),
    }
    drop = draw(st.lists(st.sampled_from(sorted(meta)), max_size=2))
    return {k: v for k, v in meta.items() if k not in drop}


@st.composite
def header_files(draw):
    """The bytes of a .safetensors file with a random, nested, truncated or garbled header."""
    kind = draw(st.sampled_from(["json", "nested", "bytes"]))
    if kind == "json":
        header = draw(st.dictionaries(st.text(max_size=5), entries, max_size=3))
        meta = draw(st.none() | diffplug_metadata() | json_values)
        if meta is not None:
            header["__metadata__"] = meta
        raw = json.dumps(header).encode()
    elif kind == "nested":  # a header nested deep enough to blow a recursive parser
        depth = draw(st.sampled_from([1, 10, 1000, 100_000]))
        open_, close = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        raw = ('{"x":' + open_ * depth + "1" + close * depth + "}").encode()
    else:
        raw = draw(st.binary(max_size=64))
    declared = draw(st.none() | st.integers(0, 2**64 - 1))
    data = struct.pack("<Q", len(raw) if declared is None else declared) + raw
    data += draw(st.binary(max_size=32))
    if draw(st.booleans()):  # truncated anywhere
        data = data[: draw(st.integers(0, len(data)))]
    for _ in range(draw(st.integers(0, 3))):  # garbled bytes
        if data:
            at = draw(st.integers(0, len(data) - 1))
            data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
    return data


@PROPERTY
@given(data=header_files())
# what this property found: metadata whose extra is JSON null, and a dtype that is a list
@example(data=_file({"__metadata__": {**DIFFPLUG_META, "diffplug.extra": "null"}}))
@example(data=_file({"__metadata__": {**DIFFPLUG_META, "diffplug.config": "[1]"}}))
@example(data=_file({"": {"dtype": [], "shape": [], "data_offsets": []}}))
def test_any_checkpoint_header_is_a_clean_refusal_for_info_and_run(tmp_path, data):
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    _clean(run_cli("info", str(path)))
    out = tmp_path / "o.png"
    out.unlink(missing_ok=True)
    result = run_cli("run", "--sampler", "ddim", "--model", str(path), "--steps", "2",
                     "--num-samples", "1", "-q", "-o", str(out))  # fmt: skip
    _clean(result, out)


# -- prompts ------------------------------------------------------------------------------

special = st.sampled_from(["", "\x00", "a\x00b", "\udcff", "\ud800", "\ufeff", "\u200b", "\n",
                           "\U0001f600", "7", "seven", "e\u0301", "\u202e3"])  # fmt: skip
characters = st.characters() | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
prompts = (special | st.text(characters, max_size=30)
           | st.builds(lambda text, n: text * n, special | st.text(characters, min_size=1,
                                                                   max_size=3),
                       st.integers(0, 20_000)))  # fmt: skip


@PROPERTY
@given(texts=st.lists(prompts, min_size=1, max_size=3))
def test_any_prompt_samples_the_text_model_or_is_a_clean_refusal(tmp_path, texts):
    out = tmp_path / "o.safetensors"
    out.unlink(missing_ok=True)
    flat = [a for text in texts for a in ("--prompt", text)]
    result = run_cli("run", "--sampler", "ddim", "--model", "imagen-digits-base", "--steps", "1",
                     "--num-samples", "1", *flat, "-q", "-o", str(out))  # fmt: skip
    _clean(result, out)


# -- numeric options of run -----------------------------------------------------------------


def _number(value):
    return repr(value) if isinstance(value, float) else str(value)


floats = st.floats(allow_nan=True, allow_infinity=True).map(_number)
odd = st.sampled_from(["", " 3", "1e999", "-0", "0x10", "1_000", "\u0663", "3.0", "two", "+5"])
small_ints = st.integers(-3, 4).map(str)
huge_ints = st.sampled_from([2**31, 2**63, 2**64, -(2**63), 10**30]).map(str)
bad = floats | odd | small_ints | huge_ints
#: each option: values it accepts (half the draws, so that runs happen) | anything. Valid
#: values are kept cheap: a large valid --num-samples or --steps only takes time, and the
#: bounds themselves (10**6 samples, the process's 1000 steps) are drawn past
OPTIONS = {
    "--steps": st.integers(1, 4).map(str) | st.sampled_from(["1000", "1001", "10000"]) | bad,
    "--num-samples": st.integers(1, 4).map(str) | st.sampled_from(["1000001"]) | bad,
    "--guidance": floats | bad,
    "--seed": st.integers(0, 2**64 - 1).map(str) | bad,
    "--batch-size": st.integers(1, 10**12).map(str) | bad,
    "--chunk": st.integers(0, 64).map(str) | floats | odd | small_ints | huge_ints,
    "--sigma-min": st.floats(1e-4, 1.0).map(_number) | bad | st.sampled_from(["1e-300", "1e300"]),
    "--sigma-max": st.floats(1.0, 1e4).map(_number) | bad | st.sampled_from(["1e308", "1e-299"]),
    "--threshold-percentile": st.floats(0.01, 1.0).map(_number) | bad,
}  # fmt: skip
SCHEDULED = {"--steps": st.integers(1, 4).map(str) | st.sampled_from(["1000", "10000"])
             | floats | odd | huge_ints}  # fmt: skip


@PROPERTY
@given(
    options=st.lists(st.sampled_from(sorted(OPTIONS)), min_size=1, max_size=3, unique=True),
    threshold=st.sampled_from([None, "static", "dynamic"]),
    data=st.data(),
)
def test_any_numeric_option_value_samples_or_is_a_clean_refusal(tmp_path, options, threshold, data):
    sigmas = {"--sigma-min", "--sigma-max"} & set(options)
    # a noise range needs a schedule, and a schedule a sampler that walks noise levels
    schedule = data.draw(
        st.sampled_from(["karras", "karras", None] if sigmas else [None, "karras"])
    )
    sampler = data.draw(
        st.sampled_from(["euler", "euler", "ddim"] if schedule else ["ddim", "euler"])
    )
    domains = {**OPTIONS, **(SCHEDULED if schedule else {})}
    values = {flag: data.draw(domains[flag], label=flag) for flag in sorted(options)}
    args = [s for flag, value in values.items() for s in (flag, value)]
    if "--steps" not in values:
        args += ["--steps", "2"]
    if "--num-samples" not in values:
        args += ["--num-samples", "2"]
    args += ["--schedule", schedule] if schedule else []
    args += ["--threshold", threshold] if threshold else []
    out = tmp_path / "o.safetensors"
    out.unlink(missing_ok=True)
    result = run_cli("run", "--sampler", sampler, "--model", "gmm-digits", *args, "-q",
                     "-o", str(out))  # fmt: skip
    _clean(result, out)


# -- values once fatal, now refused: pinned one by one -------------------------------------

REFUSED = [
    pytest.param(["--chunk", str(2**50)], id="chunk-huge-allocates-padding"),
    pytest.param(["--schedule", "karras", "--steps", str(2**62)], id="steps-huge-with-schedule"),
    pytest.param(
        [
            "--sampler",
            "euler",
            "--schedule",
            "karras",
            "--sigma-min",
            "1e300",
            "--sigma-max",
            "1e308",
        ],
        id="sigma-overflow",
    ),  # fmt: skip
    pytest.param(
        [
            "--sampler",
            "euler",
            "--schedule",
            "karras",
            "--sigma-min",
            "1e-300",
            "--sigma-max",
            "1e-299",
        ],
        id="sigma-underflow-nan",
    ),  # fmt: skip
    pytest.param(["--threshold", "dynamic", "--threshold-percentile", "nan"], id="percentile-nan"),
]


@pytest.mark.parametrize("args", REFUSED)
def test_values_that_once_allocated_or_overflowed_exit_2(tmp_path, args):
    if "--sampler" not in args:
        args = ["--sampler", "ddim", *args]
    out = tmp_path / "o.safetensors"
    result = run_cli("run", "--model", "gmm-digits", "--steps", "2", "--num-samples", "2", *args,
                     "-q", "-o", str(out))  # fmt: skip
    _clean(result, out)
