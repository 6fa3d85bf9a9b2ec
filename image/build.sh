#!/bin/sh
# `make image`: build localhost/ztunnel-fast:<version> from ./Containerfile with buildah, on a
# machine that reaches Debian's mirror and PyPI but no container registry.
#
# 1. two base images, once each: `buildah from scratch`, then debootstrap (Debian 12, minbase)
#    into its mount: localhost/ztunnel-fast-base:bookworm (python3 + venv, iptables, ipset,
#    iproute2, libnghttp2: the runtime) and localhost/ztunnel-fast-build-base:bookworm (+ pip, headers, gcc:
#    the build stage).  Debian's python3 is 3.11, the same ABI as python:3.11-slim.
# 2. wheels of every dependency (and the build requirements) downloaded here with the host's pip
#    (its index and certificates), into build/wheels; the Containerfile installs with
#    PIP_NO_INDEX=1 PIP_FIND_LINKS=/src/build/wheels, so no step inside the build needs a network.
# 3. buildah bud with BASE=<that base>; 4. an OCI archive build/ztunnel-fast-<version>.oci.tar;
# 5. the check: `ztunnel-fast version` inside the image reports the native engine as built.
set -eu

PY=${PY:-.venv/bin/python}
VERSION=$($PY -c 'import ztunnel_fast; print(ztunnel_fast.__version__)')
IMAGE=localhost/ztunnel-fast:$VERSION
BASE=${BASE:-localhost/ztunnel-fast-base:bookworm}
BUILD_BASE=${BUILD_BASE:-localhost/ztunnel-fast-build-base:bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
# runtime: what python:3.11-slim has that we use, and the redirection tools; build: + compiler.
BASE_PKGS=python3,python3-venv,iptables,ipset,iproute2,ca-certificates,libnghttp2-14
BUILD_BASE_PKGS=$BASE_PKGS,python3-pip,python3-dev,gcc,libc6-dev,libnghttp2-dev
ARCHIVE=build/ztunnel-fast-$VERSION.oci.tar
# chroot: RUN steps without an OCI runtime; crun refuses this machine's hybrid cgroup v1/v2 setup
# ("cgroups in hybrid mode not supported").  ISOLATION=oci where the runtime works.
ISOLATION=${ISOLATION:-chroot}

log() { echo "image: $*"; }

# make_base IMAGE PACKAGES: a Debian 12 minbase root filesystem with PACKAGES, as an image.
make_base() {
    buildah inspect --type image "$1" >/dev/null 2>&1 && return 0
    log "making base image $1 from Debian packages (debootstrap, a few minutes)"
    ctr=$(buildah from scratch)
    trap 'buildah umount "$ctr" >/dev/null 2>&1; buildah rm "$ctr" >/dev/null 2>&1' EXIT
    mnt=$(buildah mount "$ctr")
    debootstrap --variant=minbase --include="$2" bookworm "$mnt" "$MIRROR" >build/debootstrap.log 2>&1 \
        || { tail -20 build/debootstrap.log; exit 1; }
    # What a base image leaves out: package lists, caches, logs.
    rm -rf "$mnt"/var/lib/apt/lists/* "$mnt"/var/cache/apt/*.bin "$mnt"/var/cache/apt/archives/*.deb \
        "$mnt"/var/log/* "$mnt"/tmp/*
    buildah umount "$ctr" >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env LANG=C.UTF-8 --cmd /bin/sh "$ctr"
    buildah commit --rm -q "$ctr" "$1" >/dev/null
    trap - EXIT
}

mkdir -p build
make_base "$BUILD_BASE" "$BUILD_BASE_PKGS"
make_base "$BASE" "$BASE_PKGS"

log "downloading wheels into build/wheels"
mkdir -p build/wheels
$PY - >build/requirements-image.txt <<'PYEOF'
import importlib.metadata as m
for req in m.requires("ztunnel-fast") or []:
    if "extra ==" not in req:
        print(req)
PYEOF
# (sdists too: python-iptables publishes no wheel; the Containerfile's build stage builds it)
if ! $PY -m pip download -q -d build/wheels -c constraints.txt \
        -r build/requirements-image.txt setuptools wheel Cython 2>build/pip-download.log; then
    grep -v "^WARNING: Location" build/pip-download.log; exit 1
fi

log "building $IMAGE"
previous=$(buildah inspect --type image --format "{{.FromImageID}}" "$IMAGE" 2>/dev/null || true)
buildah bud -q --isolation "$ISOLATION" --network host --layers=false -f Containerfile \
    --build-arg BASE="$BASE" --build-arg BUILD_BASE="$BUILD_BASE" --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/src/build/wheels \
    -t "$IMAGE" . >/dev/null

# The image the tag named before is now untagged: remove it (only that one).
current=$(buildah inspect --type image --format "{{.FromImageID}}" "$IMAGE")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then buildah rmi "$previous" >/dev/null 2>&1 || true; fi
rm -f "$ARCHIVE"
buildah push -q "$IMAGE" "oci-archive:$ARCHIVE:$IMAGE" >/dev/null
log "wrote $ARCHIVE"

check=$(buildah from -q "$IMAGE")
out=$(buildah run --isolation "$ISOLATION" "$check" -- ztunnel-fast version 2>&1) || { echo "$out"; buildah rm "$check" >/dev/null; exit 1; }
buildah rm "$check" >/dev/null
echo "$out"
case "$out" in
    *"native engine: built"*) log "ok: $IMAGE runs, native engine built in" ;;
    *) log "FAILED: the native engine is not built into the image"; exit 1 ;;
esac
