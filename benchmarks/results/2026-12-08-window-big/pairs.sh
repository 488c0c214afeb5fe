#!/bin/bash
OUT=/work/wt-window-big/benchmarks/results/2026-12-08-window-big
for round in 1 2 3; do
  for k in 1 5; do
    for side in before after; do
      if [ $side = before ]; then ROOT=/tmp/window-big-before; else ROOT=/work/wt-window-big; fi
      echo "$(date -u +%H:%M:%S) round $round k$k $side load $(cut -d' ' -f1-3 /proc/loadavg)" >> $OUT/runs-and-load.txt
      cd $ROOT && PYTHONPATH=$ROOT /work/main/.venv/bin/python benchmarks/windowed_aggregation.py --skip-spark --skip-dynamic-reference --repeat 3 --events 5000000 --files 50 --max-files 0 --key-columns $k --data /tmp/window-big-data/k$k --out $OUT/k$k-$side-round$round.json > /dev/null 2>&1
    done
  done
done
echo "$(date -u +%H:%M:%S) done load $(cut -d' ' -f1-3 /proc/loadavg)" >> $OUT/runs-and-load.txt
