#!/usr/bin/env bash
# The method comparison on the embedded benchmark (README table and plot):
#   benchmarks/embedded_methods.sh [OUT_DIR]
# Every method: 10 epochs, lr 1e-3, batch 4, the demo's data and evaluation.
set -euo pipefail
OUT="${1:-runs/methods}"
BLURCTL="${BLURCTL:-blurctl}"
common=(eval.compare_base=false eval.bootstrap=0)
run() {
  local name=$1; shift
  "$BLURCTL" run recipes/demo.yaml "${common[@]}" "output_dir=$OUT/$name" "$@"
}
run GA        algorithm.forget_loss=ga algorithm.retain_loss=null algorithm.combiner=penalty
run GA_GDR    algorithm.forget_loss=ga algorithm.retain_loss=gdr algorithm.combiner=penalty algorithm.retain_weight=5
run NPO       algorithm.forget_loss=npo algorithm.retain_loss=null algorithm.combiner=penalty
run NPO_GDR   algorithm.forget_loss=npo algorithm.retain_loss=gdr algorithm.combiner=penalty algorithm.retain_weight=5
run SimNPO    algorithm.forget_loss=simnpo algorithm.retain_loss=gdr algorithm.combiner=penalty algorithm.retain_weight=5 algorithm.beta=2.5
run RMU       algorithm.forget_loss=rmu algorithm.retain_loss=rmu algorithm.combiner=penalty algorithm.retain_weight=5 \
              steering.layer=2 'steering.update_layers=[0,1,2]' steering.coeff=20
run TaskVector algorithm.forget_loss=ga algorithm.retain_loss=null algorithm.combiner=task_vector train.epochs=5
run BLUR      eval.compare_base=true
"$BLURCTL" report "$OUT/BLUR" "$OUT/GA" "$OUT/GA_GDR" "$OUT/NPO" "$OUT/NPO_GDR" "$OUT/SimNPO" \
  "$OUT/RMU" "$OUT/TaskVector" --out "$OUT"
