"""Triton kernels of adalora_fast (installed as ``adalora_fast.kernels``). No nn.Module here."""
