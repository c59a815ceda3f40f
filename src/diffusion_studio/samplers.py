"""Sampler names people know (A1111's) mapped to diffusers scheduler classes and options.

Plain data, no diffusers import: requests validate names against it, the engine builds schedulers from it.
"""

SAMPLERS: dict[str, tuple[str, dict]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True,
                                                            "algorithm_type": "sde-dpmsolver++"}),
    "DPM++ SDE": ("DPMSolverSinglestepScheduler", {}),
    # DDIM clips its x0 estimate to [-1, 1] unless told not to: right for pixels, wrong for latents (SD ships
    # clip_sample=False; a config from another scheduler lacks the key, so the switch must say it).
    "DDIM": ("DDIMScheduler", {"clip_sample": False}),
    "PNDM": ("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {}),
}

# A1111 writes "Sampler: DPM++ 2M, Schedule type: Karras"; both spellings parse to one name here.
KARRAS_SUFFIX = " Karras"
