#!/usr/bin/env bash
# Builds the Kryoptic PKCS#11 soft token (libkryoptic_pkcs11.so) for xks-proxy development and tests.
#
#   hsm-config/build-kryoptic.sh [OUT_DIR]
#
# OUT_DIR defaults to target/kryoptic/ in this repository (git-ignored). When
# OUT_DIR/lib/libkryoptic_pkcs11.so already exists nothing is built. The last line on stdout is
# always the absolute path of the module; progress goes to stderr.
#
# Only crates.io is needed: a throwaway cargo project under OUT_DIR/fetch depends on the pinned
# kryoptic crate, `cargo fetch` downloads it, its source is copied to OUT_DIR/src and built there
# with its own lock file and target directory (the repository's Cargo.lock is never touched).
# Missing Debian build dependencies are installed with apt-get.
#
# Features: the crate's default set needs OpenSSL >= 3.2 (EdDSA); Debian 12 ships 3.0, so this
# builds "standard" minus EdDSA, linked dynamically against the system OpenSSL and SQLite.
# Override with KRYOPTIC_FEATURES="..." (then KRYOPTIC_DEFAULT_FEATURES=1 keeps the defaults).
set -euo pipefail

KRYOPTIC_VERSION=1.5.4

die() { echo "build-kryoptic: error: $*" >&2; exit 1; }
log() { echo "build-kryoptic: $*" >&2; }
trap 'rc=$?; [ $rc -eq 0 ] || echo "build-kryoptic: FAILED (exit $rc), see messages above" >&2' EXIT

[ $# -le 1 ] || die "usage: $0 [OUT_DIR]"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
OUT=${1:-$REPO/target/kryoptic}
mkdir -p "$OUT" || die "cannot create $OUT"
OUT=$(cd "$OUT" && pwd)
SO=$OUT/lib/libkryoptic_pkcs11.so

# Fast path: already built.
if [ -f "$SO" ] && [ -f "$OUT/lib/VERSION" ] && [ "$(cat "$OUT/lib/VERSION")" = "$KRYOPTIC_VERSION" ]; then
  echo "$SO"
  exit 0
fi

DEFAULT_FEATURES="minimal,kdf_all,nssdb,kryoptic-lib/dynamic,kryoptic-lib/ec_montgomery,kryoptic-lib/ffdh,kryoptic-lib/hotp,kryoptic-lib/chacha20,kryoptic-lib/ike"
FEATURES=${KRYOPTIC_FEATURES:-$DEFAULT_FEATURES}
FEATURE_ARGS=(--features "$FEATURES")
[ "${KRYOPTIC_DEFAULT_FEATURES:-0}" = 1 ] || FEATURE_ARGS=(--no-default-features "${FEATURE_ARGS[@]}")

# Debian build dependencies (bindgen needs libclang; ossl links libcrypto; rusqlite links libsqlite3).
if command -v dpkg-query >/dev/null; then
  missing=()
  for p in clang libclang-dev libssl-dev libsqlite3-dev pkg-config; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing build dependencies: ${missing[*]}"
    SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2 \
      || die "apt-get install ${missing[*]} failed (try: apt-get update)"
  fi
else
  log "not a Debian system: make sure clang/libclang, OpenSSL and SQLite development files are installed"
fi
command -v cargo >/dev/null || die "cargo not found (install Rust: https://rustup.rs)"

# Fetch the pinned crate from crates.io through a throwaway project.
FETCH=$OUT/fetch
mkdir -p "$FETCH/src"
cat > "$FETCH/Cargo.toml" <<EOF
[package]
name = "kryoptic-fetch"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
kryoptic = "=$KRYOPTIC_VERSION"

[workspace]
EOF
: > "$FETCH/src/lib.rs"
log "fetching kryoptic $KRYOPTIC_VERSION from crates.io"
cargo fetch --manifest-path "$FETCH/Cargo.toml" >&2 || die "cargo fetch of kryoptic $KRYOPTIC_VERSION failed"

CARGO_HOME_DIR=${CARGO_HOME:-$HOME/.cargo}
CRATE_SRC=
for d in "$CARGO_HOME_DIR"/registry/src/*/kryoptic-"$KRYOPTIC_VERSION"; do
  [ -f "$d/Cargo.toml" ] && CRATE_SRC=$d && break
done
[ -n "$CRATE_SRC" ] || die "kryoptic-$KRYOPTIC_VERSION source not found under $CARGO_HOME_DIR/registry/src"

# Copy the source (fresh each time we build) and make it its own workspace root, so cargo does not
# try to attach it to the repository's workspace.
SRC=$OUT/src
rm -rf "$SRC"
cp -R "$CRATE_SRC" "$SRC"
chmod -R u+w "$SRC"
grep -q '^\[workspace\]' "$SRC/Cargo.toml" || printf '\n[workspace]\n' >> "$SRC/Cargo.toml"

LOCKED=()
[ -f "$SRC/Cargo.lock" ] && LOCKED=(--locked)
log "building kryoptic $KRYOPTIC_VERSION (features: $FEATURES); this takes a few minutes"
start=$(date +%s)
CARGO_TARGET_DIR=$OUT/build cargo build --release --manifest-path "$SRC/Cargo.toml" \
  "${LOCKED[@]}" "${FEATURE_ARGS[@]}" >&2 || die "cargo build of kryoptic failed"
log "built in $(( $(date +%s) - start )) s"

BUILT=$OUT/build/release/libkryoptic_pkcs11.so
[ -f "$BUILT" ] || die "build finished but $BUILT is missing"
mkdir -p "$OUT/lib"
cp "$BUILT" "$SO.tmp" && mv "$SO.tmp" "$SO"
echo "$KRYOPTIC_VERSION" > "$OUT/lib/VERSION"
echo "$FEATURES" > "$OUT/lib/FEATURES"
echo "$SO"
