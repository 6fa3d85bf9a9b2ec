"""The Containerfile's run-time contract with the chart, checked without building (the build
itself is `make image` / `make image-test`): entry point, root, working directory, no bytecode
writes, and the image name the chart defaults to."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from ztunnel_fast import __version__

ROOT = Path(__file__).resolve().parents[2]


def final_stage() -> list[str]:
    """The instructions of the last stage (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Containerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    last_from = max(i for i, line in enumerate(lines) if line.startswith("FROM "))
    return lines[last_from:]


def test_runtime_stage_contract():
    stage = final_stage()
    entrypoints = [line for line in stage if line.startswith("ENTRYPOINT ")]
    assert len(entrypoints) == 1 and json.loads(entrypoints[0][len("ENTRYPOINT "):]) == ["ztunnel-fast"]
    assert "WORKDIR /" in stage  # ztunnel's relative ./var/run/secrets paths resolve from /
    assert "USER 0:0" in stage   # the chart's runAsUser: 0
    env = " ".join(line for line in stage if line.startswith("ENV "))
    assert "PYTHONDONTWRITEBYTECODE=1" in env  # readOnlyRootFilesystem: true
    assert not [line for line in stage if line.startswith(("CMD ", "VOLUME "))]


def test_the_engine_is_required_in_the_build():
    text = (ROOT / "Containerfile").read_text()
    assert "the native engine was not built into" in text


def test_chart_default_image_is_what_make_image_tags():
    build = (ROOT / "image" / "build.sh").read_text()
    assert "IMAGE=localhost/ztunnel-fast:$VERSION" in build
    values = yaml.safe_load((ROOT / "charts" / "ztunnel-fast" / "values.yaml").read_text())
    chart = yaml.safe_load((ROOT / "charts" / "ztunnel-fast" / "Chart.yaml").read_text())
    assert f"{values['hub']}/{values['image']}:{values['tag'] or chart['appVersion']}" == \
        f"localhost/ztunnel-fast:{__version__}"
