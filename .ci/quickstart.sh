#!/usr/bin/env bash
# Builds and runs the README's quick start as a user would: a project of its own next to a
# checkout of esframe, with exactly the dependency lines the README gives.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
ln -s "$repo" "$work/esframe"
mkdir -p "$work/app/src"
# The README's first ```toml block under "## Quick start" and the ```rust block after it.
awk '/^## Quick start/{f=1} f&&/^```toml/{c=1;next} c&&/^```/{exit} c' "$repo/README.md" > "$work/deps.toml"
awk '/^## Quick start/{f=1} f&&/^```rust$/{c=1;next} c&&/^```/{exit} c' "$repo/README.md" > "$work/app/src/main.rs"
grep -q '^\[dependencies\]' "$work/deps.toml" || { echo "no [dependencies] block in the README's quick start"; exit 1; }
{
  printf '[package]\nname = "quickstart"\nversion = "0.1.0"\nedition = "2024"\n\n'
  cat "$work/deps.toml"
  printf '\n[workspace]\n'
} > "$work/app/Cargo.toml"
cd "$work/app"
CARGO_TARGET_DIR="$repo/target/quickstart" cargo run --quiet
echo "the README's quick start builds and runs with its own dependency lines"
