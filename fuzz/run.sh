#!/usr/bin/env bash
# fuzz/run.sh SECONDS [TARGET...]: build the libFuzzer targets and run each
# (all of them by default) for SECONDS, one after the other, starting from
# the committed seeds in seeds/<target>/ and growing corpus/<target>/
# (not committed). Prints the executions per target; a crash stops the
# script with the reproducer in artifacts/<target>/.
#
# Works on the stable toolchain: the targets are built with coverage
# instrumentation but no sanitizer (`-s none`); AddressSanitizer needs
# `-Zsanitizer`, i.e. nightly (or RUSTC_BOOTSTRAP=1): set
# FUZZ_SANITIZER=address to use it. Overflow checks are on (Cargo.toml).
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
sanitizer=${FUZZ_SANITIZER:-none}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
if [ $# -gt 0 ]; then targets=("$@"); else mapfile -t targets < <(cargo fuzz list); fi
cargo fuzz build -s "$sanitizer" -O
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  log=$(mktemp)
  status=0
  cargo fuzz run -s "$sanitizer" -O "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 >"$log" 2>&1 || status=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  if [ "$status" -ne 0 ]; then
    tail -40 "$log"
    rm -f "$log"
    echo "fuzz target $t FAILED (reproducer in fuzz/artifacts/$t/)"
    exit "$status"
  fi
  rm -f "$log"
  echo "fuzz target $t: ${execs:-?} executions in ${secs}s, no crash"
done
