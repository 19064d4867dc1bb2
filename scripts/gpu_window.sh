#!/usr/bin/env bash
# Everything a short GPU window should measure, in one prepared run (issue 9's and 11's GPU checks).
#
#   bash scripts/gpu_window.sh prepare      # here, with the data root in $MEMGAN_DATA (or ./data): MNIST and
#                                           # Fashion-MNIST gzipped (11 + 30 MB) and the pyod wheel into
#                                           # gpu_carry/ (git-ignored)
#   bash scripts/gpu_window.sh run          # on the GPU machine, with gpu_carry/ beside the checkout;
#                                           # writes $OUT/gpu_window.tgz (results, reports, logs)
#
# The run spends at most RUN_SECONDS (default 540) in all, each part under its own `timeout -s INT`, so
# an interrupted part keeps its finished job records (the runner exits 130 and writes no partial
# record) and the next part still starts. In order of value:
#   1. the speed script on cuda: solo, stacked K = 1, 4, 10, with and without CUDA graphs;
#   2. MNIST, paper profile, --track-auroc, stacked and graphed, the quick detectors first
#      (their whole paper budget fits), then GANomaly and Mem_GANomaly;
#   3. with time left, the bf16 fidelity check: Mem_GANomaly MNIST classes 0-9 in bf16 beside part 2's fp32;
#   4. with time left, GEOM and GOAD (issue 21) on Fashion-MNIST, standard protocol, at the same profile.
# PARTS picks and orders the parts (default "1 2 3 4"): a later window, once parts 1-3 are recorded, can
# spend all its time on GEOM and GOAD with PARTS=4.
# Whatever finished is reported; a rerun of the same command resumes (records are per job).
# A dry run of the script's plumbing on a CPU: DEVICE=cpu PROFILE=smoke bash scripts/gpu_window.sh run
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=gpu_carry

prepare() {
    local root="${MEMGAN_DATA:-data}"
    for dataset in MNIST FashionMNIST; do
        mkdir -p "$CARRY/data/$dataset/raw"
        for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
            if [ -f "$root/$dataset/raw/$f.gz" ]; then
                cp "$root/$dataset/raw/$f.gz" "$CARRY/data/$dataset/raw/"
            else
                gzip -c "$root/$dataset/raw/$f" > "$CARRY/data/$dataset/raw/$f.gz"
            fi
        done
    done
    mkdir -p "$CARRY/wheels"
    # pyod only (no dependencies): the GPU image has numpy, scipy, scikit-learn; where numba is missing,
    # iForest is left out of the run and the log says so.
    python -m pip download --quiet --no-deps --only-binary=:all: -d "$CARRY/wheels" \
        "pyod==$(python -c 'import importlib.metadata as m; print(m.version("pyod"))')"
    du -sh "$CARRY"
}

run() {
    local out="${OUT:-gpu_out}" budget="${RUN_SECONDS:-540}" start=$SECONDS
    local device="${DEVICE:-cuda}" profile="${PROFILE:-paper}" graphs=()
    local -a parts=(${PARTS:-1 2 3 4})
    [ "$device" = cpu ] || graphs=(--cuda-graphs)
    mkdir -p "$out" gpu_results gpu_reports
    local log="gpu_reports/gpu_window.log"
    left() { echo $((budget - (SECONDS - start))); }
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
        python -m pip install --quiet --no-deps --no-index "$CARRY"/wheels/*.whl || echo "pyod wheel not installed"
        local methods="dagmm memae dsvdd f_anogan ganomaly mem_ganomaly"
        if python -c "import pyod.models.iforest" 2>/dev/null; then
            methods="iforest $methods"
        else
            echo "pyod does not import here (numba missing?): iForest left out of this run"
        fi
        local common=(--dataset mnist --data-root "$CARRY/data" --no-download --device "$device" --no-progress)
        for part in "${parts[@]}"; do
            case "$part" in
            1)
                echo "== 1. speed ($(left) s left)"
                timeout -s INT 150 python -m benchmark.speed --device "$device" --steps 60 --no-anomalib ;;
            2)
                echo "== 2. MNIST paper profile, stacked + graphs ($(left) s left)"
                # Part 2 leaves 60 s for what follows it, when anything does.
                local keep=$([ "${parts[-1]}" = 2 ] && echo 10 || echo 60)
                timeout -s INT $(( $(left) > keep ? $(left) - keep : 1 )) python run_all.py "${common[@]}" \
                    --profile "$profile" --methods $methods --track-auroc --stack auto "${graphs[@]}" \
                    --results-dir gpu_results --reports-dir gpu_reports ;;
            3)
                echo "== 3. bf16 fidelity ($(left) s left)"
                if [ "$(left)" -gt 90 ]; then
                    timeout -s INT $(( $(left) - 30 )) python run_all.py "${common[@]}" --profile "$profile" \
                        --methods mem_ganomaly --track-auroc --precision bf16 \
                        --results-dir gpu_results --reports-dir gpu_reports
                fi ;;
            4)
                echo "== 4. GEOM and GOAD, Fashion-MNIST, standard protocol ($(left) s left)"
                if [ "$(left)" -gt 60 ]; then
                    timeout -s INT $(( $(left) - 20 )) python run_all.py --dataset fashion_mnist --protocol standard \
                        --data-root "$CARRY/data" --no-download --device "$device" --no-progress --profile "$profile" \
                        --methods geom goad --results-dir gpu_results --reports-dir gpu_reports
                fi ;;
            *) echo "unknown part $part (PARTS: 1 2 3 4)" ;;
            esac
        done
        if [[ " ${parts[*]} " == *" 2 "* || " ${parts[*]} " == *" 3 "* ]]; then
            python run_all.py --report-only --profile "$profile" --results-dir gpu_results --reports-dir gpu_reports
        fi
        if [[ " ${parts[*]} " == *" 4 "* ]]; then
            python run_all.py --report-only --profile "$profile" --protocol standard --dataset fashion_mnist \
                --results-dir gpu_results --reports-dir gpu_reports
        fi
        echo "== done after $((SECONDS - start)) s"
    } > "$log" 2>&1
    tar czf "$out/gpu_window.tgz" gpu_results gpu_reports
    tail -40 "$log"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash scripts/gpu_window.sh prepare|run" >&2; exit 2 ;;
esac
