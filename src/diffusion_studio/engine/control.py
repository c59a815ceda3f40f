"""ControlNet preprocessors: image -> control map. Canny is OpenCV; depth and pose use real estimator models
when a local one is configured (no downloads), otherwise they fail with a clear message."""

from __future__ import annotations

import threading
from functools import lru_cache

import cv2
import numpy as np
import torch
from PIL import Image

from ..requests import RequestError

_estimator_lock = threading.Lock()


def canny(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    gray = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(gray, low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def depth(image: Image.Image, model_folder: str | None) -> Image.Image:
    if not model_folder:
        raise RequestError("control_type", "depth needs a local depth-estimation model: set depth_estimator "
                                           "(DS_DEPTH_ESTIMATOR) to a transformers model folder")
    with _estimator_lock:
        estimator = _depth_pipeline(model_folder)
        predicted = estimator(image.convert("RGB"))["predicted_depth"]
    values = predicted.squeeze().float().cpu().numpy()
    if not np.isfinite(values).all():
        raise RequestError("control_type", f"the depth estimator at '{model_folder}' returned non-finite depth")
    # Resize first, then stretch to 0..255: cubic resizing of an already-stretched map overshoots and misses the ends.
    values = cv2.resize(values, image.size, interpolation=cv2.INTER_CUBIC)
    values = (values - values.min()) / max(float(values.max() - values.min()), 1e-8)
    gray = np.round(values * 255).astype(np.uint8)
    return Image.fromarray(np.stack([gray] * 3, axis=-1))


@lru_cache(maxsize=2)
def _depth_pipeline(model_folder: str):
    from transformers import pipeline

    try:
        return pipeline("depth-estimation", model=model_folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise RequestError("control_type", f"depth estimator at '{model_folder}' can't be loaded: {exc}") from None


def pose(image: Image.Image, model_folder: str | None) -> Image.Image:
    """Keypoints of the person filling the frame (VitPose on the whole image), drawn white on black."""
    if not model_folder:
        raise RequestError("control_type", "pose needs a local pose-estimation model: set pose_estimator "
                                           "(DS_POSE_ESTIMATOR) to a transformers VitPose model folder")
    width, height = image.size
    boxes = [[[0, 0, width, height]]]
    with _estimator_lock:
        processor, model = _pose_model(model_folder)
        inputs = processor(image.convert("RGB"), boxes=boxes, return_tensors="pt")
        with torch.no_grad():
            outputs = model(**inputs)
        people = processor.post_process_pose_estimation(outputs, boxes=boxes)[0]
    canvas = np.zeros((height, width, 3), np.uint8)
    for person in people:
        for (x, y), score in zip(person["keypoints"].numpy(), person["scores"].numpy()):
            if score > 0.3:
                cv2.circle(canvas, (int(x), int(y)), max(2, width // 128), (255, 255, 255), -1)
    return Image.fromarray(canvas)


@lru_cache(maxsize=2)
def _pose_model(model_folder: str):
    from transformers import AutoProcessor, VitPoseForPoseEstimation

    try:
        return (AutoProcessor.from_pretrained(model_folder, local_files_only=True),
                VitPoseForPoseEstimation.from_pretrained(model_folder, local_files_only=True).eval())
    except (OSError, ValueError) as exc:
        raise RequestError("control_type", f"pose estimator at '{model_folder}' can't be loaded: {exc}") from None


def inpaint_condition(image: Image.Image, mask: Image.Image) -> torch.Tensor:
    """An inpainting ControlNet's control: the image in [0, 1] with the masked pixels set to -1, 1 x 3 x H x W.
    That is the convention of lllyasviel's control_v11p_sd15_inpaint, and diffusers' ControlNet inpainting
    pipelines pass a tensor control through unnormalised, so the marker survives."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), np.float32) / 255).permute(2, 0, 1).contiguous()
    pixels[:, torch.from_numpy(np.asarray(mask.convert("L").resize(image.size)) > 127)] = -1.0
    return pixels[None]


def make_control_image(image: Image.Image, control_type: str, canny_low: int = 100, canny_high: int = 200,
                       depth_estimator: str | None = None, pose_estimator: str | None = None) -> Image.Image:
    """The control map a ControlNet of `control_type` expects, from an ordinary picture."""
    if control_type == "canny":
        return canny(image, canny_low, canny_high)
    if control_type == "depth":
        return depth(image, depth_estimator)
    if control_type == "pose":
        return pose(image, pose_estimator)
    raise RequestError("control_type", f"unknown control type '{control_type}'; use canny, depth or pose")
