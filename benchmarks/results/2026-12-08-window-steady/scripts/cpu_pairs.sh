#!/bin/bash
K=$1; N=$2
for i in $(seq 1 $N); do
  for side in before after; do
    if [ $(( i % 2 )) -eq 0 ]; then side=$([ $side = before ] && echo after || echo before); fi
    if [ $side = before ]; then D=/tmp/window-steady-before; else D=/work/wt-window-steady; fi
    cd $D
    S=$(date +%s.%N)
    OUT=$( { /usr/bin/time -f "cpu %U user %S sys" env PYTHONPATH=$D /work/main/.venv/bin/python /tmp/window-steady-data/harness.py benchmarks/windowed_aggregation.py /tmp/window-steady-data/k$K $K 3; } 2>&1 )
    echo "k$K pair $i $side load $(cut -d' ' -f1 /proc/loadavg): $(echo "$OUT" | grep -o "compute': [0-9.]*" | tr '\n' ' ') $(echo "$OUT" | grep cpu)"
  done
done
