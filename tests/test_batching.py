"""Cross-user batching: requests sharing one pipeline call get exactly the bits they would get alone."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from diffusion_studio.engine.runner import WorkItem
from diffusion_studio.requests import GenerationRequest, Mode, RequestError


def pixels(result) -> list[np.ndarray]:
    return [np.asarray(image) for image in result.images]


@pytest.mark.parametrize(("model", "mode", "guidance"), [
    ("builtin:shapes", Mode.txt2img, 7.0),
    ("builtin:shapes", Mode.txt2img, 1.0),  # no guidance: a lone image is a batch of one inside the UNet
    ("builtin:shapes-xl", Mode.txt2img, 5.0),  # an SDXL base: SDXL's pipeline
])
def test_batched_images_are_bit_identical_to_lone_runs(engine, model, mode, guidance):
    shared = {"model": model, "mode": mode, "steps": 3, "guidance": guidance}
    requests = [
        GenerationRequest(prompt="a red circle on a white background", seed=11, **shared),
        GenerationRequest(prompt="a blue star on a black background", seed=5, batch_size=2, **shared),
        GenerationRequest(prompt="a green square on a gray background", seed=11, **shared),
    ]
    batched = engine.run_batch([WorkItem(request) for request in requests])
    for request, together in zip(requests, batched):
        alone = engine.run(request)
        assert together.seeds == alone.seeds
        assert together.batched_with == 3
        assert [a.tobytes() for a in pixels(together)] == [a.tobytes() for a in pixels(alone)]
    # The prompts really differ per request (not one prompt copied to every row).
    assert not np.array_equal(pixels(batched[0])[0], pixels(batched[2])[0])


def test_each_request_gets_its_own_step_events_and_cancel(engine):
    shared = {"steps": 3, "seed": 1}
    requests = [GenerationRequest(prompt="a red circle on a white background", **shared),
                GenerationRequest(prompt="a blue star on a black background", **shared)]
    events = [[], []]
    cancels = [threading.Event(), threading.Event()]
    cancels[1].set()  # cancelled before it starts: the other request still runs to the end
    results = engine.run_batch([WorkItem(request, on_step.append, cancel)
                                for request, on_step, cancel in zip(requests, events, cancels)])
    assert [e.step for e in events[0]] == [1, 2, 3] == [e.step for e in events[1]]
    assert events[0][-1].preview is not None and events[0][-1].preview.size == events[1][-1].preview.size
    assert [r.cancelled for r in results] == [False, True]
    assert len(results[0].images) == 1


def test_incompatible_requests_are_refused_as_one_batch(engine):
    requests = [GenerationRequest(prompt="a", steps=2), GenerationRequest(prompt="b", steps=3)]
    with pytest.raises(RequestError, match="mode"):
        engine.run_batch([WorkItem(request) for request in requests])


def test_batch_key_ignores_only_per_request_fields():
    base = GenerationRequest(prompt="a", seed=1)
    assert base.batch_key() == GenerationRequest(prompt="b", seed=9, batch_size=2).batch_key()
    assert base.batch_key() != GenerationRequest(prompt="a", seed=1, steps=5).batch_key()
    assert base.batch_key() != GenerationRequest(prompt="a", negative_prompt="blurry").batch_key()
    assert GenerationRequest(mode="img2img", init_image=np.zeros((8, 8, 3), np.uint8)).batch_key() is None
