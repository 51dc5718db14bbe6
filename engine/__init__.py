"""Easel's engine: model loading, device and precision, generation, metadata. No Gradio here.

Importing the package loads nothing heavy: the UI imports the torch-free modules (errors, jobs,
request, images, infotext) without pulling torch in. Every module that needs transformers or
diffusers imports `engine.compat` first (it makes torchvision importable beside a CPU torch).
"""

__version__ = "0.1.0"
