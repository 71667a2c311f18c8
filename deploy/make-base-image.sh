#!/usr/bin/env bash
# Make a Debian bookworm base image with Python 3.11 locally, for machines that reach a Debian
# mirror but no container registry:
#   sudo deploy/make-base-image.sh [TAG]       (default edgevl-base:bookworm; needs debootstrap)
#   docker build --network host --build-arg BASE_IMAGE=edgevl-base:bookworm -f deploy/Dockerfile -t edgevl .
# The image trusts what this host trusts (its extra CA certificates are installed in it), so a
# build behind a TLS-inspecting proxy can still reach the package index. Skipped if TAG exists.
set -euo pipefail
TAG="${1:-edgevl-base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
if docker image inspect "$TAG" >/dev/null 2>&1; then
  echo "$TAG exists"
  exit 0
fi
ROOT="$(mktemp -d)"
trap 'rm -rf "$ROOT"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$ROOT" "$MIRROR" >&2
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
  chroot "$ROOT" update-ca-certificates >&2
fi
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*
tar -C "$ROOT" -c . | docker import -c 'CMD ["python3"]' - "$TAG"
echo "$TAG made"
