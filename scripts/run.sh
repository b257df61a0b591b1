#!/usr/bin/env bash
# Builds ktproxy and runs it in the foreground:
#   sudo scripts/run.sh [ktproxy options]
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ $EUID -ne 0 ]]; then
	echo "run.sh: ktproxy loads BPF programs and must run as root: sudo $0 $*" >&2
	exit 1
fi
"$root/scripts/deps.sh"
# deps.sh may have found cargo only in $HOME/.cargo/bin (sudo resets PATH).
command -v cargo >/dev/null || PATH="$PATH:$HOME/.cargo/bin"
# No cd: relative paths in the options must keep meaning what the user meant.
cargo build --release --quiet --manifest-path "$root/Cargo.toml" --bin ktproxy
exec "${CARGO_TARGET_DIR:-$root/target}/release/ktproxy" "$@"
