"""ztunnel-fast: a per-node zero-trust tunnel for Istio ambient mesh.

A thin control layer (asyncio on uvloop) decides and sets up tunnels; an engine (Cython, or its
pure-Python twin) moves the bytes.  See ARCHITECTURE.md for the runtime model.
"""

__version__ = "0.1.0"
