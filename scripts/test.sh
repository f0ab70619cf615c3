#!/usr/bin/env bash
# Runs every passt-rs test: formatting and lints, unit tests, integration tests in network
# namespaces, end-to-end tests booting a real guest kernel under QEMU (TCG), and a smoke
# pass of the benchmark suite.
# Installs what it needs with apt first. All test traffic stays in namespaces the tests create.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
cargo fmt --all -- --check
cargo fmt --manifest-path tests/guest/tool/Cargo.toml -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
RUSTFLAGS="-C target-feature=+crt-static" cargo clippy --quiet --release \
  --manifest-path tests/guest/tool/Cargo.toml --target-dir target/gtool -- -D warnings
tests/guest/build.sh >/dev/null
# The benchmark harness, one short pass per case and no thresholds, so it never rots.
bench/run.sh --smoke
cargo test --workspace --all-targets 2>&1
