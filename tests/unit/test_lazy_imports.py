"""Idle memory: what a mode does not use is not imported.  A local-config instance loads neither
grpcio nor protobuf nor the xDS/CA/in-pod/fake/demo modules (they cost ~20 MiB of RSS); the
xDS client imports them when XDS_ADDRESS configures it (app.App._start_xds).  No mode loads
aiohttp or its stack (~9 MiB): the operator endpoints are served by admin/http.py on h11.  An
xDS-mode instance does not load PyYAML (~1 MiB): only parsing a local config file does; nor
xds-protos' Envoy messages (~0.9 MiB): the xDS client uses protos/discovery.proto's cut of them."""

from __future__ import annotations

import json
import subprocess
import sys

NOT_FOR_LOCAL_MODE = ("grpc", "google.protobuf", "ztunnel_fast.xds.client", "ztunnel_fast.xds.delta",
                      "ztunnel_fast.xds.convert", "ztunnel_fast.identity.istiod_ca", "ztunnel_fast.istiod",
                      "ztunnel_fast.inpod", "ztunnel_fast.fakes", "ztunnel_fast.demo", "ztunnel_fast.protos",
                      "ztunnel_fast.redirect")


HEAVY_HTTP = ("aiohttp", "multidict", "yarl", "frozenlist", "aiosignal", "aiohappyeyeballs", "propcache")


def _under(mods: set[str], prefixes) -> list[str]:
    return sorted(m for m in mods if any(m == p or m.startswith(p + ".") for p in prefixes))


def loaded_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_the_run_command_and_the_app_import_no_grpc_protobuf_or_xds():
    mods = loaded_after("import ztunnel_fast.cli, ztunnel_fast.app, ztunnel_fast.engine.native")
    unexpected = sorted(m for m in mods if any(m == p or m.startswith(p + ".") for p in NOT_FOR_LOCAL_MODE))
    assert unexpected == []


def test_an_xds_mode_instance_does_not_load_pyyaml_or_envoys_protos():
    mods = loaded_after("import ztunnel_fast.cli, ztunnel_fast.app, ztunnel_fast.engine.native\n"
                        "from ztunnel_fast.xds.client import XdsClient\n"
                        "from ztunnel_fast.identity.istiod_ca import IstiodCA")
    assert _under(mods, ("yaml", "ztunnel_fast.xds.strict_yaml", "ztunnel_fast.redirect")) == []
    # the delta xDS messages are protos/discovery.proto's; xds-protos' envoy.* (with its annotation
    # and descriptor.proto dependencies, ~0.9 MiB) is for the fake istiod only
    assert _under(mods, ("envoy", "udpa", "validate", "xds", "google.protobuf.descriptor_pb2")) == []
    assert "ztunnel_fast.protos.discovery_pb2" in mods


def test_parsing_a_local_config_loads_the_strict_yaml_reader():
    mods = loaded_after("from ztunnel_fast.xds.local import parse_local_config\n"
                        "parse_local_config('workloads: []', 'test')")
    assert "yaml" in mods and "ztunnel_fast.xds.strict_yaml" in mods


def test_the_xds_client_still_imports_what_it_needs():
    mods = loaded_after("import ztunnel_fast.app\nfrom ztunnel_fast.xds.client import XdsClient")
    assert "grpc" in mods and "ztunnel_fast.xds.delta" in mods


def test_no_mode_loads_aiohttp_the_operator_endpoints_run_on_h11():
    mods = loaded_after("import ztunnel_fast.cli, ztunnel_fast.app, ztunnel_fast.engine.native\n"
                        "from ztunnel_fast.xds.client import XdsClient\n"
                        "from ztunnel_fast.identity.istiod_ca import IstiodCA\n"
                        "from ztunnel_fast.inpod.workloadmanager import WorkloadManager")
    assert _under(mods, HEAVY_HTTP) == []
    assert "h11" in mods and "ztunnel_fast.admin.http" in mods


def test_the_redirect_group_loads_when_used():
    mods = loaded_after("from click.testing import CliRunner\nfrom ztunnel_fast.cli import main\n"
                        "r = CliRunner().invoke(main, ['redirect', '--help'])\n"
                        "assert r.exit_code == 0 and 'install' in r.output, r.output")
    assert "ztunnel_fast.redirect.cli" in mods


