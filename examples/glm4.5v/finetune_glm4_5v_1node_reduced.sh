#!/usr/bin/env bash
# Debug the recipe on ONE node: GLM-4.5V with its decoder reduced to a few layers (the full 106B model
# needs several nodes). Everything else -- data, FSDP2 config, flags -- is the multi-node recipe's.
set -euo pipefail
cd "$(dirname "$0")/../.."   # paths below are relative to the repository root
source examples/glm4.5v/env.sh

GPUS_PER_NODE=8
MASTER_ADDR=localhost
MASTER_PORT=29501
NNODES=1
NODE_RANK=0
WORLD_SIZE=$((GPUS_PER_NODE * NNODES))

NUM_LAYERS=4                                   # layer 0 is dense, layers 1.. are MoE (128 experts each)
HF_DIR="ckpt/hf_path/GLM-4.5V"                 # the downloaded model
REDUCED_HF_DIR="ckpt/hf_path/GLM-4.5V-${NUM_LAYERS}layers"
LOAD_PATH="ckpt/mm_path/GLM-4.5V-${NUM_LAYERS}layers"
SAVE_PATH="save_dir_${NUM_LAYERS}layers"
MM_DATA="$SAVE_PATH/data.json"
MM_MODEL="$SAVE_PATH/model.json"
FSDP2_CONFIG="examples/glm4.5v/fsdp2_config.yaml"

# 1. a reduced copy of the HF dir (only the kept tensors) and its DCP, made once
if [ ! -f "$REDUCED_HF_DIR/config.json" ]; then
    python examples/glm4.5v/reduce_layers.py --hf-dir "$HF_DIR" --out "$REDUCED_HF_DIR" --num-layers $NUM_LAYERS
fi
if [ ! -d "$LOAD_PATH" ]; then
    mm-convert ExpertMergeDcpConverter hf_to_dcp --hf_dir "$REDUCED_HF_DIR" --save_dir "$LOAD_PATH"
fi
# 2. data.json / model.json of the recipe, pointed at the reduced model
mkdir -p "$SAVE_PATH"
python - "$REDUCED_HF_DIR" "$MM_DATA" "$MM_MODEL" <<'PY'
import json, sys
hf, data_out, model_out = sys.argv[1:]
data = json.load(open("examples/glm4.5v/data_106B.json"))
data["dataset_param"]["preprocess_parameters"]["model_name_or_path"] = hf
data["dataset_param"]["basic_parameters"]["max_samples"] = 2000    # a quick check, not a full epoch
model = json.load(open("examples/glm4.5v/model_106B.json"))
model["init_from_hf_path"] = hf
model["text_decoder"]["num_layers"] = json.load(open(f"{hf}/config.json"))["text_config"]["num_hidden_layers"]
json.dump(data, open(data_out, "w"), indent=4)
json.dump(model, open(model_out, "w"), indent=4)
PY

# 3. train (memory check: mmtune plan --model $REDUCED_HF_DIR --gpus $WORLD_SIZE --seq-length 8192)
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
    --train-iters 200 \
    --lr 1e-5 \
    --lr-decay-style cosine \
    --lr-warmup-fraction 0.1 \
    --weight-decay 0 \
    --clip-grad 1.0 \
    --seed 42 \
    --bf16 \
    --recompute-granularity full \
    --load $LOAD_PATH \
    --no-load-optim \
    --no-load-rng \
    --no-save-optim \
    --no-save-rng
"
OUTPUT_ARGS="
    --log-interval 1 \
    --log-tps \
    --save-interval 200 \
    --save $SAVE_PATH
"
mkdir -p logs
torchrun $DISTRIBUTED_ARGS -m mmtune train $GPT_ARGS --mm-data $MM_DATA --mm-model $MM_MODEL $OUTPUT_ARGS \
    2>&1 | tee "logs/train_glm4_5v_${NUM_LAYERS}layers.log"
