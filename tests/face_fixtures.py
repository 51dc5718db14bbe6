"""Tiny stand-in model files for the "restore faces" tests.

No pretrained weights exist on the test machine, so these helpers build small
or random-weight files that load through the same code paths as the real ones:

* ``write_yunet_onnx(path)`` - a hand-built ONNX net with YuNet's exact input
  name and output names/layout, accepted by ``cv2.FaceDetectorYN``. It really
  looks at the picture: it finds faces drawn by ``draw_face``.
* ``draw_face(image, box)`` - draws such a face inside ``box`` (in place).
* ``write_gfpgan(path, seed)`` - spandrel's GFPGAN (GFPGANv1Clean, 512) with
  seeded random weights, saved like GFPGANv1.4.pth: ``{"params_ema": sd}``
  (GFPGANer unwraps "params_ema", falling back to "params"; spandrel's
  canonicalize_state_dict unwraps either).
* ``write_codeformer(path, seed)`` - a small CodeFormer (needs
  spandrel_extra_arches), saved like codeformer.pth: ``{"params_ema": sd}``.

How the fixture detector works
------------------------------
``draw_face`` fills the box with a colour-coded card: blue = 255 (the "face"
mask), red = 255 * u and green = 255 * v, where (u, v) in [0, 1] is the
pixel's relative position inside the box. The net (input is OpenCV's blob:
BGR float 0..255, no scaling) averages each channel over every stride-s cell
(s = 8, 16, 32). For a cell whose 3x3 cell neighbourhood lies fully inside
the mask it emits a high score; from the cell's mean u and the difference of
its neighbours' means (du/dx = 1/w) it computes the box exactly:
    w = 2 s / (U[c+1] - U[c-1]),  cx = c s + s/2 + (1/2 - U[c]) w
and encodes it the way OpenCV decodes YuNet (see face_detect.cpp):
    cx = (c + bbox[0]) * s, cy = (r + bbox[1]) * s,
    w = exp(bbox[2]) * s,    h = exp(bbox[3]) * s,
    landmark_k = ((kps[2k] + c) * s, (kps[2k+1] + r) * s),
    score = sqrt(clamp(cls, 0, 1) * clamp(obj, 0, 1)).
Every covering anchor decodes to (nearly) the same box, so OpenCV's NMS keeps
one detection per face. Faces need to be at least ~40 px on each side.
Landmarks sit at FACE_LANDMARKS (fractions of the box).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

# YuNet landmark order: right eye, left eye, nose tip, right and left mouth
# corners ("right" = the person's right, i.e. the image's left side).
FACE_LANDMARKS = (
    (0.32, 0.34),
    (0.68, 0.34),
    (0.50, 0.55),
    (0.35, 0.75),
    (0.65, 0.75),
)
FACE_SCORE = 0.97  # score the fixture detector gives a found face (OpenCV default threshold is 0.9)
YUNET_STRIDES = (8, 16, 32)
YUNET_OUTPUT_NAMES = [
    f"{kind}_{s}" for kind in ("cls", "obj", "bbox", "kps") for s in YUNET_STRIDES
]


def draw_face(image, box) -> None:
    """Draw a face the fixture YuNet finds, filling box (x0, y0, x1, y1) in place.

    ``image`` is an RGB PIL image (x1/y1 exclusive). The detector expects the
    picture the way OpenCV is normally fed: converted to BGR uint8.
    """
    from PIL import Image

    x0, y0, x1, y1 = (int(round(v)) for v in box)
    w, h = x1 - x0, y1 - y0
    if w <= 0 or h <= 0:
        raise ValueError(f"empty face box {box}")
    u = (np.arange(w) + 0.5) / w
    v = (np.arange(h) + 0.5) / h
    card = np.empty((h, w, 3), np.uint8)
    card[..., 0] = np.round(255 * u)[None, :]
    card[..., 1] = np.round(255 * v)[:, None]
    card[..., 2] = 255
    patch = Image.fromarray(card, "RGB")
    if image.mode != "RGB":
        patch = patch.convert(image.mode)
    image.paste(patch, (x0, y0))


def _yunet_module():
    import torch
    import torch.nn.functional as F

    class FixtureYuNet(torch.nn.Module):
        def forward(self, x):  # x: (1, 3, H, W) BGR, 0..255
            b = x[:, 0:1] / 255.0
            g = x[:, 1:2] / 255.0
            r = x[:, 2:3] / 255.0
            mask = torch.clamp((b - 0.8) * 5.0, 0.0, 1.0)
            cls, obj, bbox, kps = [], [], [], []
            for s in YUNET_STRIDES:
                m = F.avg_pool2d(mask, s, s)
                uu = F.avg_pool2d(r, s, s)
                vv = F.avg_pool2d(g, s, s)
                # all 3x3 neighbour cells fully inside the face (zero padded)
                inside = F.avg_pool2d(m, 3, 1, 1, count_include_pad=True)
                score = torch.clamp((inside - 0.97) / 0.02, 0.0, 1.0)
                dx = uu[:, :, :, 2:] - uu[:, :, :, :-2]
                dy = vv[:, :, 2:, :] - vv[:, :, :-2, :]
                dx = F.pad(dx, (1, 1, 0, 0))
                dy = F.pad(dy, (0, 0, 1, 1))
                # a real gradient in both directions (not a flat bright area)
                score = score * torch.clamp(dx * 255.0 - 1.0, 0.0, 1.0)
                score = score * torch.clamp(dy * 255.0 - 1.0, 0.0, 1.0)
                score = score * FACE_SCORE
                dx = torch.clamp(dx, min=1e-3)
                dy = torch.clamp(dy, min=1e-3)
                wn = 2.0 / dx  # box width / stride
                hn = 2.0 / dy
                parts = [
                    0.5 + (0.5 - uu) * wn,
                    0.5 + (0.5 - vv) * hn,
                    torch.log(wn),
                    torch.log(hn),
                ]
                lm = []
                for ax, ay in FACE_LANDMARKS:
                    lm.append(0.5 + (ax - uu) * wn)
                    lm.append(0.5 + (ay - vv) * hn)

                def rows(t):  # (1, C, R, Cols) -> (1, R*Cols, C)
                    return t.flatten(2).transpose(1, 2)

                cls.append(rows(score))
                obj.append(rows(score))
                bbox.append(rows(torch.cat(parts, 1)))
                kps.append(rows(torch.cat(lm, 1)))
            return (*cls, *obj, *bbox, *kps)

    return FixtureYuNet()


def write_yunet_onnx(path: Path) -> Path:
    """Write a tiny YuNet-compatible ONNX detector (input "input", dynamic H, W)."""
    import warnings

    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = _yunet_module().eval()
    dummy = torch.zeros(1, 3, 64, 96)
    dyn = {"input": {2: "height", 3: "width"}}
    for name in YUNET_OUTPUT_NAMES:
        dyn[name] = {1: f"n_{name.split('_')[1]}"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=["input"],
            output_names=YUNET_OUTPUT_NAMES,
            dynamic_axes=dyn,
            opset_version=17,
            dynamo=False,
        )
    return path


# --------------------------------------------------------------------------
# face restorers


def _save(model, path: Path, half: bool) -> None:
    sd = model.state_dict()
    if half:  # spandrel builds the model in fp32 and copies these in
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    import torch

    torch.save({"params_ema": sd}, path)


def _unwrap(obj):
    return obj["params_ema"] if isinstance(obj, dict) and "params_ema" in obj else obj


def write_gfpgan(path: Path, seed: int = 0, half: bool = False) -> Path:
    """Write a random-weight GFPGAN v1.4-shaped file ({"params_ema": state_dict}).

    The architecture is fixed by spandrel (GFPGANv1Clean, out_size 512), so the
    file is full size (~349 MB; ~175 MB with half=True, which stores fp16
    tensors - the real file is fp32 - and still loads) and takes ~2 s.
    """
    import torch
    import engine.compat  # noqa: F401  (operator shim before spandrel)
    from spandrel.architectures.GFPGAN import GFPGAN

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = GFPGAN(
        out_size=512,
        num_style_feat=512,
        channel_multiplier=2,
        decoder_load_path=None,
        fix_decoder=False,
        num_mlp=8,
        input_is_latent=True,
        different_w=True,
        narrow=1,
        sft_half=True,
    )
    _save(model, path, half)
    return path


def write_codeformer(path: Path, seed: int = 0, half: bool = False) -> Path:
    """Write a small random-weight CodeFormer ({"params_ema": state_dict}).

    Needs spandrel_extra_arches (0.2.0). spandrel reads dim_embd, latent size,
    codebook size, layer count and connect_list from the state dict, so the
    transformer is shrunk (dim 64, 1 layer, 64 codes); the VQGAN encoder and
    generator are fixed (nf 64, ch_mult 1,2,2,4,4,8) and make up most of the
    ~297 MB (~149 MB with half=True). The real codeformer.pth is loaded with
    torch.load(path)["params_ema"] by CodeFormer's own scripts.
    """
    import torch
    import engine.compat  # noqa: F401
    from spandrel_extra_arches.architectures.CodeFormer import CodeFormer

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = CodeFormer(**CODEFORMER_SMALL)
    _save(model, path, half)
    return path


CODEFORMER_SMALL = dict(
    dim_embd=64,  # real: 512 (n_head stays 8: spandrel cannot read it)
    n_head=8,
    n_layers=1,  # real: 9
    codebook_size=64,  # real: 1024
    latent_size=256,
    connect_list=["32", "64", "128", "256"],
    fix_modules=["quantize", "generator"],
)


# --------------------------------------------------------------------------
# self-check


def detect(model_path, image):
    """Run cv2.FaceDetectorYN on an RGB PIL image; returns an (N, 15) array."""
    import cv2

    bgr = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2BGR)
    h, w = bgr.shape[:2]
    det = cv2.FaceDetectorYN.create(str(model_path), "", (w, h))
    det.setInputSize((w, h))
    _, faces = det.detect(bgr)
    return np.zeros((0, 15), np.float32) if faces is None else faces


def _check_boxes(faces, boxes, tol=0.15):
    assert len(faces) == len(boxes), f"{len(faces)} detections for {len(boxes)} faces"
    for x0, y0, x1, y1 in boxes:
        w, h = x1 - x0, y1 - y0
        best = min(
            faces,
            key=lambda f: abs(f[0] - x0) + abs(f[1] - y0),
        )
        fx, fy, fw, fh = best[:4]
        err = max(
            abs(fx - x0) / w, abs(fy - y0) / h, abs(fw - w) / w, abs(fh - h) / h
        )
        assert err <= tol, f"box {best[:4]} vs drawn {(x0, y0, w, h)}: err {err:.3f}"
        for k, (ax, ay) in enumerate(FACE_LANDMARKS):
            lx, ly = best[4 + 2 * k], best[5 + 2 * k]
            assert abs(lx - (x0 + ax * w)) <= tol * w and abs(ly - (y0 + ay * h)) <= tol * h
        assert best[14] > 0.5


def _self_check():
    import tempfile

    from PIL import Image

    tmp = Path(tempfile.mkdtemp(prefix="face_fixtures_"))
    t = time.perf_counter()
    onnx_path = write_yunet_onnx(tmp / "face_detection_yunet_2023mar.onnx")
    print(f"yunet: {onnx_path.stat().st_size} bytes, {time.perf_counter() - t:.2f}s")
    cases = [
        ((256, 192), [(80, 40, 176, 150)]),
        ((512, 384), [(40, 60, 200, 260), (290, 100, 470, 330)]),
        ((200, 150), [(20, 30, 90, 110)]),  # not a multiple of 32: OpenCV pads
    ]
    for size, boxes in cases:
        img = Image.new("RGB", size, (12, 10, 14))
        for b in boxes:
            draw_face(img, b)
        t = time.perf_counter()
        faces = detect(onnx_path, img)
        print(f"{size} drawn {boxes}: {time.perf_counter() - t:.3f}s")
        for f in faces:
            print("  box", np.round(f[:4], 1).tolist(), "lm",
                  np.round(f[4:14], 1).tolist(), "score", round(float(f[14]), 3))
        _check_boxes(faces, boxes)
    blank = Image.new("RGB", (256, 192), (12, 10, 14))
    assert len(detect(onnx_path, blank)) == 0, "detections on a blank image"
    print("yunet ok")

    import torch
    import engine.compat  # noqa: F401
    import spandrel

    makers = [("gfpgan", write_gfpgan)]
    try:
        import spandrel_extra_arches  # noqa: F401

        makers.append(("codeformer", write_codeformer))
        spandrel_extra_arches.install()
    except ImportError:
        print("spandrel_extra_arches not installed: skipping CodeFormer")
    for name, maker in makers:
        t = time.perf_counter()
        p = maker(tmp / f"{name}.pth")
        print(f"{name}: {p.stat().st_size / 1e6:.1f} MB written in {time.perf_counter() - t:.1f}s")
        sd = _unwrap(torch.load(p, map_location="cpu", weights_only=True))
        desc = spandrel.ModelLoader().load_from_state_dict(sd)
        assert isinstance(desc, spandrel.ImageModelDescriptor), type(desc)
        assert spandrel.ModelLoader().load_from_file(p).purpose == "FaceSR"
        p.unlink()
        half = maker(tmp / f"{name}-fp16.pth", half=True)
        hdesc = spandrel.ModelLoader().load_from_file(half)
        print(f"{name} half=True: {half.stat().st_size / 1e6:.1f} MB, loads as "
              f"{hdesc.architecture.id} {next(hdesc.model.parameters()).dtype}")
        half.unlink()
        del hdesc
        assert desc.purpose == "FaceSR", desc.purpose
        desc.model.eval()
        x = torch.rand(1, 3, 512, 512) * 2 - 1
        t = time.perf_counter()
        with torch.no_grad():
            y = desc(x)
        print(f"{name}: {desc.architecture.id} {desc.purpose}, forward {tuple(y.shape)} "
              f"in {time.perf_counter() - t:.1f}s")
        assert tuple(y.shape) == (1, 3, 512, 512)
    print("all ok")


if __name__ == "__main__":
    _self_check()
