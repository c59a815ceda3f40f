"""Quality of the built-in models, measured by the shapes-world checker (no learned judge).

    python bench/quality.py [--prompts 200] [--only position_words,txt2img,img2img,inpaint,controlnet,xl]

Prints one line per figure (the measurements live in `diffusion_studio.workshop.quality`, shared with the tests):
- txt2img on builtin:shapes at default settings: colour+shape+background all right; position right where named.
- img2img at strength 0.5: the prompt's colour, with the source's shape and position kept.
- inpainting (through builtin:shapes-inpaint when trained): pixels outside the mask unchanged (max abs difference),
  the masked region matching the prompt; and the same without the inpainting ControlNet's effect.
- ControlNet (builtin:shapes-canny, builtin:shapes-xl-canny): IoU of dilated canny edges of control vs result, and the prompt's colour.
- builtin:shapes-xl: colour, shape and background all right.
- hires fix (64 -> 128 px, Latent and Lanczos, strength 0.3 and 0.5): the result checked at 64 px, and the blob IoU
  of the plain and the hires image (composition kept).
- outpainting (a 32 px shape, 16 px added on every side) and only-masked inpainting (a 24 px hole in a 128 px
  picture): untouched pixels (max abs difference), the new border's colour, the repainted region's colour.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusion_studio.workshop import quality  # noqa: E402
from diffusion_studio.cli import _quiet_libraries  # noqa: E402
from diffusion_studio.config import StudioConfig  # noqa: E402
from diffusion_studio.engine.runner import Engine  # noqa: E402


def report(label: str, figures: dict[str, float], note: str) -> None:
    for name, value in figures.items():
        print(f"{label}_{name} {value:.3f}" if isinstance(value, float) else f"{label}_{name} {value}")
    print(f"  ({note})", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--only", default="position_words,txt2img,img2img,inpaint,controlnet,xl,xl_controlnet,"
                                          "hires,outpaint,inpaint_only_masked")
    args = parser.parse_args()
    _quiet_libraries()
    parts, count, quarter = set(args.only.split(",")), args.prompts, max(20, args.prompts // 4)
    with tempfile.TemporaryDirectory() as scratch:
        engine = Engine(StudioConfig(data_dir=os.environ.get("DS_DATA_DIR", scratch), models_dir=scratch,
                                     preview_interval=0))
        measures = {
            "position_words": lambda: ({"similarity": quality.position_similarity(engine)},
                                       "text encoder: mean cosine of captions differing only in position; "
                                       "near 1.0 = collapsed"),
            "txt2img": lambda: (quality.txt2img(engine, count), f"builtin:shapes, {count} prompts, defaults"),
            "img2img": lambda: (quality.img2img(engine, quarter), f"strength 0.5, {quarter} images"),
            "inpaint": lambda: ({**quality.inpaint(engine, quarter), "region_matches_prompt_without_controlnet":
                                 quality.inpaint(engine, quarter, control_scale=0.0)["region_matches_prompt"]},
                                f"{quarter} images, 32 px hole; control_scale 0: latent blending alone"),
            "controlnet": lambda: ({**quality.controlnet(engine, quarter), "edge_iou_without_control":
                                    quality.controlnet(engine, quarter, control_scale=0.0)["edge_iou"]},
                                   f"builtin:shapes-canny, {quarter} images; control_scale 0 for the baseline"),
            "xl_controlnet": lambda: ({**quality.controlnet(engine, quarter, "builtin:shapes-xl"),
                                       "edge_iou_without_control": quality.controlnet(
                                           engine, quarter, "builtin:shapes-xl", control_scale=0.0)["edge_iou"]},
                                      f"builtin:shapes-xl-canny, {quarter} images; control_scale 0 for the baseline"),
            "hires": lambda: ({f"{upscaler.split()[0].lower()}_{strength:g}_{name}": value
                               for upscaler in ("Latent", "Lanczos") for strength in (0.3, 0.5)
                               for name, value in quality.hires(engine, quarter, upscaler=upscaler,
                                                                strength=strength).items()},
                              f"builtin:shapes 64 -> 128 px, {quarter} prompts per setting"),
            "outpaint": lambda: (quality.outpaint(engine, quarter), f"{quarter} images, 16 px on every side"),
            "inpaint_only_masked": lambda: (quality.inpaint_only_masked(engine, quarter),
                                            f"{quarter} images, a 24 px hole in 128 px, padding 4"),
            "xl": lambda: (quality.txt2img(engine, count // 2, "builtin:shapes-xl"),
                           f"builtin:shapes-xl, {count // 2} prompts, defaults"),
        }
        for name, measure in measures.items():
            if name in parts:
                started = time.perf_counter()
                figures, note = measure()
                report(name, figures, f"{note}; {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
