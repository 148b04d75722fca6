#!/bin/bash
# one task of the 15-task table: hidden 64, 3000 steps, seed 0, eval 41..500 stride 10, 128 samples
# run all fifteen, two at a time:  python -c "import treesched.tasks as t; print(*t.names(), sep=chr(10))" | xargs -P 2 -I{} bash docs/results/all_tasks/reproduce_all_tasks.sh {}
mkdir -p runs/table2/table
task=$1
# (in the environment where treesched is installed)
export NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
treesched sweep --task $task --seeds 1 --steps 3000 --hidden 64 --lengths 41-500 --stride 10 \
  --samples 128 --backend numba --quiet --out runs/table2/table/$task > runs/table2/table_$task.log 2>&1
echo "$task rc=$? $(date +%T)" >> runs/table2/table_done.log
