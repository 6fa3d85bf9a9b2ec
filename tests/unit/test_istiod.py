"""istiod connection rules shared by the xDS and CA clients (no network)."""

import pytest

from ztunnel_fast import istiod
from ztunnel_fast.config import IstiodEndpoint
from ztunnel_fast.errors import ConfigError

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def test_roots_from_file_inline_and_system(tmp_path):
    root = tmp_path / "root-cert.pem"
    root.write_text(PEM)
    assert istiod.resolve_roots(IstiodEndpoint("https://i:15012", root_ca=str(root)), "XDS_ROOT_CA") == PEM.encode()
    assert istiod.resolve_roots(IstiodEndpoint("https://i:15012", root_ca=PEM), "XDS_ROOT_CA") == PEM.encode()
    assert istiod.resolve_roots(IstiodEndpoint("https://i:15012", root_ca="SYSTEM"), "XDS_ROOT_CA") is None
    with pytest.raises(ConfigError, match="CA_ROOT_CA.*cannot read"):
        istiod.resolve_roots(IstiodEndpoint("https://i:15012", root_ca=str(tmp_path / "missing")), "CA_ROOT_CA")
    (tmp_path / "junk").write_text("hello")
    with pytest.raises(ConfigError, match="no PEM"):
        istiod.resolve_roots(IstiodEndpoint("https://i:15012", root_ca=str(tmp_path / "junk")), "CA_ROOT_CA")


def test_fingerprint_follows_the_file(tmp_path):
    root = tmp_path / "root-cert.pem"
    root.write_text(PEM)
    ep = IstiodEndpoint("https://i:15012", root_ca=str(root))
    first = istiod.roots_fingerprint(ep)
    root.write_text(PEM + PEM)
    assert first and istiod.roots_fingerprint(ep) not in ("", first)
    root.unlink()
    assert istiod.roots_fingerprint(ep) == ""


def test_token_file_is_reread_and_literal_allowed(tmp_path):
    token = tmp_path / "istio-token"
    token.write_text("jwt-1\n")
    assert istiod.read_token(str(token)) == "jwt-1"
    token.write_text("jwt-2")
    assert istiod.read_token(str(token)) == "jwt-2"  # rotated by the kubelet: never cached
    assert istiod.read_token("literal-token") == "literal-token"


def test_call_metadata_order_and_names():
    ep = IstiodEndpoint("https://i:15012", headers=(("x-tenant", "a"),))
    assert istiod.call_metadata(ep, "jwt", "Kubernetes") == (
        ("authorization", "Bearer jwt"), ("clusterid", "Kubernetes"), ("x-tenant", "a"))
    assert istiod.call_metadata(ep, None, "c1")[0] == ("clusterid", "c1")


def test_channel_options_carry_the_server_name():
    opts = dict(istiod.channel_options(IstiodEndpoint("https://10.0.0.1:15012", server_name="istiod.istio-system.svc")))
    assert opts["grpc.ssl_target_name_override"] == "istiod.istio-system.svc"
    assert opts["grpc.keepalive_time_ms"] == 30_000 and opts["grpc.keepalive_timeout_ms"] == 10_000
