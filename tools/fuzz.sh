#!/usr/bin/env bash
# Builds the fuzz targets of fuzz/ with libFuzzer's coverage instrumentation
# and runs each for a bounded time; fails on the first crash, leak or
# timeout, and prints each target's executions.
#
#   tools/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default 60 s, all)
#
# Drives the libFuzzer that libfuzzer-sys links in directly, with the flags
# `cargo fuzz build` passes minus AddressSanitizer, so it needs neither the
# cargo-fuzz CLI nor a nightly compiler (the targets are safe Rust: what a
# run can find is a panic, an abort, a runaway allocation or a hang).
# The corpus grows in fuzz/corpus/TARGET (not committed), seeded from
# fuzz/seeds/TARGET (hand-written request bodies and messages; images of a
# few pixels made with Pillow, one per format and colour type, an EXIF
# rotation, an animation, a 1x100 strip); a crashing input is written to fuzz/artifacts/TARGET/
# and can be replayed with `fuzz/target/<triple>/debug/TARGET FILE`.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(request chat_template image structured)

host="$(rustc -vV | sed -n 's/^host: //p')"
# With --target, these flags reach only the fuzzed code, not build scripts
# or proc macros. No CUDA: the targets never touch the device.
export KESTREL_NO_CUDA=1
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
t0=$(date +%s)
cargo build --locked --target "$host" --bins
echo "fuzz: built in $(($(date +%s) - t0)) s"

passed=0
failed=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log="$(mktemp)"
    # -rss_limit_mb and -malloc_limit_mb: one input may not make the process
    # allocate gigabytes; -timeout: nor take seconds.
    if "target/$host/debug/$t" "corpus/$t" "seeds/$t" -max_total_time="$secs" -timeout=10 \
        -rss_limit_mb=2048 -malloc_limit_mb=1024 -max_len=65536 -print_final_stats=1 \
        -artifact_prefix="artifacts/$t/" >"$log" 2>&1; then
        result=ok
        passed=$((passed + 1))
    else
        result=FAILED
        failed=$((failed + 1))
        tail -n 60 "$log"
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n1 | cut -d' ' -f2)
    echo "fuzz: $t: $result, ${runs:-?} executions in ${secs} s, coverage ${cov:-?}, corpus $(ls "corpus/$t" | wc -l)"
    rm -f "$log"
done
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
