"""HBONE: HTTP/2 CONNECT over mutual TLS on port 15008.

`headers` holds the pure request/response rules, `base` what every engine's connection shares
(HTTP/2 settings, connection state, PING timing), `connection` the pure twin's HTTP/2 state of one
TLS connection (hyper-h2's sans-IO core plus its asyncio driver; the native engine never imports
it), `pool` the client-side connection pool.
"""
