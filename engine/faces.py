"""Restore faces (A1111's "Restore faces"): after a picture is decoded, find its faces, redraw each
with a face restoration network, and blend it back in.

- Finding: OpenCV's YuNet detector (`cv2.FaceDetectorYN`; the model file
  face_detection_yunet_2023mar.onnx from the OpenCV zoo, 227 KB, MIT) gives each face's box, a
  score and five landmarks (eyes, nose tip, mouth corners). A1111 uses facexlib's RetinaFace;
  facexlib needs opencv-python (and the system's libGL) beside our headless OpenCV, while OpenCV's
  own detector does the same job in one call with the cv2 Easel already has.
- Aligning: the five landmarks are mapped onto the FFHQ 512x512 layout GFPGAN and CodeFormer were
  trained on by a similarity transform (`cv2.estimateAffinePartial2D`), and the face is cut out
  with it (outside the picture: facexlib's grey, so the network sees what it saw in training).
- Restoring: GFPGAN (what GFPGANv1.4.pth holds; spandrel's core) from models/GFPGAN, or CodeFormer
  (spandrel_extra_arches, when installed) from models/Codeformer, read by the safe reader and built
  by spandrel from the keys. Both take and give RGB in [-1, 1] at 512x512. CodeFormer's weight is
  A1111's `code_former_weight`: 0 restores the most, 1 stays closest to the face as drawn. GFPGAN
  runs on the noise maps stored in its file rather than fresh noise (A1111 draws new noise per
  call), so the same seed gives the same pixels with restore faces on too.
- Pasting back: the restored face goes back through the inverse transform, blended through the
  crop's own outline eroded and feathered by a fraction of the face's width, so no seam shows.
  Pixels away from every face are the picture's own, exactly.

Names are A1111's ("GFPGAN", "CodeFormer"); each resolves to a file found in its folder only.
The networks run on torch on the engine's device in float32 (GFPGAN has no half-precision path).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from engine.errors import RequestError, UnknownCheckpointError
from engine.jobs import Job, check_cancelled
from engine.library import CHECKPOINT_SUFFIXES, ModelLibrary
from engine.request import FACE_RESTORERS

# The folder each restorer lives in, and the word its file names hold (an A1111 GFPGAN folder also
# holds facexlib's detection and parsing files); in FACE_RESTORERS' order, the order one is chosen
# in when none is named (GFPGAN first: its licence allows any use, CodeFormer's does not).
_FOLDERS = {"GFPGAN": ("GFPGAN", "gfpgan"), "CodeFormer": ("Codeformer", "codeformer")}
RESTORERS = {name: _FOLDERS[name] for name in FACE_RESTORERS}
DETECTOR_PREFIX = "face_detection_yunet"  # face_detection_yunet_2023mar.onnx, in models/GFPGAN or models/Codeformer
DETECTOR_FOLDERS = ("GFPGAN", "Codeformer")
DETECTOR_DOWNLOAD = "yunet-face-detector"  # the catalogue entries that fetch the files (engine/configs/catalog.json)
DOWNLOADS = {"GFPGAN": "gfpgan-1.4", "CodeFormer": "codeformer"}
MAX_DETECTOR_BYTES = 16 * 1024 * 1024  # YuNet is 227 KB; anything far larger is not it
FACE_SIZE = 512
CODEFORMER_WEIGHT = 0.5  # A1111's default
SCORE_THRESHOLD = 0.9    # YuNet's own default: lower finds faces in textures
NMS_THRESHOLD = 0.3
# Where the (image-left) eye, the other eye, the nose tip and the two mouth corners sit in an
# FFHQ-aligned 512x512 face: the layout GFPGAN and CodeFormer were trained on.
FFHQ_LANDMARKS = np.array([[192.98138, 239.94708], [318.90277, 240.19360], [256.63416, 314.01935],
                           [201.26117, 371.41043], [313.08905, 371.15118]], dtype=np.float32)
OUTSIDE_GREY = (135, 133, 132)  # what the crop holds beyond the picture's edge (RGB)


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # x, y, width, height in the picture
    landmarks: np.ndarray                   # 5x2, in FFHQ_LANDMARKS' order
    score: float


@dataclass(frozen=True)
class Restored:
    image: Image.Image
    faces: int   # how many faces were redrawn


def detect_faces(detector, image: Image.Image) -> list[Face]:
    """The faces YuNet finds in `image`, best first. YuNet's rows: box (4), right eye, left eye,
    nose tip, right and left mouth corner (2 each, the person's right), score."""
    import cv2

    rgb = np.asarray(image.convert("RGB"))
    detector.setInputSize((rgb.shape[1], rgb.shape[0]))
    _, rows = detector.detect(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    faces = []
    for row in ([] if rows is None else rows):
        points = np.asarray(row[4:14], dtype=np.float32).reshape(5, 2)
        # The template is in picture order (image-left eye first); sort each pair by x so a
        # face seen in profile or mirrored still maps eye to eye.
        eyes, mouth = sorted(points[:2].tolist()), sorted(points[3:5].tolist())
        landmarks = np.array([*eyes, points[2].tolist(), *mouth], dtype=np.float32)
        faces.append(Face(tuple(float(v) for v in row[:4]), landmarks, float(row[14])))
    return sorted(faces, key=lambda f: -f.score)


def align(image: np.ndarray, face: Face) -> tuple[np.ndarray, np.ndarray]:
    """The face cut out at FACE_SIZE and the 2x3 transform that cut it (picture -> crop)."""
    import cv2

    matrix, _ = cv2.estimateAffinePartial2D(face.landmarks, FFHQ_LANDMARKS, method=cv2.LMEDS)
    if matrix is None:  # degenerate landmarks (all on one point): fall back to the box
        x, y, w, h = face.box
        scale = FACE_SIZE / max(w, h, 1.0)
        matrix = np.array([[scale, 0, -x * scale], [0, scale, -y * scale]], dtype=np.float64)
    crop = cv2.warpAffine(image, matrix, (FACE_SIZE, FACE_SIZE), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=OUTSIDE_GREY)
    return crop, matrix


def paste_back(image: np.ndarray, restored: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """`image` with `restored` (a FACE_SIZE crop made by `matrix`) blended back where it came
    from: the crop's outline in the picture, eroded and feathered by a twentieth of the face's
    width (facexlib's proportions). Outside that outline the picture is untouched."""
    import cv2

    height, width = image.shape[:2]
    inverse = cv2.invertAffineTransform(matrix)
    back = cv2.warpAffine(restored, inverse, (width, height), flags=cv2.INTER_LINEAR)
    outline = cv2.warpAffine(np.ones((FACE_SIZE, FACE_SIZE), np.float32), inverse, (width, height),
                             flags=cv2.INTER_NEAREST)
    outline = cv2.erode(outline, np.ones((3, 3), np.uint8))  # the resampled edge is half grey
    edge = max(1, int(np.sqrt(outline.sum())) // 20)
    inner = cv2.erode(outline, np.ones((2 * edge, 2 * edge), np.uint8))
    soft = cv2.GaussianBlur(inner, (2 * edge + 1, 2 * edge + 1), 0)
    soft = np.minimum(soft, outline)[..., None]  # never outside the crop's own pixels
    blended = image.astype(np.float32) * (1.0 - soft) + back.astype(np.float32) * soft
    result = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    untouched = soft[..., 0] == 0
    result[untouched] = image[untouched]  # exact outside: no rounding drift
    return result


def load_restorer(path: Path, device: str = "cpu"):
    """The face network in `path` (GFPGAN or CodeFormer), in eval mode on `device`: the raw
    torch module and spandrel's architecture id."""
    from engine.safe_files import read_tensors

    state_dict = read_tensors(Path(path))  # refuses code-running pickles, unwraps params_ema
    import engine.compat  # noqa: F401 - spandrel imports torchvision: the operator shim first
    from spandrel import ModelLoader, UnsupportedModelError

    try:  # CodeFormer is one of spandrel's extra architectures (non-commercial licence): optional
        import spandrel_extra_arches
        spandrel_extra_arches.install(ignore_duplicates=True)
    except ImportError:
        pass
    try:
        descriptor = ModelLoader(device="cpu").load_from_state_dict(state_dict)
    except UnsupportedModelError:
        raise UnknownCheckpointError(f"{Path(path).name}: not a face restoration model Easel knows "
                                     "(GFPGAN; CodeFormer with spandrel_extra_arches installed)") from None
    except Exception as e:  # noqa: BLE001 - a known architecture with inconsistent shapes
        text = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UnknownCheckpointError(f"{Path(path).name}: looks like a face model but cannot be built ({text})") from None
    arch = descriptor.architecture.id
    if arch not in RESTORERS:
        raise UnknownCheckpointError(f"{Path(path).name}: is a {descriptor.architecture.name} model, "
                                     "not GFPGAN or CodeFormer")
    return descriptor.model.eval().to(device), arch


def _run_network(network, arch: str, crop: np.ndarray, weight: float, device: str) -> np.ndarray:
    import torch

    pixels = torch.from_numpy(crop).permute(2, 0, 1)[None].to(device=device, dtype=torch.float32)
    pixels = pixels / 127.5 - 1.0
    with torch.inference_mode():
        out = network(pixels, weight=weight, adain=True)[0] if arch == "CodeFormer" \
            else network(pixels, return_rgb=False, randomize_noise=False)[0]
    out = ((out[0].float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return out.permute(1, 2, 0).cpu().numpy()


class FaceRestorers:
    """The face restorers of one models folder; keeps the last network and the detector loaded."""

    def __init__(self, library: ModelLibrary, device: str = "cpu"):
        self.library, self.device = library, device
        self._network: tuple[tuple, object, str] | None = None
        self._detector: tuple[tuple, object] | None = None

    def _files(self, folder: str, word: str) -> list[Path]:
        root = self.library.models_dir / folder
        if not root.is_dir():
            return []
        found = [p for p in root.iterdir() if p.is_file() and word in p.name.lower()
                 and p.name.lower().endswith(CHECKPOINT_SUFFIXES)]
        return sorted(found, key=lambda p: p.name.lower(), reverse=True)  # GFPGANv1.4 before v1.3

    def file(self, name: str) -> Path | None:
        folder, word = RESTORERS[name]
        files = self._files(folder, word)
        return files[0] if files else None

    def detector_file(self) -> Path | None:
        for folder in DETECTOR_FOLDERS:
            root = self.library.models_dir / folder
            if root.is_dir():
                found = sorted((p for p in root.iterdir() if p.is_file() and p.name.startswith(DETECTOR_PREFIX)
                                and p.suffix.lower() == ".onnx"), reverse=True)
                if found:
                    return found[0]
        return None

    def names(self) -> list[str]:
        """The restorers with a weight file on disk, in RESTORERS' order."""
        return [name for name in RESTORERS if self.file(name) is not None]

    def resolve(self, name: str | None) -> str:
        """The restorer a job uses (None: the first on disk), with its detector on disk too;
        RequestError naming `face_restorer` or `restore_faces` (and the downloads) otherwise."""
        if name is not None and name not in RESTORERS:
            raise RequestError("face_restorer", f"must be one of {', '.join(RESTORERS)}, got {name!r}")
        chosen = name or next(iter(self.names()), None)
        if chosen is None or self.file(chosen) is None:
            wanted = chosen or "GFPGAN"
            folder = RESTORERS[wanted][0]
            raise RequestError("restore_faces", f"no {wanted} model in models/{folder}: download one "
                                                f"(app.py download {DOWNLOADS[wanted]}, or the Models tab)")
        if self.detector_file() is None:
            raise RequestError("restore_faces", f"restoring faces needs the face detector {DETECTOR_PREFIX}_2023mar.onnx "
                                                f"in models/GFPGAN: app.py download {DETECTOR_DOWNLOAD} (or the Models tab)")
        return chosen

    def restore(self, image: Image.Image, name: str, weight: float = CODEFORMER_WEIGHT,
                job: Job | None = None) -> Restored:
        """`image` with every face found redrawn by the restorer `name` (already resolved)."""
        detector = self._load_detector()
        faces = detect_faces(detector, image)
        if not faces:
            return Restored(image, 0)
        network, arch = self._load_network(self.file(name))
        pixels = np.array(image.convert("RGB"))
        for face in faces:
            if job is not None:
                check_cancelled(job)
            crop, matrix = align(pixels, face)
            pixels = paste_back(pixels, _run_network(network, arch, crop, weight, self.device), matrix)
        return Restored(Image.fromarray(pixels, "RGB"), len(faces))

    def _load_network(self, path: Path):
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns, self.device)
        if self._network is None or self._network[0] != key:
            self._network = None
            self._network = (key, *load_restorer(path, self.device))
        return self._network[1], self._network[2]

    def _load_detector(self):
        import cv2

        path = self.detector_file()
        if path is None:
            raise RequestError("restore_faces", f"the face detector is gone from models/GFPGAN: "
                                                f"app.py download {DETECTOR_DOWNLOAD}")
        stat = path.stat()
        if stat.st_size > MAX_DETECTOR_BYTES:
            raise UnknownCheckpointError(f"{path.name}: {stat.st_size} bytes is not a YuNet face detector")
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if self._detector is None or self._detector[0] != key:
            try:
                detector = cv2.FaceDetectorYN.create(str(path), "", (FACE_SIZE, FACE_SIZE), SCORE_THRESHOLD,
                                                     NMS_THRESHOLD, 5000)
            except cv2.error as e:
                raise UnknownCheckpointError(f"{path.name}: OpenCV cannot read it as a YuNet face detector "
                                             f"({str(e).strip().splitlines()[-1][:160]})") from None
            self._detector = (key, detector)
        return self._detector[1]
