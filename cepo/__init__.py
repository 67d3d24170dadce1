"""cepo: a thin CEPO / RLSD / GRPO trainer on DeepSpeed, built on ``cepo_kernels``."""

__version__ = "0.1.0"
