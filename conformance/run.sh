#!/usr/bin/env bash
# LLaMA-Factory conformance: what mmdata writes loads, trains, predicts and merges in the real, pinned LLaMA-Factory.
#
#   conformance/run.sh [MMDATA_PYTHON]
#
# MMDATA_PYTHON is a Python with mmdata installed (default: $MMDATA_PYTHON, else .venv/bin/python from
# `make install-test`). LLaMA-Factory lives in its own venv, $MMDATA_CONFORMANCE_CACHE/lf-venv (default .cache/),
# built from conformance/requirements*.txt and reused while those files are unchanged. Nothing is downloaded at run
# time: the models are tiny random Qwen2-VL and Qwen3-VL written on the spot (src/mmdata/train/tiny.py), HF_HUB_OFFLINE=1.
#
# Steps: 1 build every output shape with mmdata (make_fixtures.py); 2 `mmdata validate` accepts them and rejects a
# deliberately broken copy; 3 LLaMA-Factory's get_dataset loads each one (record counts, <|image_pad|> counts) and
# rejects the broken copy; 4 `mmdata llamafactory` writes train_lora/predict/merge YAMLs, which `llamafactory-cli`
# runs unchanged (3 LoRA steps on the CPU, predictions, merge); 5 steps 3 and 4 again for a tiny Qwen3-VL (template
# qwen3_vl). Every step runs; the exit status says if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${1:-${MMDATA_PYTHON:-$ROOT/.venv/bin/python}}
CACHE=${MMDATA_CONFORMANCE_CACHE:-$ROOT/.cache}
VENV=$CACHE/lf-venv
WORK=$CACHE/conformance
LF_PY=$VENV/bin/python
START=$SECONDS
FAILED=()

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME=$WORK/hf-home CUDA_VISIBLE_DEVICES= \
       TOKENIZERS_PARALLELISM=false DISABLE_VERSION_CHECK=0 PYTHONUNBUFFERED=1

step() {  # step NAME COMMAND...: run, log to $WORK/logs/NAME.log, show the last lines, remember failures
    local name=$1 t0=$SECONDS
    shift
    printf '\n== %s\n' "$name"
    "$@" >"$WORK/logs/$name.log" 2>&1
    local rc=$?
    grep -E '^(built|fixtures|mmdata|conformance|tiny|reusing|  [a-z0-9_]+ +(train|val|test) |  [a-z_-]+ += )' \
        "$WORK/logs/$name.log" | tail -30
    if ((rc == 0)); then
        printf -- '-- %s: ok (%ss)\n' "$name" "$((SECONDS - t0))"
    else
        tail -15 "$WORK/logs/$name.log"
        printf -- '-- %s: FAILED rc=%s (%ss; log %s)\n' "$name" "$rc" "$((SECONDS - t0))" "$WORK/logs/$name.log"
        FAILED+=("$name")
    fi
    return $rc
}

install_lf_venv() {
    local want
    want=$(cat conformance/requirements.txt conformance/requirements-nodeps.txt | sha256sum | cut -d' ' -f1)
    if [[ -f $VENV/.mmdata-stamp && $(cat "$VENV/.mmdata-stamp") == "$want" ]]; then
        echo "reusing $VENV"
        return 0
    fi
    rm -rf "$VENV"
    "${PYTHON:-python3}" -m venv "$VENV" || return 1
    # The same torch + torchvision as mmdata's venv, hard-linked rather than a second 5.5 GB copy (share_torch.py).
    "$PY" conformance/share_torch.py "$("$LF_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    "$VENV/bin/pip" install -q -r conformance/requirements.txt &&
        "$VENV/bin/pip" install -q --no-deps -r conformance/requirements-nodeps.txt &&
        rm -f "$VENV"/lib/python3*/site-packages/torchaudio/lib/*.so &&
        "$LF_PY" -c "import llamafactory.data, llamafactory.train.tuner" &&
        echo "$want" >"$VENV/.mmdata-stamp"
}

if [[ ! -x $PY ]] || ! "$PY" -c "import mmdata" 2>/dev/null; then
    echo "conformance: $PY cannot import mmdata; pass a Python with mmdata installed (make install-test makes .venv)"
    exit 2
fi
rm -rf "$WORK"
mkdir -p "$WORK/logs"
RUN=$WORK/run
LATEX=$RUN/latex
LATEX3=$RUN/latex3

step install-llamafactory install_lf_venv || { echo "conformance: no LLaMA-Factory venv"; exit 1; }
if step build-fixtures "$PY" conformance/make_fixtures.py "$RUN"; then
    cp -r "$LATEX" "$LATEX3"  # one build, two model families: each trains in its own copy
    step mmdata-validate "$PY" conformance/make_fixtures.py --validate "$RUN"
    step tiny-model "$LF_PY" conformance/lf_checks.py tiny "$RUN/tiny" &&
        step lf-load-datasets "$LF_PY" conformance/lf_checks.py load "$RUN" "$RUN/tiny"
    if step write-configs "$PY" -m mmdata.cli llamafactory "$LATEX" --model "$RUN/tiny" --max-steps 3 \
        --precision fp32 --num-workers 1; then
        step lf-train "$VENV/bin/llamafactory-cli" train "$LATEX/train_lora.yaml" &&
            step lf-trained "$LF_PY" conformance/lf_checks.py trained "$LATEX/saves/lora_sft" &&
            step lf-predict "$VENV/bin/llamafactory-cli" train "$LATEX/predict.yaml" &&
            step lf-predicted "$LF_PY" conformance/lf_checks.py predicted "$LATEX/saves/lora_predict" "$LATEX" &&
            step lf-merge "$VENV/bin/llamafactory-cli" export "$LATEX/merge.yaml" &&
            step lf-merged test -s "$LATEX/saves/lora_merged/model.safetensors"
    fi
    # The same under Qwen3-VL: LLaMA-Factory's template qwen3_vl loads every build with mmdata's Qwen3-VL image-token
    # counts, and `mmdata llamafactory --model <tiny Qwen3-VL>` writes YAMLs it trains, predicts and merges.
    step tiny-model-qwen3 "$LF_PY" conformance/lf_checks.py tiny "$RUN/tiny3" qwen3_vl &&
        step lf-load-datasets-qwen3 "$LF_PY" conformance/lf_checks.py load "$RUN" "$RUN/tiny3" qwen3_vl
    if step write-configs-qwen3 "$PY" -m mmdata.cli llamafactory "$LATEX3" --model "$RUN/tiny3" --max-steps 3 \
        --precision fp32 --num-workers 1; then
        step lf-train-qwen3 "$VENV/bin/llamafactory-cli" train "$LATEX3/train_lora.yaml" &&
            step lf-trained-qwen3 "$LF_PY" conformance/lf_checks.py trained "$LATEX3/saves/lora_sft" &&
            step lf-predict-qwen3 "$VENV/bin/llamafactory-cli" train "$LATEX3/predict.yaml" &&
            step lf-predicted-qwen3 "$LF_PY" conformance/lf_checks.py predicted "$LATEX3/saves/lora_predict" "$LATEX3" &&
            step lf-merge-qwen3 "$VENV/bin/llamafactory-cli" export "$LATEX3/merge.yaml" &&
            step lf-merged-qwen3 test -s "$LATEX3/saves/lora_merged/chat_template.jinja"
    fi
fi

printf '\nconformance: %ss in all, LLaMA-Factory venv %s\n' "$((SECONDS - START))" "$VENV"
if ((${#FAILED[@]})); then
    echo "conformance: FAILED steps: ${FAILED[*]}"
    exit 1
fi
echo "conformance: all steps passed"
