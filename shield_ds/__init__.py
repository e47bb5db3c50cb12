"""shield-ds: Precise Shield (neuron-level safety alignment of VLLMs) on DeepSpeed."""

__version__ = "0.1.0"
