"""`make image-test`: the image that `make image` built, as the chart runs it.

Not part of `make test` (building the image takes minutes): run `make image-test`, which builds
it first.  Checks the image configuration the chart relies on (entry point `ztunnel-fast`, root,
working directory /, PYTHONDONTWRITEBYTECODE=1), the OCI archive, and runs `ztunnel-fast` from
the image's root filesystem mounted read-only with /tmp as the only writable place (the chart's
readOnlyRootFilesystem: true plus the tmp emptyDir): the native engine is built in and nothing
needs to be written.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from ztunnel_fast import __version__

ROOT = Path(__file__).resolve().parents[1]
IMAGE = f"localhost/ztunnel-fast:{__version__}"
ARCHIVE = ROOT / "build" / f"ztunnel-fast-{__version__}.oci.tar"


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=300).stdout


@pytest.fixture(scope="module")
def config() -> dict:
    return json.loads(sh("buildah", "inspect", "--type", "image", IMAGE))["OCIv1"]["config"]


def test_entrypoint_user_workdir(config):
    assert config["Entrypoint"] == ["ztunnel-fast"]
    assert config.get("Cmd") in (None, [])  # the chart passes `run`
    assert config["User"] == "0:0"
    assert config["WorkingDir"] == "/"


def test_environment(config):
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PATH"].startswith("/opt/ztunnel-fast/bin:")


def test_oci_archive_names_the_image():
    with tarfile.open(ARCHIVE) as tar:
        index = json.load(tar.extractfile("index.json"))
    refs = [m.get("annotations", {}).get("org.opencontainers.image.ref.name") for m in index["manifests"]]
    assert IMAGE in refs or __version__ in refs, refs


@pytest.fixture(scope="module")
def rootfs():
    ctr = sh("buildah", "from", "-q", IMAGE).strip()
    try:
        yield Path(sh("buildah", "mount", ctr).strip())
    finally:
        subprocess.run(["buildah", "umount", ctr], capture_output=True, timeout=60)
        subprocess.run(["buildah", "rm", ctr], capture_output=True, timeout=60)


def run_read_only(rootfs: Path, *argv: str) -> subprocess.CompletedProcess:
    """argv inside the image's root, mounted read-only in a private mount namespace, with a
    tmpfs on /tmp (the pod's emptyDir) and the image's environment."""
    script = (
        f'mount --bind "{rootfs}" "{rootfs}" && mount -o remount,bind,ro "{rootfs}" && '
        f'mount -t tmpfs tmpfs "{rootfs}/tmp" && '
        f'exec chroot "{rootfs}" /usr/bin/env -i PATH=/opt/ztunnel-fast/bin:/usr/bin:/bin '
        f'PYTHONDONTWRITEBYTECODE=1 sh -c \'cd / && exec "$@"\' - ' + " ".join(argv)
    )
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=120)


def test_runs_on_a_read_only_root_with_the_native_engine(rootfs):
    cp = run_read_only(rootfs, "ztunnel-fast", "version")
    assert cp.returncode == 0, cp.stderr
    assert f"ztunnel-fast {__version__}; native engine: built" in cp.stdout


def test_the_read_only_root_is_really_read_only(rootfs):
    cp = run_read_only(rootfs, "touch", "/opt/ztunnel-fast/probe")
    assert cp.returncode != 0 and "Read-only file system" in cp.stderr
    assert run_read_only(rootfs, "touch", "/tmp/probe").returncode == 0


def test_run_command_and_tools_are_present(rootfs):
    cp = run_read_only(rootfs, "ztunnel-fast", "run", "--help")
    assert cp.returncode == 0 and "ZTUNNEL_REDIRECTION" in cp.stdout, cp.stderr
    for tool in ("ipset", "iptables", "ip"):
        assert run_read_only(rootfs, "sh", "-c", f"command -v {tool}").returncode == 0, tool
