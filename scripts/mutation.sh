#!/usr/bin/env bash
# Mutation testing of the pure modules (space, config, schedulers, search, resources, results,
# train_args, errors) against the fast in-process tests, with mutmut (pip install mutmut; 3.x).
# The modules and tests are in pyproject.toml's [tool.mutmut]; results and survivors: docs/mutation.md.
#
#   scripts/mutation.sh            mutate, run, print the score per module and the surviving mutants
#   scripts/mutation.sh "yolotune.space.*"   only the mutants of one module (names as mutmut shows them)
#   mutmut show NAME               the diff of one mutant (mutmut browse: all of them)
#
# mutmut caches results in mutants/ and re-runs only what changed; rm -rf mutants/ starts afresh.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v mutmut >/dev/null || { echo "mutation.sh: pip install mutmut" >&2; exit 2; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" YOLO_OFFLINE=1 WANDB_MODE=offline
# mutmut forks a child per mutant; torch's thread pool does not survive a fork (a test that builds a
# model would hang until mutmut's timeout, which counts as killed): one thread, no pool.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
nice -n 10 mutmut run --max-children "${MUTATION_JOBS:-2}" "$@" >mutants-run.log 2>&1 || { tail -30 mutants-run.log; exit 1; }
mutmut export-cicd-stats >/dev/null
python scripts/mutation_score.py
