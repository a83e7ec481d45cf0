"""Using a distilled student: predictions, export (ONNX / TorchScript), new class names."""
