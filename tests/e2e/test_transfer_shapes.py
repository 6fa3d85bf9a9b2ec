"""Transfer shapes through two ztunnel-fast instances (HBONE), both engines, payloads hash-checked.

The native engine batches its byte path (TLS records through memory BIOs, one recv()/send() per
batch, one sendmsg() per parse pass towards the plain socket): these tests pin what must not change
with it.  test_hbone.py already covers 1 KiB, 256 MiB both ways, 1000 short connections, the two
half-close orders at 2-4 MiB and an immediate server reset; here:

- sizes around the TLS record (16 KiB), the batch (256 KiB) and the frame boundaries, 1 byte to 16 MiB,
  and eight concurrent streams on one connection (their DATA frames interleave within a batch);
- half-close with sizes that end mid-record;
- resets in the middle of a large transfer, each way, with batches in flight;
- a reader that stops reading while the writer keeps going: the proxies' memory stays bounded by the
  stream window and fixed buffers (RSS), and every byte arrives once it reads again;
- an independent HBONE client (stdlib ssl + hyper-h2) sending 1-byte TLS records and one sending
  16 KiB records.

Topology: pods sleep (client, ztunnel) and httpbin (server, ztunnel), plus mallory (no ztunnel) for
the independent HBONE client.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from ztunnel_fast.hbone.connection import H2Settings
from ztunnel_fast.identity.ca import LocalCA
from ztunnel_fast.identity.spiffe import Identity

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]  # `python -m tests.e2e.shapes_peer` resolves from here
MiB = 1 << 20
KiB = 1 << 10
RECORD = 16 * KiB  # the largest TLS plaintext record
BATCH = 256 * KiB  # the native engine's recv/send batch
# What a proxy may hold for one stalled stream beyond its stream window: per-connection read and
# write buffers (native: read 320 KiB, output up to 2 MiB, one record batch 320 KiB, two memory
# BIOs 2 x 256 KiB; pure: asyncio transport buffers) plus allocator slack.
FIXED_BUFFERS = 8 * MiB
STALL_PUSH = 256 * MiB  # what the writer tries to push at a reader that stopped


def mesh(lab):
    a = lab.pod("sleep", namespace="demo")
    b = lab.pod("httpbin", namespace="demo")
    lab.write_config()
    lab.app(b, "serve", "80", "echo", port=80)
    za = lab.start_ztunnel(a)
    zb = lab.start_ztunnel(b, redirect=False)
    return a, b, za, zb


def assert_echo(out, size):
    assert out.get("ok"), out
    assert out["received"] == size and out["received_sha256"] == out["sent_sha256"], out


def peer(lab, pod, *args, timeout=120):
    """Run shapes_peer in the pod; its JSON report."""
    res = lab.topology.run(pod.pod, [sys.executable, "-m", "tests.e2e.shapes_peer", *args], cwd=REPO,
                           timeout=timeout, check=False)
    assert res.returncode == 0 and res.stdout.strip(), f"shapes_peer failed:\n{res.stdout}\n{res.stderr}"
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert "exception" not in out, out
    return out


def peer_background(lab, pod, name, *args):
    """Start shapes_peer in the pod; (process, path of its JSON lines)."""
    path = lab.workdir / f"peer-{name}.out"
    with open(path, "wb") as out:
        proc = lab.topology.popen(pod.pod, [sys.executable, "-m", "tests.e2e.shapes_peer", *args], cwd=REPO,
                                  stdout=out, stderr=out)
    return proc, path


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def wait_for(predicate, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def serve(lab, pod, port, *args):
    proc, path = peer_background(lab, pod, f"serve-{port}", "serve", str(port), *args)
    wait_for(lambda: any("listening" in x for x in lines(path)), f"the server on port {port}")
    return proc, path


def final(proc, path, timeout=120):
    proc.wait(timeout=timeout)
    out = lines(path)[-1]
    assert "exception" not in out, out
    return out


def rss(zt) -> int:
    """Resident bytes of a ztunnel-fast process (the python under `ip netns exec`)."""
    pid = zt.proc.pid
    for _ in range(5):
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"ztunnel_fast" in cmd and b"netns" not in cmd:
            break
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if not children:
            break
        pid = int(children[0])
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


# ------------------------------------------------------------------------------------ shapes
SIZES = [1, 2, RECORD - 1, RECORD, RECORD + 1, 3 * RECORD + 7, BATCH - 1, BATCH, BATCH + 1, MiB + 9, 16 * MiB + 3]


def test_sizes_around_records_batches_and_frames(lab):
    a, b, _, _ = mesh(lab)
    for size in SIZES:
        assert_echo(lab.client(a, "echo", b.ip, "80", "--size", str(size)), size)


def test_eight_concurrent_streams_interleave_on_one_connection(lab):
    a, b, _, _ = mesh(lab)
    out = lab.client(a, "echo", b.ip, "80", "--size", str(8 * MiB + 5), "--count", "8", "--concurrency", "8",
                     timeout=300)
    assert out["ok"] == 8 and out["failed"] == 0, out


@pytest.mark.parametrize("size", [1, RECORD + 1, 5 * MiB + 3])
def test_half_close_client_first_mid_record(lab, size):
    a, b, _, _ = mesh(lab)
    assert_echo(lab.client(a, "echo", b.ip, "80", "--size", str(size), "--half-close-first"), size)


# ------------------------------------------------------------------------------------ resets
def test_server_resets_in_the_middle_of_an_upload(lab):
    a, b, za, zb = mesh(lab)
    srv, srv_out = serve(lab, b, 81, "--action", "reset-after", "--size", str(3 * MiB + 1))
    out = peer(lab, a, "send", b.ip, "81", "--size", str(64 * MiB))
    assert final(srv, srv_out)["received"] == 3 * MiB + 1
    # the reset reached the writer before it could push everything (no unbounded buffering either)
    assert out["error"] in ("ConnectionResetError", "BrokenPipeError"), out
    assert out["sent"] < 64 * MiB
    wait_for(lambda: za.lines("failed dur=") and zb.lines("failed dur="), "both ztunnels to log the failed tunnel")
    assert_echo(lab.client(a, "echo", b.ip, "80", "--size", str(MiB)), MiB)  # both still serve


def test_client_resets_in_the_middle_of_a_download(lab):
    a, b, za, zb = mesh(lab)
    srv, srv_out = serve(lab, b, 82, "--action", "send", "--size", str(64 * MiB))
    out = peer(lab, a, "recv-reset", b.ip, "82", "--size", str(3 * MiB + 1))
    assert out == {"received": 3 * MiB + 1, "error": None}
    result = final(srv, srv_out)
    assert result["error"] in ("ConnectionResetError", "BrokenPipeError"), result
    assert result["sent"] < 64 * MiB
    wait_for(lambda: za.lines("failed dur=") and zb.lines("failed dur="), "both ztunnels to log the failed tunnel")
    assert_echo(lab.client(a, "echo", b.ip, "80", "--size", str(MiB)), MiB)


# ------------------------------------------------------------------------------- stalled reader
def test_a_reader_that_stops_reading_keeps_memory_bounded_by_the_window(lab):
    a, b, za, zb = mesh(lab)
    assert_echo(lab.client(a, "echo", b.ip, "80", "--size", str(32 * MiB)), 32 * MiB)  # buffers at their working size
    before = [rss(z) for z in (za, zb)]
    release = lab.workdir / "release"
    srv, srv_out = serve(lab, b, 83, "--action", "stall", "--release", str(release))
    cli, cli_out = peer_background(lab, a, "stalled-writer", "send", b.ip, "83", "--size", str(STALL_PUSH))

    def stalled():
        # the writer's progress (a line per MiB) stopped moving over three looks in a row
        seen = []
        for _ in range(3):
            progress = [x["progress"] for x in lines(cli_out) if "progress" in x]
            seen.append(progress[-1] if progress else 0)
            time.sleep(0.5)
        return seen[0] > 0 and len(set(seen)) == 1 and seen[0]

    pushed = wait_for(stalled, "the writer to stall", timeout=60)
    assert pushed < STALL_PUSH  # backpressure reached the writer: nobody buffered it all
    bound = H2Settings().stream_window + FIXED_BUFFERS
    for z, start in zip((za, zb), before):
        grew = rss(z) - start
        assert grew <= bound, f"{z.pod.name}'s ztunnel grew by {grew} bytes with a stalled reader (bound {bound})"
    release.write_text("go")
    sent = final(cli, cli_out)
    got = final(srv, srv_out)
    assert sent["error"] is None and sent["sent"] == STALL_PUSH, sent
    assert got == {"received": STALL_PUSH, "sha256": sent["sha256"]}


# -------------------------------------------------------------------- an independent HBONE peer
@pytest.mark.parametrize("record_size,size", [(1, 40 * KiB + 3), (RECORD, 8 * MiB + 3)], ids=["1-byte-records", "16k-records"])
def test_independent_peer_with_tiny_and_full_tls_records(lab, record_size, size):
    mallory = lab.pod("mallory", namespace="demo", mesh=False)
    b = lab.pod("httpbin", namespace="demo")
    lab.write_config()
    lab.app(b, "serve", "80", "echo", port=80)
    lab.start_ztunnel(b, redirect=False)
    issued = LocalCA.load(lab.ca_dir).issue(Identity("cluster.local", "demo", "mallory"), 3600)
    certs = lab.workdir / "mallory-certs"
    certs.mkdir()
    (certs / "cert.pem").write_bytes(b"".join(issued.chain_pem))
    (certs / "key.pem").write_bytes(issued.key_pem)
    (certs / "root.pem").write_bytes(issued.root_pem)
    out = peer(lab, mallory, "hbone-echo", "--ip", b.ip, "--root", str(certs / "root.pem"), "--cert-dir", str(certs),
               "--authority", f"{b.ip}:80", "--size", str(size), "--record-size", str(record_size), timeout=300)
    assert out["ok"] and out["received"] == size and out["error"] is None, out
    if record_size == 1:
        assert out["records_sent"] > size  # every byte of the frames in its own record
