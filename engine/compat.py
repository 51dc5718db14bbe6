"""Make torchvision importable beside a CPU-only torch.

PyPI only carries CUDA builds of torchvision. Installed beside the CPU torch wheel, its compiled
operators fail to load, and `import torchvision` then dies registering fake kernels for
`torchvision::nms` ("operator torchvision::nms does not exist"). transformers imports torchvision
whenever it is installed, so that one failure takes transformers, diffusers, open_clip and
spandrel down with it.

Easel needs none of torchvision's compiled operators (it uses no detection ops), only its Python
modules. So, when - and only when - the real operators cannot be loaded, we declare the two
operator schemas that torchvision's import-time registrations expect. A user with matching
torch/torchvision GPU wheels has the real operators, and this module then changes nothing.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

# Schemas as torchvision declares them (torchvision/csrc/ops/nms.cpp).
_MISSING_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_shim_library = None  # keeps the torch.library.Library alive; it unregisters when collected


def _torchvision_ops_present() -> bool:
    try:
        torch.ops.torchvision.nms  # noqa: B018 - attribute lookup is the probe
        return True
    except (AttributeError, RuntimeError):
        return False


def _try_load_real_operators(package_dir: Path) -> None:
    for lib in sorted(package_dir.glob("_C*")):
        if lib.suffix in (".so", ".pyd", ".dylib"):
            try:
                torch.ops.load_library(str(lib))
            except (OSError, RuntimeError):
                pass  # built for another torch/CUDA: fall through to the shim


def ensure_torchvision_importable() -> str:
    """Returns 'absent', 'native' or 'shimmed' (what was found or done)."""
    global _shim_library
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return "absent"
    if _shim_library is not None:
        return "shimmed"
    if not _torchvision_ops_present():
        _try_load_real_operators(Path(spec.origin).parent)
    if _torchvision_ops_present():
        return "native"
    _shim_library = torch.library.Library("torchvision", "DEF")
    for schema in _MISSING_SCHEMAS.values():
        _shim_library.define(schema)
    return "shimmed"


# Runs once, when the first module that needs transformers or diffusers imports this one.
TORCHVISION_STATUS = ensure_torchvision_importable()


def quiet_library_logs() -> None:
    """diffusers/transformers talk a lot (progress bars per component, advice meant for their own
    developers). Easel reports progress itself; keep their warnings-and-above only."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
