#!/usr/bin/env bash
# Build TorchServe model archives (.mar) into model_store/.
#
#   ./archive.sh effnet                         embedded default: EfficientNet-lite0 with its real weights
#   ./archive.sh selfie                         embedded default: MediaPipe selfie segmenter, converted
#                                               from the mediapipe==0.10.21 wheel (fetched from PyPI)
#   ./archive.sh bit   --checkpoint BiT.pth     BiT-S-R101x3 CIFAR-10 checkpoint (bit_pytorch layout)
#   ./archive.sh lanet --checkpoint lanet.pth   LaNet checkpoint ({'model_state_dict': ...})
#   ./archive.sh tensormask --checkpoint model_final.pkl [--config tensormask_R_50_FPN_6x.yaml]
#                                               detectron2 TensorMask checkpoint (.pkl or .pth) and config
#   ./archive.sh all                            every embedded default
# Options: --out DIR (default model_store), --model-config FILE (replaces handlers/configs/MODEL.yaml).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="$root/.venv/bin/python"; [ -x "$python" ] || python=python3
archiver="$root/.venv/bin/torch-model-archiver"; [ -x "$archiver" ] || archiver=torch-model-archiver
defaults=(effnet selfie)

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

build() {  # build MODEL CHECKPOINT MODEL_CONFIG OUT [EXTRA_FILE...]
  local model=$1 checkpoint=$2 model_config=$3 out=$4 stage extra
  shift 4
  extra=$(printf ',%s' "$root/handlers/attribution_handler.py" "$@"); extra=${extra#,}
  [ -f "$checkpoint" ] || { echo "archive.sh: checkpoint '$checkpoint' not found" >&2; exit 2; }
  stage=$(mktemp -d); trap 'rm -rf "$stage"' RETURN
  cp "$checkpoint" "$stage/checkpoint.${checkpoint##*.}"
  mkdir -p "$out"
  "$archiver" --model-name "$model" --version 1.0 --force --export-path "$out" \
    --handler "$root/handlers/${model}_handler.py" \
    --serialized-file "$stage/checkpoint.${checkpoint##*.}" \
    --extra-files "$extra" \
    --config-file "$model_config"
  echo "built $out/$model.mar"
}

[ $# -ge 1 ] || usage 2
model=$1; shift
checkpoint="" out="$root/model_store" model_config="" detectron2_config=""
while [ $# -gt 0 ]; do
  case $1 in
    --checkpoint) checkpoint=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --model-config) model_config=$2; shift 2 ;;
    --config) detectron2_config=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "archive.sh: unknown option $1" >&2; usage 2 ;;
  esac
done

case $model in
  all) for m in "${defaults[@]}"; do "$0" "$m" --out "$out"; done ;;
  effnet)
    [ -n "$checkpoint" ] || checkpoint=$("$python" -c 'from vision_attribution.models.effnet import packaged_weights; print(packaged_weights())')
    build effnet "$checkpoint" "${model_config:-$root/handlers/configs/effnet.yaml}" "$out" ;;
  selfie)
    work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
    if [ -z "$checkpoint" ]; then
      checkpoint="$work/selfie.pt"
      "$python" -m vision_attribution.models.selfie_weights "$checkpoint" >/dev/null
    fi
    notice="${checkpoint%.*}.NOTICE.txt"
    [ -f "$notice" ] || { echo "archive.sh: the Apache-2.0 notice $notice must accompany the selfie weights" >&2; exit 2; }
    cp "$notice" "$work/NOTICE.txt"
    build selfie "$checkpoint" "${model_config:-$root/handlers/configs/selfie.yaml}" "$out" "$work/NOTICE.txt" ;;
  tensormask)
    [ -n "$checkpoint" ] || { echo "archive.sh: tensormask needs --checkpoint FILE.pkl|.pth (no offline weights exist)" >&2; exit 2; }
    work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
    extra=()
    if [ -n "$detectron2_config" ]; then
      "$python" -m vision_attribution.models.tensormask.adapter "$detectron2_config" "$work/tensormask_config.yaml"
      extra=("$work/tensormask_config.yaml")
    fi
    build tensormask "$checkpoint" "${model_config:-$root/handlers/configs/tensormask.yaml}" "$out" "${extra[@]}" ;;
  bit|lanet)
    [ -n "$checkpoint" ] || { echo "archive.sh: $model needs --checkpoint FILE (no offline weights exist)" >&2; exit 2; }
    build "$model" "$checkpoint" "${model_config:-$root/handlers/configs/$model.yaml}" "$out" ;;
  -h|--help) usage ;;
  *) echo "archive.sh: unknown model '$model'" >&2; usage 2 ;;
esac
