#!/usr/bin/env bash
# Build TorchServe model archives (.mar) into model_store/.
#
#   ./archive.sh effnet                          embedded default: EfficientNet-lite0 with its real weights
#   ./archive.sh selfie                          embedded default: MediaPipe selfie segmenter, converted
#                                                from the mediapipe==0.10.21 wheel (fetched from PyPI)
#   ./archive.sh bit   --checkpoint bit.pth.tar  BiT-S-R101x3 CIFAR-10 checkpoint (bit_pytorch layout)
#   ./archive.sh lanet --checkpoint top1.pt      LaNet checkpoint ({'model_state_dict': ...})
#   ./archive.sh tensormask --checkpoint model_final.pth [--config tensormask_R_50_FPN_6x.yaml]
#                                                detectron2 TensorMask checkpoint (pickle or torch.save)
#   ./archive.sh swin --checkpoint cascade_mask_rcnn_swin_tiny_patch4_window7.pth [--config my_mmdet3_config.py]
#                                                Swin-T Cascade Mask R-CNN: the seed fork's (mmdet 2.11)
#                                                checkpoint, converted, or an mmdet 3 one
#   ./archive.sh dextr --checkpoint dextr_pascalvoc_resunet101-a2d81727.pth --trust-checkpoint
#                                                DEXTR: the published pickled DextrModel, a state dict, or dextr-train's
#   ./archive.sh deeplab --model-type mobile|full --checkpoint X.pth [--image-size 513]
#                                                torchvision DeepLabV3 VOC weights (COCO_WITH_VOC_LABELS_V1)
#   ./archive.sh all                             every embedded default
# Options: --out DIR (model_store), --model-config FILE (replaces vision_attribution/archives/configs/ARCHIVE.yaml),
# --name NAME (the model's name, default ARCHIVE), --trust-checkpoint (unpickle fully: trusted files only),
# --kserve-v2 (batchSize 1, for service_envelope=kservev2),
# --SETTING VALUE (an archive's model: setting, e.g. --model-type full; ./archive.sh --help lists them).
# Checkpoints may have any file name. The model-config and the checkpoint are validated and loaded
# before anything is written: a problem is reported with its cause and exit status 2.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="$root/.venv/bin/python"; [ -x "$python" ] || python=python3
[ $# -ge 1 ] || { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
if [ "$1" = all ]; then
  shift
  for model in $("$python" -c 'from vision_attribution.archives import EMBEDDED_DEFAULTS; print(*EMBEDDED_DEFAULTS)'); do
    "$0" "$model" "$@"
  done
  exit 0
fi
exec "$python" -m vision_attribution.archives.build --handler "$root/handlers/attribution_handler.py" \
  --configs "$root/vision_attribution/archives/configs" --out "$root/model_store" "$@"
