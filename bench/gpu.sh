#!/usr/bin/env bash
# The GPU check, as one script for a machine with one CUDA GPU (a few minutes on an H100/H200):
#   the CUDA tests; MFU of the 104m preset at sequence length 1024 in bf16, eager and --compile, against
#   transformers' Llama in the same dtype; decode tokens/s against transformers' generate. Figures are appended
#   to bench/RESULTS.md.
#
#   bash bench/gpu.sh             run it (needs CUDA)
#   bash bench/gpu.sh --dry-run   no GPU needed: say what would run, and check that every command's flags exist
#                                 (CI runs this, so the script cannot rot between the times a GPU is at hand)
set -euo pipefail
cd "$(dirname "$0")/.."
# The project's virtual environment (make setup) when there is one, else the python on PATH.
if [[ -x .venv/bin/python ]]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python}; fi

STEPS=(
  "$PY -m pytest -q -k cuda tests/"
  "$PY bench/train_throughput.py --device cuda --config 104m --dtype bfloat16 --batch_size 8 --impls recipe,compiled,hf_recipe --rounds 2 --record"
  "$PY bench/decode.py --device cuda --config 104m --batch_sizes 1,8 --record"
)

if [[ "${1:-}" == "--dry-run" ]]; then
  for step in "${STEPS[@]}"; do
    echo "would run: $step"
    read -r -a words <<< "$step"
    if [[ "${words[1]}" == bench/* ]]; then  # every --flag the step passes must be one its script offers
      help=$("${words[0]}" "${words[1]}" --help)
      for word in "${words[@]:2}"; do
        if [[ "$word" == --* ]] && ! grep -q -- "$word\b" <<< "$help"; then
          echo "bench/gpu.sh: ${words[1]} has no flag $word" >&2
          exit 1
        fi
      done
    fi
  done
  echo "dry run: ${#STEPS[@]} steps planned"
  exit 0
fi

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh: no CUDA GPU here (torch ' + torch.__version__ + '); use --dry-run')"
for step in "${STEPS[@]}"; do
  echo "== $step"
  $step
done
