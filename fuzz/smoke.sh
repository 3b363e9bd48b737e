#!/usr/bin/env bash
# Fuzz smoke run: installs cargo-fuzz if missing, builds every target, runs each one for
# FUZZ_SECONDS (default 60) on a scratch copy of its corpus, and exits non-zero on a crash, a
# timeout or running out of memory (libFuzzer leaves the input in fuzz/artifacts/<target>/).
#
# Stable Rust is enough: without a sanitizer (-s none) cargo-fuzz passes no -Z flag. Targets
# build in release mode with debug assertions and overflow checks (-a).
set -euo pipefail
cd "$(dirname "$0")"

seconds="${FUZZ_SECONDS:-60}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$(cd .. && pwd)/target/fuzz}"
flags=(-s none -a)
start=$SECONDS
phase() { printf '== %s (%ss so far)\n' "$*" "$((SECONDS - start))"; }

phase "cargo-fuzz"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --version 0.13.2 --locked

phase "build"
cargo fuzz build "${flags[@]}"

for target in $(cargo fuzz list); do
  phase "run $target for ${seconds}s"
  # New inputs go to the scratch directory (the first one), so the checked-in corpus stays as is.
  work="$CARGO_TARGET_DIR/smoke-corpus/$target"
  rm -rf "$work"
  mkdir -p "$work"
  cargo fuzz run "${flags[@]}" "$target" "$work" "corpus/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=1024 -print_final_stats=1
done
phase "done: no crash"
