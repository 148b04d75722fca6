#!/bin/bash
# long run of one task to 40k steps, snapshot + eval at several checkpoints
# usage: bash docs/results/long_runs/reproduce_long_runs.sh cycle_navigation   (then modular_arithmetic)
mkdir -p runs/table2
set -u
task=$1
# (in the environment where treesched is installed)
export NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
out=runs/table2/long_$task
prev=0
for s in 2500 5000 10000 20000 40000; do
  if [ $prev -eq 0 ]; then
    treesched train --task $task --steps $s --hidden 64 --out $out --backend numba --checkpoint-every 500 || exit 1
  else
    treesched train --out $out --resume --steps $s --backend numba --checkpoint-every 500 || exit 1
  fi
  rm -rf ${out}_at_$s; cp -r $out ${out}_at_$s
  treesched eval ${out}_at_$s --lengths 41-500 --stride 10 --samples 128 --backend numba --quiet || exit 1
  prev=$s
  echo "done $task $s $(date)"
done
