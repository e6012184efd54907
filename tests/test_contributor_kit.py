"""The contributor kit: ``new``, ``schema``, `gemma_profiles.testing`, and the example profile pack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from click.testing import CliRunner, Result
from gemma_profiles.hooks.sources import bundled_dir

from gemma_profiles import testing
from gemma_profiles.cli.main import cli
from gemma_profiles.planning.hardware import CpuInfo, GpuInfo, Hardware
from gemma_profiles.planning.new_profile import schema_json, shipped_schema
from gemma_profiles.planning.plan import make_plan
from gemma_profiles.spec.registry import default_registry

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT / "examples" / "profile-pack"
GIB = 2**30
PIP_INSTALL = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"]
CPU = CpuInfo(cores=8, total_memory=31 * GIB, available_memory=28 * GIB, isa=("avx2",), name="Test CPU")
RTX2060 = Hardware(cpu=CPU, gpus=(GpuInfo(0, "NVIDIA GeForce RTX 2060", (7, 5), 6 * GIB),))
P2200 = Hardware(cpu=CPU, gpus=(GpuInfo(0, "Quadro P2200", (6, 1), 5 * GIB),))


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), prog_name="gemma-profile")


# -- gemma-profile new ---------------------------------------------------------------------------


@pytest.mark.parametrize("hardware", [RTX2060, P2200, Hardware(cpu=CPU)], ids=["rtx2060", "p2200", "cpu"])
def test_new_from_detect_validates_and_shows_by_name(hardware: Hardware, fake_hardware, isolated_env: Path):
    fake_hardware(hardware)
    result = invoke("new", "my-rig", "--from-detect")
    assert result.exit_code == 0, result.output
    path = isolated_env / "user-profiles" / "my-rig.yaml"
    assert f"wrote {path}" in result.output and "it validates" in result.output
    assert invoke("validate", str(path)).exit_code == 0
    shown = invoke("show", "my-rig")
    assert shown.exit_code == 0, shown.output
    text = path.read_text()
    assert text.startswith("# yaml-language-server: $schema=file://")
    # the evidence rule: every value line says where it came from
    for line in text.splitlines():
        key = line.split(":", 1)[0].strip()
        if line.strip() and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert key in ("name", "description") or "  # " in line, f"no source for: {line}"


def test_new_for_a_pascal_card_plans_as_auto_does(fake_hardware, isolated_env: Path):
    fake_hardware(P2200)
    assert invoke("new", "p2200", "--from-detect").exit_code == 0
    profile = default_registry().load("p2200")
    data = yaml.safe_load((isolated_env / "user-profiles" / "p2200.yaml").read_text())
    assert data["hardware"]["compute_capability"] == "6.1" and data["hardware"]["gpu"] == ["Quadro P2200"]
    assert make_plan(profile, "2b").dtype == "float16"  # no native bfloat16 on 6.1
    for variant in ("9b", "1b", "4b"):  # Gemma 2/3 overflow float16
        assert make_plan(profile, variant).dtype != "float16", variant
    assert testing.check_profile(isolated_env / "user-profiles" / "p2200.yaml") == []


def test_new_with_extends_writes_a_template(isolated_env: Path):
    result = invoke("new", "lab-box", "--extends", "t4")
    assert result.exit_code == 0, result.output
    data = yaml.safe_load((isolated_env / "user-profiles" / "lab-box.yaml").read_text())
    assert data["name"] == "lab-box" and data["extends"] == "t4"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["new", "My Rig", "--from-detect"], "lower-case letters"),
        (["new", "auto", "--from-detect"], "'auto' is the profile built from detected hardware"),
        (["new", "rig"], "--from-detect describes this machine"),
        (["new", "rig", "--extends", "no-such-base"], "no profile named 'no-such-base'"),
        (["new", "rig", "--from-detect", "-o", "other.yaml"], "must be named rig.yaml"),
    ],
)
def test_new_refuses_with_one_line(args: list[str], message: str):
    result = invoke(*args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_new_never_replaces_a_file_without_force(isolated_env: Path):
    path = isolated_env / "user-profiles" / "rig.yaml"
    path.parent.mkdir(parents=True)
    path.write_text("name: rig\n# mine, do not lose\n")
    result = invoke("new", "rig", "--from-detect")
    assert result.exit_code == 2 and "exists" in result.output and "--force" in result.output
    assert path.read_text() == "name: rig\n# mine, do not lose\n"
    assert invoke("new", "rig", "--from-detect", "--force").exit_code == 0
    assert "mine, do not lose" not in path.read_text()


def test_new_writes_where_o_says(tmp_path: Path):
    target = tmp_path / "rig.yaml"
    result = invoke("new", "rig", "--from-detect", "-o", str(target))
    assert result.exit_code == 0, result.output
    assert target.is_file() and f"gemma-profile show {target}" in result.output


# -- gemma-profile schema ------------------------------------------------------------------------


def test_the_shipped_schema_is_the_generated_one():
    assert shipped_schema().read_text() == schema_json(), (
        "gemma_profiles/spec/profile.schema.json is stale: "
        "gemma-profile schema > gemma_profiles/spec/profile.schema.json"
    )
    result = invoke("schema")
    assert result.exit_code == 0 and json.loads(result.output) == json.loads(schema_json())
    assert invoke("schema", "--path").output.strip() == str(shipped_schema())


@pytest.mark.parametrize("path", testing.pack_files(bundled_dir()), ids=lambda path: path.stem)
def test_every_bundled_profile_validates_against_the_json_schema(path: Path):
    jsonschema.validate(yaml.safe_load(path.read_text()), json.loads(shipped_schema().read_text()))


@pytest.mark.parametrize(
    "document",
    [
        {"name": "x", "config": {"dtyp": "float16"}},  # a misspelt key
        {"name": "x", "quantization": {"weights": "int4"}},  # a value not in the list
        {"name": "Bad Name"},
        {"name": "x", "hardware": {"device": "cuda", "compute_capability": "seven"}},
    ],
)
def test_the_json_schema_catches_what_an_editor_should_underline(document: dict):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, json.loads(shipped_schema().read_text()))


# -- gemma_profiles.testing ----------------------------------------------------------------------


GOOD = """\
    # A test card: compute capability 7.5, 8 GB (made up for this test, with enough words).
    name: {name}
    description: "a test card"
    extends: base-cuda
    hardware: {{device: cuda, compute_capability: "7.5", memory: 8GiB, host_memory: 16GiB}}
    config: {{dtype: float16}}
    quantization: {{weights: int8}}
    variants:
      gemma2: {{config: {{dtype: float32}}}}
      gemma3: {{config: {{dtype: float32}}}}
      7b: {{config: {{dtype: float32}}}}
