#!/usr/bin/env bash
# The first GPU machine's smoke test (issue 22): one line per check, under five minutes on one
# GPU. Run from the repository root after `make test`'s install:
#
#   bash bench/gpu_smoke.sh                # on the GPU node
#   SMOKE_DEVICE=cpu bash bench/gpu_smoke.sh   # the same flow on a CPU (GPU-only checks skipped;
#                                              # fp32 unless SMOKE_PRECISION=bf16)
#
# Checks: CUDA, native bf16 and torch's fused Adam are there; the tiny demo end to end in bf16;
# stage 2 with a mid-epoch checkpoint and --resume; FREEDOM through both stages in bf16; ZeRO-3
# with activation checkpointing; torch.compile of the encoder layers. Logs: $OUT/<check>.log.
# Exit 1 if any check failed. Record the output in docs/scaling.md.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-/tmp/ptmrec-gpu-smoke}
DEVICE=${SMOKE_DEVICE:-cuda}
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
[ "$DEVICE" = cpu ] && export DS_ACCELERATOR=cpu
rm -rf "$OUT"; mkdir -p "$OUT"
failed=0
# small enough for minutes on a CPU, large enough to exercise every path on a GPU
SIZE=(synthetic.n_items=120 synthetic.n_users=80 data.shard_size=40 demo_backbone.width=32
      demo_backbone.heads=2 demo_backbone.layers=2 demo_backbone.epochs=2 stage1.epochs=3
      stage2.epochs=1 stage2.batch_size=16 stage2.prompt_len=2 stage2.prompt_depth=2)

check() {   # check NAME COMMAND...: one line, the log kept
    local name=$1 t0=$SECONDS
    shift
    if "$@" >"$OUT/$name.log" 2>&1; then
        printf 'ok    %-16s %4d s  %s\n' "$name" $((SECONDS - t0)) "$(tail -n 1 "$OUT/$name.log" | cut -c1-90)"
    else
        printf 'FAIL  %-16s %4d s  see %s\n' "$name" $((SECONDS - t0)) "$OUT/$name.log"
        failed=1
    fi
}
gpu_check() {   # skipped on a CPU run
    if [ "$DEVICE" = cpu ]; then printf 'skip  %-16s (SMOKE_DEVICE=cpu)\n' "$1"; else check "$@"; fi
}
ptmrec() { "$PY" -m ptmrec_dist "$@"; }
PREC=${SMOKE_PRECISION:-$([ "$DEVICE" = cpu ] && echo fp32 || echo bf16)}   # bf16 on CPU: slow

gpu_check cuda "$PY" -c "import torch; assert torch.cuda.is_available(); \
print(torch.cuda.get_device_name(), torch.version.cuda, torch.__version__)"
gpu_check bf16 "$PY" -c "import torch; assert torch.cuda.is_bf16_supported(including_emulation=False); \
print('native bf16')"
gpu_check fused_adam "$PY" -c "import torch; p = torch.nn.Parameter(torch.zeros(8, device='cuda')); \
o = torch.optim.Adam([p], fused=True); p.grad = torch.ones_like(p); o.step(); print('fused Adam step')"
check demo ptmrec demo --size tiny --out "$OUT/demo" "${SIZE[@]}" \
    stage1.precision=$PREC stage2.precision=$PREC
S2=(stage2 --config "$OUT/demo/stage2/config.yaml")
check resume bash -c "$(declare -f ptmrec); PY=$PY; \
    ptmrec ${S2[*]} --out $OUT/resume stage2.epochs=1 stage2.checkpoint_every=2 stage2.keep_checkpoints=50 \
    && ptmrec ${S2[*]} --out $OUT/resume --resume stage2.epochs=2 stage2.checkpoint_every=2 \
       stage2.keep_checkpoints=50 && grep -q '\"epochs_run\": 2' $OUT/resume/metrics.json \
    && echo resumed to epoch 2"
check freedom bash -c "$(declare -f ptmrec); PY=$PY; \
    ptmrec stage1 --config $OUT/demo/stage1/config.yaml --out $OUT/freedom1 --model freedom \
        stage1.precision=$PREC recommender.freedom.knn_k=5 \
    && ptmrec ${S2[*]} --out $OUT/freedom2 --teacher $OUT/freedom1 recommender.name=freedom \
        recommender.freedom.knn_k=5 stage2.precision=$PREC"
check zero3_ckpt ptmrec "${S2[@]}" --out "$OUT/zero3" stage2.ds_config=zero3 \
    stage2.activation_checkpointing=true stage2.precision=$PREC
check compile ptmrec "${S2[@]}" --out "$OUT/compile" stage2.compile=true stage2.precision=$PREC
exit $failed
