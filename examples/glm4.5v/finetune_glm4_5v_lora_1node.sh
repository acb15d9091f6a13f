#!/usr/bin/env bash
# LoRA finetuning of the full GLM-4.5V (106B total / 12B active) on ONE node of 8 GPUs (80 GB or more).
# The base stays frozen in bf16 (sharded over the 8 GPUs: ~25 GiB each); rank-16 adapters train on every
# Linear of the text decoder and on each routed expert (all-linear; the router never). Checkpoints hold only
# the adapters and their optimizer state. Before: the download, convert and data steps of README.md
# ("The real-model recipe"). Memory check (fits: ~43 GiB per GPU at seq 8192):
#   mmtune plan --model ckpt/hf_path/GLM-4.5V --gpus 8 --gpu-mem 80 --seq-length 8192 --lora-r 16
# After training, the merged model for transformers / vLLM, or a PEFT adapter for transformers + PEFT:
#   mmtune convert dcp-to-hf --hf-dir ckpt/hf_path/GLM-4.5V --dcp-dir save_dir_lora --save-dir GLM-4.5V-lora-merged
#   mmtune convert dcp-to-hf --adapter-only --hf-dir ckpt/hf_path/GLM-4.5V --dcp-dir save_dir_lora --save-dir GLM-4.5V-lora-peft
set -euo pipefail
cd "$(dirname "$0")/../.."   # paths below are relative to the repository root
source examples/glm4.5v/env.sh

GPUS_PER_NODE=8
MASTER_PORT=6000

MM_DATA="examples/glm4.5v/data_106B.json"
MM_MODEL="examples/glm4.5v/model_106B.json"   # its freeze flags still apply: adapters go where it trains
FSDP2_CONFIG="examples/glm4.5v/fsdp2_config.yaml"
LOAD_PATH="ckpt/mm_path/GLM-4.5V"    # the base: the DCP written by `mm-convert ExpertMergeDcpConverter hf_to_dcp`
SAVE_PATH="save_dir_lora"             # adapter-only iter_XXXXXXX/ checkpoints and metrics.jsonl

DISTRIBUTED_ARGS="
    --standalone \
    --nproc_per_node $GPUS_PER_NODE \
    --master_port $MASTER_PORT
"

GPT_ARGS="
    --use-torch-fsdp2 \
    --fsdp2-config-path $FSDP2_CONFIG \
    --init-model-with-meta-device \
    --micro-batch-size 1 \
    --global-batch-size 64 \
    --seq-length 8192 \
    --train-iters 2000 \
    --lr 1e-4 \
    --min-lr 0 \
    --lr-decay-style cosine \
    --lr-warmup-fraction 0.03 \
    --weight-decay 0 \
    --clip-grad 1.0 \
    --seed 42 \
    --bf16 \
    --recompute-granularity full \
    --recompute-method uniform \
    --load $LOAD_PATH \
    --distributed-timeout-minutes 30 \
    --num-workers 4
"

LORA_ARGS="
    --lora-r 16 \
    --lora-alpha 32 \
    --lora-dropout 0 \
    --lora-target-modules all-linear
"

MM_ARGS="
    --mm-data $MM_DATA \
    --mm-model $MM_MODEL
"

OUTPUT_ARGS="
    --log-interval 1 \
    --log-tps \
    --save-interval 500 \
    --save $SAVE_PATH
"

mkdir -p logs
torchrun $DISTRIBUTED_ARGS -m mmtune train $GPT_ARGS $LORA_ARGS $MM_ARGS $OUTPUT_ARGS 2>&1 | tee "logs/train_glm4_5v_lora_1node.log"
