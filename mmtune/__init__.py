"""mmtune: finetune GLM-4.5V (glm4v_moe) and its family on torchrun + FSDP2 + DCP, on CUDA GPUs and CPUs."""

__version__ = "0.1.0"
