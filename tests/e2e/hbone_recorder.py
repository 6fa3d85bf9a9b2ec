"""An independent HBONE server for the e2e tests (stdlib ssl, hyper-h2), run inside a pod:
`python -m tests.e2e.hbone_recorder --chain PEM --key PEM --out FILE --count N [--timeout S]`.

It listens on 0.0.0.0:15008 and [::]:15008 (dual stack), answers every CONNECT 200, echoes the
stream's bytes back and ends the stream when the client does; each request's header fields, as
the peer decodes them, go to --out as one JSON line ({"headers": [[name, value], ...]}).  It exits
once N requests have been recorded and their streams ended, or after --timeout seconds; every
socket is closed before it exits (the clients' connections too, within a second)."""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import ssl
import threading
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions


def _serve(sock: ssl.SSLSocket, record, done, stop: threading.Event, deadline: float) -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    sock.settimeout(1.0)
    try:
        while time.monotonic() < deadline and not stop.is_set():
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                return
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    record(ev.headers)
                    conn.send_headers(ev.stream_id, [(":status", "200")])
                elif isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    if ev.data:
                        conn.send_data(ev.stream_id, ev.data)  # small payloads: within the windows
                elif isinstance(ev, h2.events.StreamEnded):
                    conn.end_stream(ev.stream_id)
                    done()
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    sock.sendall(conn.data_to_send())
                    return
            sock.sendall(conn.data_to_send())
    except (OSError, h2.exceptions.ProtocolError):
        return
    finally:
        sock.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--chain", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args()
    deadline = time.monotonic() + args.timeout
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.chain, args.key)
    ctx.set_alpn_protocols(["h2"])
    lock = threading.Lock()
    ended = [0]
    out = open(args.out, "a")

    def record(headers) -> None:
        with lock:
            out.write(json.dumps({"headers": [[n, v] for n, v in headers]}) + "\n")
            out.flush()

    def done() -> None:
        with lock:
            ended[0] += 1

    listeners = []
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, 15008))
        s.listen(64)
        listeners.append(s)
    threads = []
    stop = threading.Event()
    with selectors.DefaultSelector() as sel:
        for s in listeners:
            sel.register(s, selectors.EVENT_READ)
        print(json.dumps({"listening": 15008}), flush=True)
        try:
            while time.monotonic() < deadline and ended[0] < args.count:
                for key, _ in sel.select(0.2):
                    raw, _ = key.fileobj.accept()
                    try:
                        raw.settimeout(10)
                        tls = ctx.wrap_socket(raw, server_side=True)
                    except (OSError, ssl.SSLError):
                        raw.close()
                        continue
                    t = threading.Thread(target=_serve, args=(tls, record, done, stop, deadline), daemon=True)
                    t.start()
                    threads.append(t)
        finally:
            for s in listeners:
                s.close()
    stop.set()  # the clients' pooled connections stay open: the serving threads end here
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + 2)
    out.close()
    print(json.dumps({"ended": ended[0]}), flush=True)


if __name__ == "__main__":
    main()
