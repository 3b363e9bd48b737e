#!/usr/bin/env bash
# Every test of the workspace: host (x86_64 or aarch64), aarch64 under qemu-user, the scalar
# backend, and the no_std core builds. The only CI entry point (.ci/run calls it); run it locally too.
set -euo pipefail
cd "$(dirname "$0")"

step() { printf '\n== %s\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

step "tools (idempotent)"
need=()
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v arm-linux-gnueabihf-gcc >/dev/null || need+=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
# Mender client and artifact tool: the Update Module tests (tests/integration/mender.rs).
command -v mender >/dev/null || need+=(mender-client)
command -v mender-artifact >/dev/null || need+=(mender-artifact)
if [ ${#need[@]} -gt 0 ]; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
# The Mender tests run (as root: they install the Update Module into /usr/share/mender/modules/v3).
export BITDELTA_REQUIRE_MENDER=1
installed=$(rustup target list --installed)
for t in aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf thumbv7em-none-eabihf aarch64-unknown-none; do
  grep -qx "$t" <<<"$installed" || rustup target add "$t"
done
rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed | grep -q '^clippy' || rustup component add clippy
# onnxruntime, numpy, pillow, onnx: the independent references (tests/data/*.py).
python3 -c 'import onnxruntime, numpy, PIL, onnx' 2>/dev/null ||
  python3 -m pip install -q onnxruntime numpy pillow onnx ||
  python3 -m pip install -q --break-system-packages onnxruntime numpy pillow onnx
export BITDELTA_REQUIRE_ORT=1
# The field family and the zoo (../shared/fixtures) beside the checkout, as CI lays them out.
if [ -d ../shared/fixtures ]; then export BITDELTA_REQUIRE_FIXTURES=1; fi

export PROPTEST_CASES="${PROPTEST_CASES:-512}"

step "format"
cargo fmt --all -- --check

step "host tests (runtime, CLI, integration on models/species)"
cargo test --workspace

step "clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "scalar backend (--cfg bitdelta_backend=\"scalar\")"
RUSTFLAGS="${RUSTFLAGS:-} --cfg bitdelta_backend=\"scalar\"" CARGO_TARGET_DIR=target/scalar \
  cargo test -p bitdelta --lib

step "aarch64 under qemu-user (NEON kernels against the scalar oracle)"
cargo test -p bitdelta --lib --target aarch64-unknown-linux-gnu

step "aarch64 CLI under qemu-user (NEON reported, same bytes as x86, species right, in-place switches equal tract)"
# The zoo switches (MobileNetV3, ConvNeXt, ViT) run where ../shared/fixtures is beside the checkout.
BITDELTA_RUNNER="qemu-aarch64 -cpu cortex-a72 -L /usr/aarch64-linux-gnu" \
  cargo test -p bitdelta-cli --target aarch64-unknown-linux-gnu --test integration -- \
  golden:: cli::info_reports_the_kernel_backend cli::every_command_has_help \
  serve::serve_alternating_variants_answers_what_tract_gives_on_the_applied_models \
  switching::zoo_mobilenet_v3_small switching::zoo_convnext_atto switching::zoo_vit_tiny_d6

step "armv7 (32-bit Pi OS) under qemu-arm: scalar kernels, format, streaming decoder"
PROPTEST_CASES=64 cargo test -p bitdelta --lib --target armv7-unknown-linux-gnueabihf

step "no_std core (format, kernels, streaming decoder)"
cargo build -p bitdelta --no-default-features --target thumbv7em-none-eabihf
cargo build -p bitdelta --no-default-features --target aarch64-unknown-none
cargo test -p bitdelta --lib --no-default-features
# The apply-only library (no prost, ed25519, serde_json, safetensors): builds and lints clean.
cargo clippy -p bitdelta --no-default-features --features apply -- -D warnings

step "fuzz smoke (cargo-fuzz on stable: parse and stream targets, 30 s each)"
FUZZ_SECONDS="${FUZZ_SECONDS:-30}" CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}/fuzz" fuzz/smoke.sh

step "all green"
