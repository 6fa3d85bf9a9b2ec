"""HBONE: HTTP/2 CONNECT over mutual TLS on port 15008.

`headers` holds the pure request/response rules, `connection` the HTTP/2 state of one TLS
connection (sans-IO core plus its asyncio driver), `pool` the client-side connection pool.
"""
