# Environment for mmtune GLM-4.5V training on CUDA GPUs; sourced by the launch scripts.
# (The CUDA/NCCL counterparts of the recipe's Ascend variables: PYTORCH_NPU_ALLOC_CONF,
# HCCL_CONNECT_TIMEOUT / HCCL_EXEC_TIMEOUT, ASCEND_GLOBAL_LOG_LEVEL, TOKENIZERS_PARALLELISM.)

# Caching allocator: grow segments instead of allocating fixed blocks. Batches of varying length
# otherwise fragment memory until a large all-gather buffer no longer fits (recipe: PYTORCH_NPU_ALLOC_CONF).
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

# NCCL watchdog. A collective that has not finished after --distributed-timeout-minutes (the
# process-group timeout, recipe: HCCL_EXEC_TIMEOUT) is an error; 3 = tear the process down so torchrun
# stops the job instead of hanging forever (torch's default, set here to be explicit).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=3
# The watchdog itself is declared hung after this many seconds without progress.
export TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC=1800
# The flight recorder: every process group (NCCL and gloo) records its last 2000 collectives -- op, group,
# sequence number, sizes. On a timeout each rank dumps its record to TORCH_FR_DUMP_TEMP_FILE<rank>; the
# rank whose sequence numbers stop earliest is the one that hung. Compare the dumps of all ranks with
#   python -m torch.distributed.flight_recorder.fr_trace logs/flight_recorder -p nccl_trace_rank_
# `mmtune train` turns the recorder on by itself when no size is set, and names a failed collective that
# reaches Python on one line from it. (TORCH_FR_* are torch's current names for the older
# TORCH_NCCL_TRACE_BUFFER_SIZE / TORCH_NCCL_DEBUG_INFO_TEMP_FILE.)
export TORCH_FR_BUFFER_SIZE=2000
export TORCH_NCCL_DUMP_ON_TIMEOUT=1
mkdir -p logs/flight_recorder
export TORCH_FR_DUMP_TEMP_FILE=${TORCH_FR_DUMP_TEMP_FILE:-$PWD/logs/flight_recorder/nccl_trace_rank_}

# torchrun --max-restarts: give every attempt a fresh rendezvous store. By default torchrun's agent keeps one
# store for all attempts, and a restarted worker can read a dead attempt's addresses and fail to connect
# (pytorch issue 135712). With --rdzv-backend c10d this variable makes each attempt start its own store.
# (On one node `mmtune train` isolates the attempts itself.)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

# NCCL's own log: WARN prints only problems; INFO prints the topology, rings and transports chosen
# (use it once on a new cluster to check that InfiniBand/NVLink are used, recipe: ASCEND_GLOBAL_LOG_LEVEL).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# On hosts with several network interfaces, name the one the nodes reach each other through, e.g.
# export NCCL_SOCKET_IFNAME=eth0   (and GLOO_SOCKET_IFNAME for torchrun's rendezvous)
# Establishing connections between nodes at start-up (recipe: HCCL_CONNECT_TIMEOUT) is bounded by
# torchrun's rendezvous; a slow InfiniBand fabric may need NCCL_IB_TIMEOUT=22.

# HF tokenizers run their own thread pool; with forked data-loader workers that deadlocks or warns.
# mmtune tokenises in the workers, so the tokenizer's own threads are off.
export TOKENIZERS_PARALLELISM=false
# Threads per process for CPU-side work (image decoding, collation); torchrun sets 1 otherwise.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
# Nothing is downloaded at run time: every path below is local.
export HF_HUB_OFFLINE=1
