#!/usr/bin/env bash
# Builds the fuzz targets with coverage instrumentation on stable Rust and
# runs each for its share of SECONDS. Exits non-zero when a target finds an
# input that breaks a property, after printing where that input was saved.
#
#   fuzz/run.sh SECONDS
#
# See fuzz/README.md.
set -euo pipefail

total="${1:?usage: fuzz/run.sh SECONDS}"
cd "$(dirname "$0")"

targets=(codec parse json)

# libFuzzer itself is C++: libfuzzer-sys compiles it with the system C++
# compiler.
if ! command -v c++ >/dev/null 2>&1; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq g++
fi

host="$(rustc -vV | sed -n 's/^host: //p')"

# What `cargo fuzz --sanitizer none` would pass, all of it stable: LLVM's
# coverage pass feeding libFuzzer (8-bit counters, PC table, comparison
# hooks), `--cfg fuzzing`, and debug assertions and overflow checks kept on
# in release. `--target` keeps these flags away from build scripts and proc
# macros, which have no libFuzzer to link against.
export RUSTFLAGS="-Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
--cfg fuzzing -Cdebug-assertions -Coverflow-checks"
unset CARGO_ENCODED_RUSTFLAGS
cargo build --release --target "$host" --target-dir target --bins
bin="target/$host/release"

# Seeds: every client line of the conformance vectors (captured event ids
# replaced by a well-formed one), one file per line, and each vector file
# as one stream, with LF and with CRLF. The codec target's first two bytes
# pick the line limit and the read lengths (see src/lib.rs).
rm -rf seeds
mkdir -p seeds/codec seeds/parse seeds/json
n=0
for file in ../protocol/vectors/*.txt; do
  name="$(basename "$file" .txt)"
  lines="$(sed -n 's/^> //p' "$file" |
    sed 's/\$[A-Za-z_][A-Za-z0-9_]*/evt_0123456789abcdef01234567/g')"
  while IFS= read -r line; do
    n=$((n + 1))
    printf '%s' "$line" >"seeds/parse/line-$n"
    { printf '\xc0\x0d'; printf '%s\n' "$line"; } >"seeds/codec/line-$n"
  done <<<"$lines"
  { printf '\xc0\x0d'; printf '%s\n' "$lines"; } >"seeds/codec/$name-lf"
  { printf '\x50\x05'; printf '%s\n' "$lines" | sed 's/$/\r/'; } >"seeds/codec/$name-crlf"
done
# Framing edge cases with an 8-byte limit: an over-long line, CR, empty
# lines, invalid UTF-8 and a last line without LF.
printf '\x08\x02PING\r\n\r\n\n0123456789\nPONG' >seeds/codec/edge-long
printf '\x08\x00\xff\xfe\nPING\r\r\nPIN\rG\r' >seeds/codec/edge-bytes
# JSON texts: a payload the way clients send them, and the grammar's edges.
printf '{"order":12345,"kind":"created","note":"%s"}' "$(printf 'x%.0s' {1..200})" >seeds/json/payload
printf ' {"a" : [1, -2.5e+3, 0.1E-2, true, false, null], "b": {"c": "\\u00e9\\n\\/"}} ' >seeds/json/mixed
printf '[[[[{"a":[[]]}]]]]' >seeds/json/nested
printf '"\\ud800"' >seeds/json/surrogate

per=$((total / ${#targets[@]}))
if [ "$per" -lt 1 ]; then per=1; fi
stamp="$(mktemp)"
trap 'rm -f "$stamp"' EXIT
failed=()
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t" logs
  max_len=4096
  if [ "$t" = codec ]; then max_len=10000; fi
  echo "fuzz: $t for ${per}s (seeds: $(ls "seeds/$t" | wc -l), corpus: $(ls "corpus/$t" | wc -l))"
  status=0
  "$bin/$t" "corpus/$t" "seeds/$t" \
    -max_total_time="$per" -max_len="$max_len" -timeout=10 \
    -dict=ensync.dict -artifact_prefix="artifacts/$t/" -print_final_stats=1 \
    >"logs/$t.log" 2>&1 || status=$?
  if [ "$status" -ne 0 ]; then
    failed+=("$t")
    echo "fuzz: $t FAILED (exit $status); the end of fuzz/logs/$t.log:"
    tail -n 40 "logs/$t.log"
    for found in $(find "artifacts/$t" -type f -newer "$stamp"); do
      echo "fuzz: input saved to fuzz/$found"
      echo "fuzz: reproduce with: fuzz/$bin/$t fuzz/$found"
    done
  else
    grep -E '^(Done|stat::number_of_executed_units|stat::new_units_added)' "logs/$t.log" |
      sed "s/^/fuzz: $t: /"
  fi
done

if [ "${#failed[@]}" -ne 0 ]; then
  echo "fuzz: FAILED: ${failed[*]}"
  exit 1
fi
echo "fuzz: ok: ${targets[*]}"