"""


def test_a_good_profile_has_no_findings(write_profile):
    assert testing.check_profile(write_profile("card", GOOD.format(name="card")), promises={"card": ["2b"]}) == []


@pytest.mark.parametrize(
    ("edit", "finding"),
    [
        (lambda text: text.replace("name: card", "name: other"), "differs from the file name"),
        (lambda text: text.replace('description: "a test card"', ""), "no description"),
        (lambda text: "\n".join(line for line in text.splitlines() if "#" not in line), "no comment saying where"),
        (lambda text: text.replace("dtype: float16", "dtype: bfloat16"), "bfloat16"),
        (lambda text: text.replace("    config: {dtype: float16}\n", ""), "set config.dtype"),
        (
            lambda text: (
                text.replace("      gemma2: {config: {dtype: float32}}\n", "")
                + "    compute: {allow_float16_overflow: true}\n"
            ),
            "float16 compute overflows gemma2",
        ),
    ],
    ids=["name", "description", "evidence", "bf16-on-7.5", "no-dtype", "fp16-gemma2"],
)
def test_each_rule_is_enforced(write_profile, edit, finding: str):
    path = write_profile("card", edit(GOOD.format(name="card")))
    findings = [str(found) for found in testing.check_profile(path)]
    assert any(finding in found for found in findings), findings
    with pytest.raises(AssertionError, match=finding.split()[0]):
        testing.assert_profile_ok(path)


def test_a_promised_variant_must_fit(write_profile):
    path = write_profile("card", GOOD.format(name="card"))
    findings = [str(found) for found in testing.check_profile(path, promises={"card": ["27b"]})]
    assert any("27b is promised but does not fit" in found for found in findings), findings


# -- the example profile pack --------------------------------------------------------------------


@pytest.fixture(scope="module")
def installed_pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example pack pip-installed into a folder of its own (this environment stays as it is)."""
    target = tmp_path_factory.mktemp("pack")
    build = tmp_path_factory.mktemp("pack-src")
    subprocess.run(["cp", "-r", str(PACK) + "/.", str(build)], check=True)  # setuptools writes build/ into it
    process = subprocess.run(
        [*PIP_INSTALL, "--target", str(target), str(build)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if process.returncode != 0:
        pytest.fail(f"pip could not install the example pack: {process.stderr[-2000:]}")
    return target


def _with_pack(target: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), env.get("PYTHONPATH", "")) if p)
    return env


def test_the_installed_pack_adds_its_profiles(installed_pack: Path):
    env = _with_pack(installed_pack)
    listed = subprocess.run(
        [sys.executable, "-m", "gemma_profiles.cli.main", "list", "--json"], env=env, capture_output=True, text=True
    )
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert "rtx2060-6gb" in rows and "example-pack" in json.dumps(rows["rtx2060-6gb"])
    planned = subprocess.run(
        [sys.executable, "-m", "gemma_profiles.cli.main", "plan", "rtx2060-6gb", "--variant", "2b"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert planned.returncode == 0, planned.stdout + planned.stderr
    assert "verdict: fits" in planned.stdout


def test_the_packs_own_tests_pass_with_gemma_profiles_testing(installed_pack: Path):
    process = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(PACK / "tests")],
        env=_with_pack(installed_pack),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stdout[-3000:]
    assert "2 passed" in process.stdout
