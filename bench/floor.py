"""The CPU floor of a TLS proxy pair on this machine: what the plain relay pair costs per GB (the
`relay` / `relaycopy` setups, bench/relay.py) plus the AEAD work every byte needs on the way.

  floor (s/GB) = relay pair CPU/GB (measured in the bench topology, /proc, like the proxies)
               + encrypt once (client proxy) + decrypt once (server proxy) per GB, on this CPU

The crypto share is measured here, in the bench process, with `cryptography`'s AESGCM on whole TLS
records (16 KiB plaintext, a fresh output buffer per record as a TLS library writes into its
output buffer) and thread CPU time; best of a few repeats (the machine is shared).  Both ciphers
ztunnel allows are measured: TLS_AES_256_GCM_SHA384 (ztunnel's first choice, what two ztunnel-fast
proxies negotiate) and TLS_AES_128_GCM_SHA256 (what BoringSSL, i.e. the Envoy pair, prefers).  The
`floor` column uses AES-128-GCM: the cheapest cipher a compliant pair can negotiate, so nothing
below it is reachable by any user-space TLS proxy pair here.

Pure except `measure_crypto` (CPU work, no I/O).  Derived records carry `derived: True` and only
the metrics they can state (CPU/GB on each topology); everything else is None.
"""

from __future__ import annotations

import os
import time

RECORD = 16 * 1024  # TLS 1.3 maximum plaintext per record
GB = 1e9
CIPHERS = {"AES-128-GCM": 16, "AES-256-GCM": 32}  # name -> key bytes
FLOOR_CIPHER = "AES-128-GCM"
DERIVED = {"floor": "relay", "floorcopy": "relaycopy"}  # derived setup -> the relay setup it adds crypto to
CPU_KEYS = ("cpu_per_gb", "cpu_per_gb_t2")


def per_gb(cpu_seconds: float, nbytes: int) -> float:
    """CPU seconds per 10^9 bytes."""
    if nbytes <= 0:
        raise ValueError("no bytes")
    return cpu_seconds * GB / nbytes


def pair_crypto(cost: dict) -> float:
    """s/GB of AEAD work for the pair: each payload byte encrypted once (client side) and decrypted
    once (server side)."""
    return cost["encrypt_s_per_gb"] + cost["decrypt_s_per_gb"]


def floor_per_gb(relay_s_per_gb: float | None, crypto_s_per_gb: float | None) -> float | None:
    if relay_s_per_gb is None or crypto_s_per_gb is None:
        return None
    return relay_s_per_gb + crypto_s_per_gb


def measure_crypto(total_bytes: int = 256 << 20, repeats: int = 3, record: int = RECORD) -> dict:
    """{cipher: {encrypt_s_per_gb, decrypt_s_per_gb, pair_s_per_gb}} on this CPU, best of `repeats`."""
    from cryptography.hazmat.backends.openssl.backend import backend
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    n = max(1, total_bytes // record)
    plain = os.urandom(record)
    out: dict = {"record_bytes": record, "bytes_per_repeat": n * record, "repeats": repeats,
                 "tool": f"cryptography AESGCM ({backend.openssl_version_text()}), thread CPU time"}
    for name, key_len in CIPHERS.items():
        aead = AESGCM(os.urandom(key_len))
        nonce = os.urandom(12)
        sealed = aead.encrypt(nonce, plain, None)
        best_enc = best_dec = float("inf")
        for _ in range(repeats):
            t = time.thread_time()
            for _ in range(n):
                aead.encrypt(nonce, plain, None)
            best_enc = min(best_enc, time.thread_time() - t)
            t = time.thread_time()
            for _ in range(n):
                aead.decrypt(nonce, sealed, None)
            best_dec = min(best_dec, time.thread_time() - t)
        cost = {"encrypt_s_per_gb": round(per_gb(best_enc, n * record), 4),
                "decrypt_s_per_gb": round(per_gb(best_dec, n * record), 4)}
        cost["pair_s_per_gb"] = round(pair_crypto(cost), 4)
        out[name] = cost
    return out


def derived_setups(setups: dict, crypto: dict | None) -> dict:
    """The `floor` records (relay + AES-128-GCM, relaycopy + AES-128-GCM) for the relay setups
    present with metrics; {} without crypto figures."""
    if not crypto or FLOOR_CIPHER not in crypto:
        return {}
    extra = pair_crypto(crypto[FLOOR_CIPHER])
    out = {}
    for name, base in DERIVED.items():
        rec = setups.get(base)
        if not rec or not rec.get("metrics"):
            continue
        metrics = {k: None for k in rec["metrics"]}
        for key in CPU_KEYS:
            metrics[key] = floor_per_gb(rec["metrics"].get(key), extra)
        out[name] = {
            "label": f"floor = {base} CPU/GB + {FLOOR_CIPHER} encrypt + decrypt ({extra:.3f} s/GB)",
            "available": True, "reason": None, "derived": True, "raw": {}, "errors": {}, "retried": {},
            "info": {"from": base, "cipher": FLOOR_CIPHER, "crypto_s_per_gb": round(extra, 4)},
            "metrics": metrics,
        }
    return out


def crypto_note(crypto: dict | None) -> str | None:
    """One line for under the table: the AEAD cost per cipher."""
    if not crypto:
        return None
    parts = [f"{name} encrypt {c['encrypt_s_per_gb']:.3f} + decrypt {c['decrypt_s_per_gb']:.3f} = "
             f"{c['pair_s_per_gb']:.3f} s/GB" for name, c in crypto.items() if name in CIPHERS]
    return (f"crypto per GB on this CPU ({crypto.get('tool')}, {crypto.get('record_bytes', 0) // 1024} KiB records, "
            f"best of {crypto.get('repeats')}): " + "; ".join(parts)
            + f"; floor columns use {FLOOR_CIPHER} (the Envoy pair's; ztunnel-fast pairs negotiate AES-256-GCM, "
            "ztunnel's first choice)")
