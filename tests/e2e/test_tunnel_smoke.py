import pytest


@pytest.mark.e2e
def test_smoke(lab):
    a = lab.pod("sleep", namespace="demo")
    b = lab.pod("httpbin", namespace="demo")
    lab.write_config()
    lab.app(b, "serve", "80", "echo", port=80)
    za = lab.start_ztunnel(a)
    zb = lab.start_ztunnel(b, redirect=False)
    out = lab.client(a, "echo", b.ip, "80", "--size", "1024")
    print(za.log()); print(zb.log())
    assert out["ok"], out
