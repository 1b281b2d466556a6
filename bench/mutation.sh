#!/usr/bin/env bash
# Mutation check of the core numerical modules (docs/testing.md): mutmut (configured under
# [tool.mutmut] in pyproject.toml) mutates each module and runs the fast unit tests that
# cover the mutated function; then bench/mutation_report.py prints the per-module table.
#
#   bash bench/mutation.sh                  # all modules, fresh ./mutants
#   bash bench/mutation.sh collate loss     # some modules (names below), reusing ./mutants
#   bash bench/mutation.sh --survivors loss # only the mutants of a module that were not killed
#                                           # last time (after adding tests)
#
# Environment: MUTATION_JOBS (parallel mutants, default 2), MUTATION_LOCK (a file to flock
# around each module's run, for a machine shared with other heavy jobs).
# A periodic check, not part of CI: about an hour on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."

# mutmut puts ./mutants first on sys.path; a PYTHONPATH naming the checkout must not shadow it.
unset PYTHONPATH
export HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per mutant worker
JOBS=${MUTATION_JOBS:-2}

# module name -> mutant-name globs (mutmut names a mutant <module>.x_<function>__mutmut_<n>,
# methods as <module>.xǁ<Class>ǁ<method>__mutmut_<n>).
declare -A GLOBS=(
  [common]="ftlab.methods.native.common.*"
  [lora]="ftlab.methods.native.lora.*"
  [lora_fa]="ftlab.methods.native.lora_fa.*"
  [vera]="ftlab.methods.native.vera.*"
  [delta_lora]="ftlab.methods.native.delta_lora.*"
  [adapter]="ftlab.methods.native.adapter.*"
  [collate]="ftlab.data.collate.*"
  [loss]="ftlab.training.loss.*"
  # the LightningModule's loss and metric code only (not its optimizer or checkpoint hooks)
  [module]="ftlab.training.module.*training_step__* ftlab.training.module.*_weight_by_tokens__* ftlab.training.module.*on_before_optimizer_step__* ftlab.training.module.*validation_step__* ftlab.training.module.*on_validation_epoch_end__* ftlab.training.module.*throughput__*"
  [generation]="ftlab.metrics.generation.*"
  [counts]="ftlab.planning.counts.*"
)
ORDER=(counts collate loss generation module common lora lora_fa vera delta_lora adapter)

SURVIVORS=0
if [ "${1:-}" = "--survivors" ]; then SURVIVORS=1; shift; fi
if [ $# -eq 0 ] && [ $SURVIVORS = 0 ]; then
  rm -rf mutants
  set -- "${ORDER[@]}"
fi
lock() { if [ -n "${MUTATION_LOCK:-}" ]; then flock "$MUTATION_LOCK" "$@"; else "$@"; fi; }
for name in "$@"; do
  [ -n "${GLOBS[$name]:-}" ] || { echo "unknown module $name (one of: ${ORDER[*]})" >&2; exit 2; }
  echo "== $name"
  if [ $SURVIVORS = 1 ]; then
    # Twice: mutmut regenerates the mutants of functions whose source changed on its first
    # call, and those new mutants (not yet checked) are only known after it.
    for _ in 1 2; do
      mapfile -t names < <(python bench/mutation_report.py --survivors "$name")
      [ ${#names[@]} -gt 0 ] || break
      lock mutmut run --max-children "$JOBS" "${names[@]}"
      mapfile -t names < <(python bench/mutation_report.py --unchecked "$name")
      [ ${#names[@]} -gt 0 ] || break
    done
    continue
  fi
  # shellcheck disable=SC2086  # the globs are split on purpose and quoted for mutmut by set -f
  (set -f; lock mutmut run --max-children "$JOBS" ${GLOBS[$name]})
done
python bench/mutation_report.py
