"""Easel's engine: model loading, device and precision, generation, metadata. No Gradio here."""
from engine.compat import ensure_torchvision_importable

TORCHVISION_STATUS = ensure_torchvision_importable()
