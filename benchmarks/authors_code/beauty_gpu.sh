#!/bin/bash
# The MDCNS authors' code (MDCNS with the GRU4Rec peer, and DNS+ at M 10) on Amazon Beauty -- their exact split, in
# their data format -- as parallel processes on one GPU, resumable across calls (their per-epoch resume, from
# cpu.patch). Their code never enters this repository: `stage` copies it into .authors/ (ignored through
# .git/info/exclude), with the Beauty files and the wheels the device image lacks; the device tool carries it.
#
#   bash benchmarks/authors_code/beauty_gpu.sh stage          # here, once (needs their checkout: docs/authors_code.md)
#   device run: bash benchmarks/authors_code/beauty_gpu.sh run 500   carry: [".authors"]
#   then: cp FILES_AT/* .authors/parked/   (the resume state and logs come back through $OUT; the next run resumes)
#   finished runs: python -m benchmarks.studies.side_by_side record .authors/parked/LOG --method ... --dataset Beauty
#
# Sizes: a Beauty MDCNS resume file is ~18 MB (two models and their Adam states, 12,103 items), DNS+ ~9 MB; $OUT
# returns at most 8 files of 16 MiB: the state goes back as one tar split into 15 MB parts, so SEEDS="42" (one run
# of each, the issue's minimum) fits, three seeds do not. Settings: docs/authors_code.md (their Beauty pick:
# gamma 1, tau 1; DNS+ patience 50 as their Beauty log).
set -euo pipefail
AUTH=${AUTH:-/work/authors/SIGIR26-MDCNS}
STAGE=.authors
SEEDS=${SEEDS:-42}

stage() {
    mkdir -p "$STAGE"/code "$STAGE"/data "$STAGE"/wheels "$STAGE"/parked
    local exclude; exclude=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$exclude")"
    grep -qsx "/$STAGE/" "$exclude" || echo "/$STAGE/" >> "$exclude"
    (cd "$AUTH" && git diff --quiet HEAD -- MDCNS_Code/main.py) && { echo "apply cpu.patch in $AUTH first"; exit 2; }
    (cd "$AUTH" && find MDCNS_Code Baselines/Neg_samples_DNS+ -maxdepth 1 -name '*.py' -print0 |
        xargs -0 cp --parents -t "$OLDPWD/$STAGE"/code/)
    cp /work/authors/data_beauty/Beauty_*.txt "$STAGE"/data/
    # the device image (python 3.12) has torch, transformers, pandas, scipy, sklearn; not recbole or texttable
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$STAGE"/wheels \
        recbole==1.2.1 texttable openpyxl et_xmlfile colorlog colorama
    du -sh "$STAGE"
}

run() {
    local budget=${1:-500} out=${OUT:-/tmp/out} A=$PWD/$STAGE
    python3 -c "import recbole, texttable, openpyxl" 2>/dev/null || \
        python3 -m pip install -q --no-index --no-deps --target "$A"/deps "$A"/wheels/*.whl
    export PYTHONPATH="$A/deps${PYTHONPATH:+:$PYTHONPATH}"
    mkdir -p "$A"/runs && cd "$A"/runs
    if ls "$A"/parked/state.tar.part* >/dev/null 2>&1; then cat "$A"/parked/state.tar.part* | tar -x; fi
    cp "$A"/parked/*.log . 2>/dev/null || true
    for seed in $SEEDS; do  # relative paths: their resume key hashes the arguments, and the device's folder varies
        timeout "$budget" python3 -u ../code/MDCNS_Code/main.py --data_dir=../data/ --data_name=Beauty \
            --backbone=SASRec --backbone2=GRU4Rec --hidden_size=64 --loss_type=BCE --neg_sampler=DNS --N=100 --K_hns=1 \
            --alpha=1.0 --beta=1.0 --d_lambda=1.0 --dws_beta=1.0 --temperature=0.0 --kd_temperature=1.0 \
            --kd_gamma=0.01 --seed="$seed" --output_dir=out_mdcns_s"$seed"/ --resume_dir=resume/ \
            >> mdcns_beauty_s"$seed".log 2>&1 &
        timeout "$budget" python3 -u ../code/Baselines/Neg_samples_DNS+/run_finetune_full.py --data_dir=../data/ \
            --data_name=Beauty --backbone=SASRec --hidden_size=64 --loss_type=BCE --neg_sampler=DNS --N=100 --M=10 \
            --start_epoch=0 --ckp=0 --patience=50 --seed="$seed" --output_dir=out_dns_s"$seed"/ \
            --resume_dir=resume/ >> dns_beauty_m10_s"$seed".log 2>&1 &
    done
    wait || true
    mkdir -p "$out"
    state=$(ls -d resume out_dns_s* 2>/dev/null || true)  # + DNS+'s best model, read at its end
    [ -z "$state" ] || tar -c $state | split -b 15000000 - "$out"/state.tar.part
    for log in *.log; do tr '\r' '\n' < "$log" | grep -v 'it/s\]' > "$out/$log"; done  # tqdm bars dropped
    ls -la "$out"
}

"$@"
