#!/usr/bin/env bash
# Compile the bundled tiny model for every target and generate tokens with
# each engine; all of them must print the same greedy tokens.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p panguc
P=target/release/panguc
OUT=${OUT:-out/tiny-all}
$P compile examples/tiny-pangu --target ascend910b,ascend310p,cpu -o "$OUT" --force --validate
for engine in compiled ascend-sim; do
  echo "$engine: $($P run "$OUT" --engine $engine --tokens 1,2,3,4 --max-new-tokens 8)"
done
echo "interp:   $($P run examples/tiny-pangu --engine interp --tokens 1,2,3,4 --max-new-tokens 8)"
echo "text:     $($P run "$OUT" --prompt "Hello, 你好" --max-new-tokens 8)"
$P compile examples/tiny-pangu --target cpu --devices 8 --plan ep -o "$OUT-ep8" --force > /dev/null
echo "ep x8:    $($P run "$OUT-ep8" --tokens 1,2,3,4 --max-new-tokens 8)"
$P compile examples/tiny-pangu --target cpu,ascend910b --devices 4 --plan h2p -o "$OUT-h2p4" --force > /dev/null
echo "h2p x4:   $($P run "$OUT-h2p4" --tokens 1,2,3,4 --max-new-tokens 8)"
echo "h2p x4 ascend-sim: $($P run "$OUT-h2p4" --engine ascend-sim --tokens 1,2,3,4 --max-new-tokens 8)"
