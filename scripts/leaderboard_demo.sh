#!/usr/bin/env bash
# Build the small but realistic leaderboard behind docs/images/leaderboard.png, export it as HTML and
# screenshot it in headless Chromium (a few minutes on 2 CPU cores).
#
#   scripts/leaderboard_demo.sh [DB] [OUT.png]      # defaults: /tmp/robustkit-demo/lb.db, docs/images/leaderboard.png
#
# Two real CIFAR-10 models (resnet20: standard training; resnet4b: adversarially trained at 2/255)
# on the first 32 test images under several attacks, Linf and L2, resnet20 behind the AAA defense
# and with random weights, and the packaged digits CNN beside a RiFT fine-tune of it.
# Needs ../shared/data (the npz images and checkpoints; SHARED=... elsewhere) and Debian's chromium.
# Running it again reuses the stored cells. Measured: about 30 minutes on a busy 2-core machine
# (AutoAttack on resnet4b most of it).
set -euo pipefail
DB=${1:-/tmp/robustkit-demo/lb.db}
PNG=${2:-docs/images/leaderboard.png}
SHARED=${SHARED:-../shared/data}
M=$SHARED/models
DATA=npz:$SHARED/cifar10_test1000.npz
WORK=$(dirname "$DB")
mkdir -p "$WORK"
rk() { python -m robustkit "$@" --db "$DB" --quiet; }
CIFAR=(--model resnet20,resnet4b --checkpoint "$M/resnet20-12fca82f.th,$M/abcrown_resnet4b.pth"
       --dataset "$DATA" --n-examples 32)
rk eval "${CIFAR[@]}" --attack fgsm,pgd,apgd-ce --eps 1/255,2/255,8/255
rk eval "${CIFAR[@]}" --attack pgd --eps 2/255,8/255 --attack-kwargs steps=20
rk eval "${CIFAR[@]}" --attack autoattack --eps 8/255
rk eval "${CIFAR[@]}" --norm l2 --attack pgd,apgd-ce --eps 0.25,0.5
rk eval --model resnet20 --checkpoint "$M/resnet20-12fca82f.th" --dataset "$DATA" --n-examples 32 \
    --attack square --attack-kwargs n_queries=200 --defense aaa --eps 8/255
rk eval --model resnet20 --dataset "$DATA" --n-examples 32 --attack pgd --eps 8/255   # no weights: random
rk eval --attack fgsm,pgd --eps 0.05,0.1,0.2 --n-examples 200
[ -f "$WORK/rift-digits/model.safetensors" ] || python -m robustkit train rift --out "$WORK/rift-digits" --epochs 1 --quiet
rk eval --checkpoint "$WORK/rift-digits/model.safetensors" --attack fgsm,pgd --eps 0.05,0.1,0.2 --n-examples 200
python -m robustkit leaderboard --db "$DB" --format html --output "$WORK/leaderboard.html"
python scripts/screenshot_leaderboard.py "$WORK/leaderboard.html" "$PNG"
