#!/usr/bin/env bash
# Mutation testing against the fast in-process tests, with mutmut (pip install mutmut; 3.x): the pure
# modules (space, config, schedulers, search, resources, results, train_args, errors), the runtime
# modules (records, storage, console, layout) and the functions of runner.py and the trial's modules that
# decide without Ray running (listed below; the rest runs only inside sweeps, in slow tests).
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
if [ $# -eq 0 ]; then
  set -- yolotune.{space,config,schedulers,search,resources,results,train_args,errors}.'*' \
         yolotune.{records,storage,console,layout}.'*' \
         yolotune.runner.x_{export_best,resume_command,check_reachable,_ray_init_args}__'*' yolotune.preflight.x_amp_check_weights__'*' \
         yolotune.trainable.x_{_trial_dir,_resume_point,_newest,claim_device}__'*' \
         yolotune.worker_setup.x_move_staged_checkpoints__'*' yolotune.epoch_report.xǁBestEpochǁ'*' \
         yolotune.trial_log.xǁ_FinishedLinesǁ'*' yolotune.decoded_images.xǁDecodedImagesǁ{add,_decode,key}__'*'
fi
nice -n 10 mutmut run --max-children "${MUTATION_JOBS:-2}" "$@" >mutants-run.log 2>&1 || { tail -30 mutants-run.log; exit 1; }
mutmut export-cicd-stats >/dev/null
python scripts/mutation_score.py
