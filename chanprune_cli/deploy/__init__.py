"""Shipping a model: export to ONNX / TorchScript / plain safetensors (each checked against
PyTorch) and benchmarking models side by side with CI gates."""
