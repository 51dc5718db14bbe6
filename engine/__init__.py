"""Easel's engine: model loading, device and precision, generation, metadata. No Gradio here."""
from engine.compat import ensure_torchvision_importable

__version__ = "0.1.0"
# Must run before anything imports transformers (which imports torchvision): see compat.py.
TORCHVISION_STATUS = ensure_torchvision_importable()
