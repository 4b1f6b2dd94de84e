"""dsft: distributed supervised fine-tuning of Hugging Face causal LMs on DeepSpeed."""

__version__ = "0.1.0"
