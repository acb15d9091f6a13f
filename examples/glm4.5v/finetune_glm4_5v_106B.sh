#!/usr/bin/env bash
# Finetune the full GLM-4.5V (106B total / 12B active) on several nodes with FSDP2.
# Run this script on EVERY node, with NODE_RANK 0 on the master node and 1..NNODES-1 on the others.
# Before: download, convert and data steps of README.md ("The real-model recipe").
# Memory check: mmtune plan --model ckpt/hf_path/GLM-4.5V --gpus $((GPUS_PER_NODE * NNODES)) --seq-length 8192
#   (add --expert-model-parallel-size 8 to see what EP saves in memory and communication)
set -euo pipefail
cd "$(dirname "$0")/../.."   # paths below are relative to the repository root
source examples/glm4.5v/env.sh

GPUS_PER_NODE=8                      # GPUs on each node
MASTER_ADDR="your master node IP"    # the master node's address (reachable from every node; not localhost)
MASTER_PORT=6000
NNODES=16                            # number of nodes (16 x 8 = 128 GPUs, as the recipe's 8 x 16 NPUs)
NODE_RANK="current node id"          # 0 on the master node, 1, 2, ... on the others (each node different)
WORLD_SIZE=$((GPUS_PER_NODE * NNODES))
EP=1                                 # expert parallelism (README "Expert parallelism"): 8 = the 8 GPUs of a node split
                                     # every MoE layer's 128 experts (16 each) and exchange tokens by all-to-all

MM_DATA="examples/glm4.5v/data_106B.json"
MM_MODEL="examples/glm4.5v/model_106B.json"
FSDP2_CONFIG="examples/glm4.5v/fsdp2_config.yaml"
LOAD_PATH="ckpt/mm_path/GLM-4.5V"    # the DCP written by `mm-convert ExpertMergeDcpConverter hf_to_dcp`
SAVE_PATH="save_dir"                  # iter_XXXXXXX/ checkpoints and metrics.jsonl

DISTRIBUTED_ARGS="
    --nproc_per_node $GPUS_PER_NODE \
    --nnodes $NNODES \
    --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR \
    --master_port $MASTER_PORT
"

GPT_ARGS="
    --use-torch-fsdp2 \
    --fsdp2-config-path $FSDP2_CONFIG \
    --init-model-with-meta-device \
    --micro-batch-size 1 \
    --global-batch-size $WORLD_SIZE \
    --seq-length 8192 \
    --train-iters 5000 \
    --lr 1e-5 \
    --min-lr 0 \
    --lr-decay-style cosine \
    --lr-warmup-fraction 0.1 \
    --weight-decay 0 \
    --clip-grad 1.0 \
    --adam-beta1 0.9 \
    --adam-beta2 0.999 \
    --seed 42 \
    --bf16 \
    --recompute-granularity full \
    --recompute-method uniform \
    --recompute-num-layers 1 \
    --expert-model-parallel-size $EP \
    --load $LOAD_PATH \
    --no-load-optim \
    --no-load-rng \
    --no-save-optim \
    --no-save-rng \
    --distributed-timeout-minutes 30 \
    --num-workers 4
"

MM_ARGS="
    --mm-data $MM_DATA \
    --mm-model $MM_MODEL
"

OUTPUT_ARGS="
    --log-interval 1 \
    --log-tps \
    --save-interval 5000 \
    --save $SAVE_PATH
"

mkdir -p logs
torchrun $DISTRIBUTED_ARGS -m mmtune train $GPT_ARGS $MM_ARGS $OUTPUT_ARGS 2>&1 | tee "logs/train_glm4_5v_106B_node${NODE_RANK}.log"
