"""create_training_visualization: the seed's 2x2 figure from either shape of stats, drawn on matplotlib's Agg canvas."""

import json
import math

import numpy as np
import pytest

from diffusion_studio.demo import DemoConfig, DiffusionDemo
from diffusion_studio.demo.figures import training_series
from diffusion_studio.training.events import TrainingEvent

pytestmark = pytest.mark.filterwarnings("ignore:use_half_precision:diffusion_studio.demo.NoEffectWarning")

STEPS = list(range(1, 41))
SEED_STATS = {  # the seed's shape: a dict of lists
    "steps": STEPS,
    "losses": [0.9 * math.exp(-step / 15) + 0.05 for step in STEPS],
    "grad_norms": [1.0 + 0.3 * math.sin(step) for step in STEPS],
    "learning_rates": [1e-4 * min(1.0, step / 10) for step in STEPS],
    "stability_scores": [min(100.0, 40 + 1.5 * step) for step in STEPS],
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return DiffusionDemo(DemoConfig(data_dir=tmp_path_factory.mktemp("figures")))


def panels(image):
    """The four panels' pixels (top-left, top-right, bottom-left, bottom-right)."""
    pixels = np.asarray(image).astype(int)
    h, w = pixels.shape[0] // 2, pixels.shape[1] // 2
    return [pixels[:h, :w], pixels[:h, w:], pixels[h:, :w], pixels[h:, w:]]


def line_pixels(panel) -> int:
    """Pixels in the plotted line's colour (matplotlib's C0, #1f77b4)."""
    return int((np.abs(panel - np.array([31, 119, 180])).sum(axis=2) < 40).sum())


def test_the_seeds_dict_of_lists_draws_four_panels(demo):
    image = demo.create_training_visualization(SEED_STATS)
    assert image.mode == "RGB" and image.size == (1200, 800)  # figsize (12, 8) at 100 dpi
    counts = [line_pixels(panel) for panel in panels(image)]
    assert all(count > 200 for count in counts), counts


def test_training_events_draw_the_same_figure(demo, tmp_path):
    """The studio's own training records (TrainingRun.events, a run's log.jsonl) give the seed's figure."""
    events = [TrainingEvent("step", step, 40, loss=loss, grad_norm=norm, lr=lr, stability=score)
              for step, loss, norm, lr, score in zip(STEPS, SEED_STATS["losses"], SEED_STATS["grad_norms"],
                                                     SEED_STATS["learning_rates"], SEED_STATS["stability_scores"])]
    with_others = [TrainingEvent("state", 0, 40, message="running"), *events,
                   TrainingEvent("checkpoint", 40, 40, data={"path": "x"})]
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(event.as_json()) + "\n" for event in with_others))
    from_log = [json.loads(line) for line in log.read_text().splitlines()]
    expected = np.asarray(demo.create_training_visualization(SEED_STATS))
    for stats in (from_log, with_others, [event.as_json() for event in events]):
        assert np.array_equal(np.asarray(demo.create_training_visualization(stats)), expected)


def test_a_missing_series_says_so_and_the_rest_still_draw(demo):
    image = demo.create_training_visualization({"losses": [1.0, 0.7, 0.5, 0.4], "grad_norms": [2.0, 1.5, 1.2, 1.1]})
    loss, norm, lr, stability = (line_pixels(panel) for panel in panels(image))
    assert loss > 50 and norm > 50 and lr == 0 and stability == 0
    gray_text = [int((np.abs(panel - 128).sum(axis=2) < 30).sum()) for panel in panels(image)]
    assert gray_text[2] > 50 and gray_text[3] > 50  # "no learning rate recorded", not a blank panel


def test_stats_it_cannot_read_are_refused_naming_the_keys(demo):
    with pytest.raises(ValueError, match="losses / loss, grad_norms / grad_norm, learning_rates / lr"):
        demo.create_training_visualization({"loss_values": [1, 2]})
    with pytest.raises(ValueError, match="losses values must be numbers"):
        demo.create_training_visualization({"losses": [1.0, "high"]})
    with pytest.raises(TypeError, match="stats: give a dict of lists or a list of per-step dicts"):
        demo.create_training_visualization("losses")


def test_series_skip_missing_values_and_keep_their_steps():
    series = training_series([{"step": 1, "loss": 0.5}, {"step": 2, "loss": None, "lr": 1e-4},
                              {"step": 3, "loss": float("nan")}, {"step": 4, "loss": 0.25}])
    assert series["losses"] == ([1.0, 4.0], [0.5, 0.25]) and series["learning_rates"] == ([2.0], [1e-4])
    assert training_series({"losses": np.array([3.0, 2.0])})["losses"] == ([0, 1], [3.0, 2.0])  # arrays too


def test_the_current_training_run_is_drawn(tmp_path):
    """enable_training_demo: demo.training runs the studio's LoRA trainer; training_stats and the figure read it."""
    import time

    from diffusion_studio.training.config import TrainConfig

    demo = DiffusionDemo(DemoConfig(data_dir=tmp_path / "data", models_dir=tmp_path / "models"))  # its own loras
    run = demo.training.start("demo-run", TrainConfig(
        dataset="shapes", resolution=32, steps=6, batch_size=4, pool_size=16, checkpoint_every=6,
        learning_rate=1e-3, output_dir=tmp_path / "run", lora_rank=4))
    deadline = time.monotonic() + 240
    while not run.finished and time.monotonic() < deadline:
        time.sleep(0.2)
    assert run.state == "done", run.messages
    stats = demo.training_stats
    assert stats["steps"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0] and len(stats["losses"]) == 6
    assert set(stats) == {"steps", "losses", "grad_norms", "learning_rates", "stability_scores"}
    image = demo.create_training_visualization()
    assert np.array_equal(np.asarray(image), np.asarray(demo.create_training_visualization(run.events)))
    assert all(line_pixels(panel) > 20 for panel in panels(image))
