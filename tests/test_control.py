"""ControlNet preprocessors with real (tiny, local) estimator models, and through the engine."""

import numpy as np
import torch
import pytest
from transformers import (
    DPTConfig,
    DPTForDepthEstimation,
    DPTImageProcessor,
    VitPoseBackboneConfig,
    VitPoseConfig,
    VitPoseForPoseEstimation,
    VitPoseImageProcessor,
)

from diffusion_studio.engine.control import canny, depth, inpaint_condition, load_estimator, make_control_image, pose
from diffusion_studio.engine.runner import Engine
from diffusion_studio.requests import GenerationRequest, RequestError


@pytest.fixture(scope="module")
def depth_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dpt")
    torch.manual_seed(0)  # a random tiny model: without a seed its depth map is sometimes flat or not finite
    config = DPTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=37, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 16, 32, 32],
                       fusion_hidden_size=16, is_hybrid=False)
    DPTForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def pose_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vitpose")
    backbone = VitPoseBackboneConfig(image_size=[64, 48], patch_size=[16, 16], hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=37, out_indices=[2])
    VitPoseForPoseEstimation(VitPoseConfig(backbone_config=backbone)).save_pretrained(folder)
    VitPoseImageProcessor(size={"height": 64, "width": 48}).save_pretrained(folder)
    return str(folder)


def test_inpaint_condition_marks_the_hole_with_minus_one(shape_image, center_mask):
    condition = inpaint_condition(shape_image, center_mask)[0]
    hole = torch.from_numpy(np.asarray(center_mask) > 127)
    assert condition.shape == (3, *hole.shape)
    assert (condition[:, hole] == -1).all()
    expected = torch.from_numpy(np.asarray(shape_image, np.float32) / 255).permute(2, 0, 1)
    assert torch.equal(condition[:, ~hole], expected[:, ~hole])  # the rest is the image, in [0, 1]


def test_canny_thresholds_change_the_edges(shape_image):
    strict, loose = np.asarray(canny(shape_image, 250, 255)), np.asarray(canny(shape_image, 10, 20))
    assert (loose > 0).sum() >= (strict > 0).sum() > 0


def test_depth_map_from_a_local_model(depth_folder, shape_image):
    result = np.asarray(depth(shape_image, load_estimator("depth", depth_folder)))
    assert result.shape == (64, 64, 3) and result.dtype == np.uint8
    assert result.max() == 255 and result.min() == 0  # normalised to the full range


def test_pose_map_from_a_local_model(pose_folder, shape_image):
    result = np.asarray(pose(shape_image, load_estimator("pose", pose_folder)))
    assert result.shape == (64, 64, 3) and result.dtype == np.uint8


def test_missing_or_broken_estimator_is_a_clear_error(tmp_path, shape_image):
    with pytest.raises(RequestError, match="control_type: depth estimator at .* can't be loaded"):
        load_estimator("depth", str(tmp_path))
    with pytest.raises(RequestError, match="control_type: pose needs a local pose-estimation model"):
        make_control_image(shape_image, "pose")


def test_depth_control_through_the_engine(make_config, depth_folder, shape_image):
    engine = Engine(make_config(depth_estimator=depth_folder, max_loaded_models=3))
    request = GenerationRequest(mode="controlnet", control_type="depth", control_image=shape_image, steps=2,
                                seed=1, controlnet="builtin:shapes-canny", prompt="a red circle")
    result = engine.run(request)
    expected = depth(shape_image, load_estimator("depth", depth_folder))
    assert np.array_equal(np.asarray(result.control_image), np.asarray(expected))
    assert result.images[0].size == (64, 64)
    # The estimator is a loaded model like the base and the ControlNet: listed, counted, reused, unloadable.
    name = f"depth-estimator:{depth_folder}"
    loaded = {row["name"]: row for row in engine.manager.loaded()}
    assert loaded[name]["role"] == "estimator" and loaded[name]["weight_bytes"] > 0 and loaded[name]["in_use"] == 0
    assert engine.manager.load_count == 3
    engine.control_preview(request)
    assert engine.manager.load_count == 3  # reused, not read again
    assert engine.manager.unload(name) and name not in [row["name"] for row in engine.manager.loaded()]
    assert f"+{name}@" in engine.weights_identity(request)  # its weights make the control map: part of the key


def test_estimators_count_in_the_model_budget(make_config, depth_folder, shape_image):
    engine = Engine(make_config(depth_estimator=depth_folder, max_loaded_models=1))
    request = GenerationRequest(mode="controlnet", control_type="depth", control_image=shape_image)
    name = f"depth-estimator:{depth_folder}"
    names = lambda: [row["name"] for row in engine.manager.loaded()]
    with engine.manager.use_estimator("depth", depth_folder):
        assert engine.manager.loaded()[0]["in_use"] == 1  # held while a map is made
    engine.run(GenerationRequest(prompt="a red circle", steps=1, seed=1))
    assert names() == ["builtin:shapes"]  # the idle estimator made room for the base
    engine.control_preview(request)
    assert names() == [name]  # and the idle base for the estimator
