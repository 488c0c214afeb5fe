#!/bin/bash
# Alternated before/after pairs of the windowed benchmark; $1 = key columns, $2 = pairs
K=$1; N=$2; OUT=/work/wt-window-steady/benchmarks/results/2026-12-08-window-steady
for i in $(seq 1 $N); do
  for side in before after; do
    if [ $(( i % 2 )) -eq 0 ]; then side=$([ $side = before ] && echo after || echo before); fi
    if [ $side = before ]; then D=/tmp/window-steady-before; else D=/work/wt-window-steady; fi
    echo "== k$K pair $i $side $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)"
    (cd $D && PYTHONPATH=$D /work/main/.venv/bin/python benchmarks/windowed_aggregation.py --skip-spark --skip-dynamic-reference --repeat 3 --events 5000000 --files 50 --max-files 1 --key-columns $K --data /tmp/window-steady-data/k$K --out $OUT/${PFX}k$K-pair$i-$side.json > /dev/null 2>&1)
    /work/main/.venv/bin/python -c "
import json,sys; d=json.load(open("$OUT/${PFX}k$K-pair$i-$side.json"))
m=d['microstream_detail (median run)']
print('  ratio', d['ratio_stream_to_polars_truncate_group_by'], 'equal', d['result_equal_to_polars'], 'phases', m['phase_totals_ms'], 'batch median', m['batch_total_median_ms'])
print('  seconds', d['seconds'])
"
  done
done
