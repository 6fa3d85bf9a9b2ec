"""The one place that reaches into pyOpenSSL's and cryptography's private parts.

The native engine moves TLS records with SSL_read/SSL_write on the very SSL* that pyOpenSSL
handshook, using cryptography's bundled OpenSSL (the only OpenSSL on the data path: nothing is
linked against the system's libssl).  That needs two private things:

- `OpenSSL._util.lib` / `ffi` (cryptography's cffi bindings): the addresses of the functions;
- `SSL.Connection._ssl`: the connection's SSL*.

Both are checked when this module is imported; anything unexpected raises ImportError with the
reason, so the engine falls back to the pure twin (ZTUNNEL_ENGINE=auto) or refuses to start
(ZTUNNEL_ENGINE=native) instead of crashing later.  Tested with pyOpenSSL 26.x and cryptography
46-50 (OpenSSL 3.x/4.x bundled).
"""

from __future__ import annotations

try:
    import cryptography
    import OpenSSL
    from OpenSSL import SSL
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib
except Exception as exc:  # noqa: BLE001 - any failure means "no native TLS path"
    raise ImportError(f"native TLS bridge unavailable: cannot import pyOpenSSL internals: {exc}") from None

TESTED = {"pyOpenSSL": ("26.",), "cryptography": ("46.", "47.", "48.", "49.", "50.")}

_FUNCTIONS = ("SSL_read", "SSL_write", "SSL_get_error", "SSL_shutdown", "ERR_clear_error", "ERR_get_error",
              "ERR_reason_error_string")
_MODES = ("SSL_MODE_ENABLE_PARTIAL_WRITE", "SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER")
# Optional: memory BIOs, so that the engine batches TLS records (one recv()/send() per batch instead
# of one read()/write() per record).  The worker swaps them in for the socket BIO at adoption, and a
# read-only one over each received batch (SSL_set_bio: the SSL* owns and frees them; pyOpenSSL
# keeps no BIO of a socket-backed Connection).
_BIO_FUNCTIONS = ("BIO_new", "BIO_s_mem", "BIO_read", "SSL_set_bio", "BIO_set_mem_eof_return", "BIO_free",
                  "BIO_new_mem_buf")


def _address(name: str) -> int:
    fn = getattr(_lib, name, None)
    if fn is None:
        raise ImportError(f"native TLS bridge unavailable: cryptography's OpenSSL bindings lack {name}")
    try:
        addr = int(_ffi.cast("uintptr_t", _ffi.cast("void *", fn)))
    except Exception as exc:  # noqa: BLE001
        raise ImportError(f"native TLS bridge unavailable: no address for {name}: {exc}") from None
    if not addr:
        raise ImportError(f"native TLS bridge unavailable: {name} has a null address")
    return addr


def _check() -> dict[str, int]:
    for mod, prefixes in (("pyOpenSSL", TESTED["pyOpenSSL"]), ("cryptography", TESTED["cryptography"])):
        version = OpenSSL.__version__ if mod == "pyOpenSSL" else cryptography.__version__
        if not version.startswith(prefixes):
            raise ImportError(f"native TLS bridge unavailable: {mod} {version} is untested "
                              f"(tested: {', '.join(p + 'x' for p in prefixes)})")
    addrs = {name: _address(name) for name in _FUNCTIONS}
    for mode in _MODES:
        if not isinstance(getattr(_lib, mode, None), int):
            raise ImportError(f"native TLS bridge unavailable: {mode} missing")  # noqa: TRY004 - import-time check
    return addrs


def _optional() -> dict[str, int]:
    """The memory BIO functions, all or none (bindings lacking one: the engine keeps socket BIOs)."""
    try:
        return {name: _address(name) for name in _BIO_FUNCTIONS}
    except ImportError:
        return {}


ADDRESSES = _check()
BIO_ADDRESSES = _optional()
OPENSSL_VERSION = _ffi.string(_lib.OpenSSL_version(0)).decode("ascii", "replace")


def functions() -> tuple[int, ...]:
    """Function addresses in the order _splice.set_ssl_functions takes them: the required ones,
    then the memory BIO ones (0 when the bindings lack any of them)."""
    return tuple(ADDRESSES[name] for name in _FUNCTIONS) + tuple(BIO_ADDRESSES.get(n, 0) for n in _BIO_FUNCTIONS)


def ssl_pointer(conn: SSL.Connection) -> int:
    """The SSL* of a handshaken pyOpenSSL connection, with the write modes the engine relies on.

    The caller keeps `conn` alive for as long as the engine uses the pointer (pyOpenSSL frees the
    SSL* when the Connection is collected), and never calls into `conn` meanwhile.
    """
    ssl = getattr(conn, "_ssl", None)
    if ssl is None or not isinstance(ssl, _ffi.CData):
        raise TypeError("not a pyOpenSSL SSL.Connection (no _ssl)")
    _lib.SSL_set_mode(ssl, _lib.SSL_MODE_ENABLE_PARTIAL_WRITE | _lib.SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER)
    ptr = int(_ffi.cast("uintptr_t", ssl))
    if not ptr:
        raise TypeError("pyOpenSSL connection has a null SSL*")
    return ptr


def _self_test() -> None:
    """A connection's _ssl must be a cdata SSL* (checked once, on a throwaway connection)."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    conn = SSL.Connection(ctx, None)
    ssl = getattr(conn, "_ssl", None)
    if ssl is None or _ffi.typeof(ssl).cname != "SSL *":
        raise ImportError("native TLS bridge unavailable: pyOpenSSL Connection._ssl is not an SSL*")


_self_test()
