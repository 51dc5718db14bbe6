"""Easel's web UI: Gradio Blocks over `engine.engine.Engine`.

This package never imports torch, diffusers or transformers itself; everything heavy goes
through the engine. Gradio's usage analytics are switched off before Gradio is imported, so the
server sends nothing anywhere.
"""
import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
