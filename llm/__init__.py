"""llm: pretrain and fine-tune Transformer models with DeepSpeed ZeRO, Arrow data and fused kernels."""

__version__ = "0.1.0"
