"""ControlNet preprocessors: image -> control map. Canny is OpenCV; depth and pose use real estimator models
when a local one is configured (no downloads), otherwise they fail with a clear message.

The estimators are loaded models like the bases and ControlNets: the PipelineManager loads them (`load_estimator`),
counts them in its LRU budget, holds them while a map is made and can unload them; this module only turns a loaded
`Estimator` and an image into a map.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image

from . import import_libraries
from ..requests import RequestError

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch

EstimatorKind = Literal["depth", "pose"]

_MISSING = {
    "depth": "depth needs a local depth-estimation model: set depth_estimator (DS_DEPTH_ESTIMATOR) to a "
             "transformers model folder",
    "pose": "pose needs a local pose-estimation model: set pose_estimator (DS_POSE_ESTIMATOR) to a transformers "
            "VitPose model folder",
}


@dataclass
class Estimator:
    """A loaded depth or pose model with its image processor. Calls are serialised by its own lock (transformers
    processors and models are not promised to be safe under concurrent calls; a map takes milliseconds)."""

    kind: EstimatorKind
    folder: str
    processor: Any
    model: torch.nn.Module
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def estimator_folder(kind: EstimatorKind, folder: str | None) -> str:
    """The configured estimator folder for `kind`, or the error saying how to configure one."""
    if not folder:
        raise RequestError("control_type", _MISSING[kind])
    return folder


def load_estimator(kind: EstimatorKind, folder: str) -> Estimator:
    """Read an estimator from a local transformers folder (never the hub); a clear error when it can't be."""
    import_libraries()  # one importer at a time (engine/__init__.py)
    from transformers import (
        AutoImageProcessor,
        AutoModelForDepthEstimation,
        AutoProcessor,
        VitPoseForPoseEstimation,
    )

    try:
        if kind == "depth":
            processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
            model = AutoModelForDepthEstimation.from_pretrained(folder, local_files_only=True)
        else:
            processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            model = VitPoseForPoseEstimation.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise RequestError("control_type", f"{kind} estimator at '{folder}' can't be loaded: {exc}") from None
    return Estimator(kind, folder, processor, model.eval())


def canny(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    import cv2
    gray = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(gray, low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def depth(image: Image.Image, estimator: Estimator) -> Image.Image:
    import cv2
    import torch
    image = image.convert("RGB")
    with estimator.lock, torch.inference_mode():
        inputs = estimator.processor(images=image, return_tensors="pt")
        outputs = estimator.model(**inputs)
        # As transformers' depth-estimation pipeline does: the processor's own post-processing, at the image size.
        predicted = estimator.processor.post_process_depth_estimation(outputs, [image.size[::-1]])[0]
    values = predicted["predicted_depth"].squeeze().float().cpu().numpy()
    if not np.isfinite(values).all():
        raise RequestError("control_type", f"the depth estimator at '{estimator.folder}' returned non-finite depth")
    # Resize first, then stretch to 0..255: cubic resizing of an already-stretched map overshoots and misses the ends.
    values = cv2.resize(values, image.size, interpolation=cv2.INTER_CUBIC)
    values = (values - values.min()) / max(float(values.max() - values.min()), 1e-8)
    gray = np.round(values * 255).astype(np.uint8)
    return Image.fromarray(np.stack([gray] * 3, axis=-1))


def pose(image: Image.Image, estimator: Estimator) -> Image.Image:
    """Keypoints of the person filling the frame (VitPose on the whole image), drawn white on black."""
    import cv2
    import torch
    width, height = image.size
    boxes = [[[0, 0, width, height]]]
    with estimator.lock, torch.inference_mode():
        inputs = estimator.processor(image.convert("RGB"), boxes=boxes, return_tensors="pt")
        outputs = estimator.model(**inputs)
        people = estimator.processor.post_process_pose_estimation(outputs, boxes=boxes)[0]
    canvas = np.zeros((height, width, 3), np.uint8)
    for person in people:
        for (x, y), score in zip(person["keypoints"].numpy(), person["scores"].numpy()):
            if score > 0.3:
                cv2.circle(canvas, (int(x), int(y)), max(2, width // 128), (255, 255, 255), -1)
    return Image.fromarray(canvas)


def inpaint_condition(image: Image.Image, mask: Image.Image) -> torch.Tensor:
    """An inpainting ControlNet's control: the image in [0, 1] with the masked pixels set to -1, 1 x 3 x H x W.
    That is the convention of lllyasviel's control_v11p_sd15_inpaint, and diffusers' ControlNet inpainting
    pipelines pass a tensor control through unnormalised, so the marker survives."""
    import torch
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), np.float32) / 255).permute(2, 0, 1).contiguous()
    pixels[:, torch.from_numpy(np.asarray(mask.convert("L").resize(image.size)) > 127)] = -1.0
    return pixels[None]


def make_control_image(image: Image.Image, control_type: str, canny_low: int = 100, canny_high: int = 200,
                       estimator: Estimator | None = None) -> Image.Image:
    """The control map a ControlNet of `control_type` expects, from an ordinary picture. Depth and pose need the
    loaded `estimator` of their kind (the PipelineManager's `use_estimator`)."""
    if control_type == "canny":
        return canny(image, canny_low, canny_high)
    if control_type in ("depth", "pose"):
        if estimator is None or estimator.kind != control_type:
            raise RequestError("control_type", _MISSING[control_type])
        return depth(image, estimator) if control_type == "depth" else pose(image, estimator)
    raise RequestError("control_type", f"unknown control type '{control_type}'; use canny, depth or pose")
