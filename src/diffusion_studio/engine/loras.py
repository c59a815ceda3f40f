"""What a LoRA file holds, read from its safetensors header before diffusers is asked to load it.

diffusers 0.42 converts kohya/A1111 LoRA files (`lora_unet_...`, `lora_te_...`, SDXL `lora_te1_`/`lora_te2_`, LoCon
convolutions included) for SD and SDXL on `load_lora_weights`. It loads LyCORIS LoKr only for Z-Image and Flux2
pipelines and LoHa for none, so such files are refused here by name instead of failing deep in peft.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..requests import RequestError

# LyCORIS algorithms by a key suffix only they use.
LYCORIS_KINDS = {".hada_w1_a": "LoHa", ".lokr_w1": "LoKr", ".oft_blocks": "OFT", ".oft_diag": "OFT",
                 ".diff": "full-difference (LyCORIS 'full')", ".b_norm": "LyCORIS norm"}


def lora_keys(path: Path) -> list[str]:
    """The tensor names of a LoRA file, or of the first .safetensors file in a LoRA folder."""
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            return []
        path = files[0]
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as exc:
        raise RequestError("loras", f"LoRA '{path.name}' is not a readable .safetensors file ({exc})") from None


def check_lora_file(name: str, path: Path) -> None:
    """Refuse what diffusers can't load for SD/SDXL, naming what the file is."""
    keys = lora_keys(path)
    for suffix, kind in LYCORIS_KINDS.items():
        if any(suffix in key for key in keys):
            raise RequestError("loras", f"'{name}' is a LyCORIS {kind} file; this studio loads LoRA files (kohya/"
                                        "A1111, LyCORIS LoCon, diffusers/peft) for SD and SDXL, not LoHa, LoKr or "
                                        "OFT")