def test_malloc_trim_is_found_without_ctypes_util():
    mods = loaded_after("from ztunnel_fast import limits\n"
                        "assert limits.release_free_memory() in (True, False) and limits._malloc_trim")
    assert "ctypes.util" not in mods


def test_malloc_trim_comes_from_the_native_engine_without_ctypes():
    from ztunnel_fast.engine import native_available

    ok, why = native_available()
    assert ok, f"native engine not built: {why}"  # make test builds it; without it this file cannot say
    mods = loaded_after("from ztunnel_fast import limits, _splice\n"
                        "assert limits.release_free_memory() in (True, False)\n"
                        "assert limits._malloc_trim is _splice.malloc_trim")
    assert "ctypes" not in mods


def test_malloc_trim_falls_back_to_ctypes_without_the_native_engine():
    mods = loaded_after("import sys\nsys.modules['ztunnel_fast._splice'] = None  # as if not built\n"
                        "from ztunnel_fast import limits\n"
                        "assert limits.release_free_memory() in (True, False) and limits._malloc_trim")
    assert "ctypes" in mods and "ctypes.util" not in mods


def _entry(args: list[str], env: dict[str, str]) -> tuple[int, str, list[str]]:
    """Run ztunnel_fast.entry.main(args) in a fresh interpreter: (exit status, stderr, modules)."""
    code = ("import sys, json, atexit\n"
            "atexit.register(lambda: print(json.dumps(sorted(sys.modules))))\n"
            f"from ztunnel_fast.entry import main\nmain({args!r})\n")
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env})
    return cp.returncode, cp.stderr, json.loads(cp.stdout.splitlines()[-1])


def test_run_without_flags_does_not_load_click_and_fails_alike():
    # the chart's `ztunnel-fast run`: environment only, no click; same validation and error line
    status, err, mods = _entry(["run"], {"PROXY_MODE": "sideways"})
    assert status == 2 and err == "ztunnel-fast: error: PROXY_MODE: invalid value 'sideways'; accepted: shared, dedicated\n"
    assert "click" not in mods
    status2, err2, mods2 = _entry(["run", "--proxy-mode", "sideways"], {})
    assert (status2, err2) == (status, err) and "click" in mods2


PURE_TWIN_H2 = ("h2.connection", "h2.events", "h2.frame_buffer", "hyperframe", "ztunnel_fast.hbone.connection",
                "ztunnel_fast.engine.pure")


def test_the_native_engine_does_not_load_the_pure_twins_h2_stack():
    # hbone/base.py holds what both engines' connections share; hyper-h2's state machine and
    # hyperframe (~0.8 MiB) are the pure twin's, loaded with it
    mods = loaded_after("import ztunnel_fast.cli, ztunnel_fast.app, ztunnel_fast.engine.native\n"
                        "from ztunnel_fast.proxy.fastpath import FastPath\n"
                        "from ztunnel_fast.proxy.fastpath_inbound import InboundFastPath")
    assert _under(mods, PURE_TWIN_H2) == []
    assert "ztunnel_fast.hbone.base" in mods


def test_the_pure_engine_loads_its_h2_stack():
    mods = loaded_after("import ztunnel_fast.app\nfrom ztunnel_fast.engine.pure import PureEngine")
    assert set(PURE_TWIN_H2) - {"hyperframe"} <= mods and "hyperframe.frame" in mods


def test_the_admin_listener_on_localhost_does_not_load_the_idna_codec():
    # admin/http.py hands the name to uvloop as bytes: a str host would import encodings.idna,
    # stringprep and unicodedata (~0.4 MiB) for "localhost"
    mods = loaded_after("import uvloop\nfrom ztunnel_fast.admin.http import App, HttpServer\n"
                        "async def main():\n"
                        "    server = HttpServer(App())\n"
                        "    await server.start('localhost', 0)\n"
                        "    assert server.port > 0\n"
                        "    await server.close()\n"
                        "uvloop.run(main())")
    assert "encodings.idna" not in mods and "unicodedata" not in mods
