#!/usr/bin/env bash
# End-to-end demo on built-in data, CPU-friendly (~17 min on 2 busy cores, creating the venv included):
#   1. pretrain InsLoc-FPN (configs/insloc_fpn.yaml, shortened) on the demo photos,
#   2. probe what it learned: region retrieval on held-out photos beside random init (same views),
#   3. draw view pairs with their matched boxes,
#   4. fine-tune Mask R-CNN R50-FPN from that checkpoint on the tiny COCO set (InsLoc protocol:
#      backbone, FPN and 4conv1fc box head transferred) and, with the same seed and schedule, from
#      random initialisation (tools/transfer.py, one seed); evaluate box and mask AP of both.
# The tiny synthetic COCO set is used (not regionssl_minidet) because it builds in seconds from
# numpy alone; the real-object set needs a Debian package (tools/build_detection_set.py). It is
# test data, not part of the package: the fine-tunes run tools/train_net_tiny.py, which registers it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${REGIONSSL_VENV:-$ROOT/.venv}/bin/python"
OUT="${DEMO_OUTPUT:-$ROOT/output/demo}"
export PYTHONWARNINGS=ignore
mkdir -p "$OUT"

echo "== [1/5] tiny COCO/VOC sets"
"$PY" tools/build_tiny_datasets.py

echo "== [2/5] pretraining InsLoc-FPN on the demo photos -> $OUT/pretrain"
"$PY" train_net.py --config-file configs/quick_schedules/insloc_fpn_demo.yaml \
    OUTPUT_DIR "$OUT/pretrain" 2>&1 | tee "$OUT/pretrain.log" | grep -E "eta:|Overall training speed" || true
test -f "$OUT/pretrain/model_final.pth" || { echo "pretraining failed, see $OUT/pretrain.log"; exit 1; }

echo "== [3/5] retrieval probe of the checkpoint beside random init (same views) -> $OUT/probe.json"
"$PY" tools/probe.py --config-file configs/quick_schedules/insloc_fpn_demo.yaml --weights "$OUT/pretrain/model_final.pth" \
    --random-init --seeds 0 1 2 --output-json "$OUT/probe.json" > "$OUT/probe.log" 2>&1 || { echo "probe failed, see $OUT/probe.log"; exit 1; }

echo "== [4/5] pictures of view pairs -> $OUT/pictures"
"$PY" tools/visualize_views.py --config-file configs/quick_schedules/insloc_fpn_demo.yaml \
    --num 4 --output "$OUT/pictures" > "$OUT/pictures.log" 2>&1 || { echo "picture command failed, see $OUT/pictures.log"; exit 1; }

echo "== [5/5] fine-tuning Mask R-CNN R50-FPN from the InsLoc checkpoint and from random init -> $OUT/transfer"
rm -rf "$OUT/transfer"  # a new pretraining above: its fine-tunes are redone, not reused
"$PY" tools/transfer.py --train-net tools/train_net_tiny.py \
    --finetune-config configs/quick_schedules/finetune_coco_mask_rcnn_R_50_FPN_demo.yaml \
    --models "insloc_fpn=$OUT/pretrain/model_final.pth" random --seeds 0 --output "$OUT/transfer" \
    --finetune-opts MODEL.ROI_BOX_HEAD.NAME FastRCNNConvFCHeadExtraNorm MODEL.ROI_BOX_HEAD.NUM_CONV 4 \
    MODEL.ROI_BOX_HEAD.NUM_FC 1 MODEL.ROI_BOX_HEAD.NORM BN 2>&1 | tee "$OUT/transfer.log" | grep -E "^\[transfer\]" || true
test -f "$OUT/transfer/transfer.json" || { echo "fine-tuning failed, see $OUT/transfer.log"; exit 1; }

"$PY" tools/summarize_run.py --pretrain "$OUT/pretrain" --probe "$OUT/probe.json" \
    --transfer "$OUT/transfer/transfer.json" --pictures "$OUT/pictures"
