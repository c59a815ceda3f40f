#!/usr/bin/env bash
# Which torch ./studio installs, and from where: on Linux without an NVIDIA GPU the CPU build (torch 2.13.0+cpu:
# a wheel pip already knows of, else PyTorch's CPU index); on Linux with one, PyPI's CUDA build; elsewhere (macOS)
# PyPI's build, which is CPU-only there (MPS on Apple silicon). ./studio sources this file; run on its own
# (bash tools/torch_plan.sh) it prints the pip arguments it chose, one a line, and why on stderr.
#   STUDIO_TORCH=auto|cpu|cuda    auto (the default) looks for an NVIDIA GPU; cpu or cuda decides without looking
#   STUDIO_TORCH_CPU_INDEX=URL    PyTorch's CPU wheel index, or a mirror of it (https://download.pytorch.org/whl/cpu)
#   STUDIO_TORCH_PROBE_TIMEOUT=S  how long that index gets to answer before it counts as unreachable (5 seconds)
#   STUDIO_NVIDIA_GPUS_DIR=DIR    where the NVIDIA driver lists its GPUs (/proc/driver/nvidia/gpus)

TORCH_VERSION=2.13.0
TORCH_CPU_INDEX="${STUDIO_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"

# Prints how an NVIDIA GPU was found; fails when there is none. Either sign will do: a container may get the driver's
# /proc entries without the nvidia-smi tool, and nvidia-smi lists nothing when the driver has no GPU.
torch_gpu_found() {
    local gpus_dir="${STUDIO_NVIDIA_GPUS_DIR:-/proc/driver/nvidia/gpus}" listed driver_gpus
    listed=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU ") || true
    if [ "${listed:-0}" -gt 0 ]; then echo "nvidia-smi lists $listed NVIDIA GPU(s)"; return 0; fi
    driver_gpus=("$gpus_dir"/*)
    if [ -e "${driver_gpus[0]}" ]; then echo "$gpus_dir lists ${#driver_gpus[@]} NVIDIA GPU(s)"; return 0; fi
    return 1
}

# Whether URL answers within STUDIO_TORCH_PROBE_TIMEOUT seconds: pip itself would retry an unreachable index for
# minutes (its timeout, 15 s unless PIP_DEFAULT_TIMEOUT says more, times 5 retries) before giving up on it.
torch_index_reachable() {
    python3 - "$1" "${STUDIO_TORCH_PROBE_TIMEOUT:-5}" <<'PY'
import os, ssl, sys, threading, urllib.error, urllib.request
url, limit = sys.argv[1], float(sys.argv[2])
def probe():
    try:
        urllib.request.urlopen(url, timeout=limit).close()
        os._exit(0)
    except urllib.error.URLError as e:
        # A certificate this Python can't verify still means the host answered (pip checks it with its own CAs).
        os._exit(0 if isinstance(e.reason, ssl.SSLCertVerificationError) else 1)
    except Exception:
        os._exit(1)
threading.Thread(target=probe, daemon=True).start()
threading.Event().wait(limit)  # urlopen's timeout leaves out the name look-up; this limit covers everything
os._exit(1)
PY
}

# Sets TORCH_BUILD (cpu, cuda, or pypi: PyPI's own choice), TORCH_PIP_ARGS (pip install's arguments) and
# TORCH_CHOICE (what and why, for the install's step line).
torch_plan() {
    local want="${STUDIO_TORCH:-auto}" os why
    os=$(uname -s)
    case "$want" in
        auto | cpu | cuda) ;;
        *) echo "STUDIO_TORCH=$want: use auto, cpu or cuda" >&2; return 1 ;;
    esac
    if [ "$os" != Linux ]; then
        if [ "$want" = cuda ]; then echo "STUDIO_TORCH=cuda: ./studio installs CUDA builds of torch on Linux only" >&2; return 1; fi
        TORCH_BUILD=pypi TORCH_PIP_ARGS=("torch==$TORCH_VERSION")
        TORCH_CHOICE="PyPI's build for $os (CPU; MPS on Apple silicon)"
        return 0
    fi
    if [ "$want" = auto ]; then
        if why=$(torch_gpu_found); then want=cuda; else want=cpu why="no NVIDIA GPU found"; fi
    else
        why="STUDIO_TORCH=$want"
    fi
    if [ "$want" = cuda ]; then
        # ===, not ==: "==2.13.0" also matches 2.13.0+cpu, which sorts above 2.13.0, so a CPU wheel on disk or in a
        # configured index would win; "===2.13.0" matches only that exact version, PyPI's (the CUDA build on Linux).
        TORCH_BUILD=cuda TORCH_PIP_ARGS=("torch===$TORCH_VERSION")
        TORCH_CHOICE="the CUDA build from PyPI ($why)"
        return 0
    fi
    # +cpu: only a CPU build matches, never PyPI's CUDA one. It comes from wherever pip already looks (a local wheel
    # in find-links, a configured index) or from PyTorch's CPU index, asked only when it answers.
    TORCH_BUILD=cpu TORCH_PIP_ARGS=("torch==$TORCH_VERSION+cpu")
    TORCH_CPU_INDEX_ANSWERS=""
    if torch_index_reachable "$TORCH_CPU_INDEX/torch/"; then
        TORCH_CPU_INDEX_ANSWERS=1
        TORCH_PIP_ARGS=(--extra-index-url "$TORCH_CPU_INDEX" "${TORCH_PIP_ARGS[@]}")
        TORCH_CHOICE="the CPU build ($why; from pip's own sources or $TORCH_CPU_INDEX)"
    else
        TORCH_CHOICE="the CPU build ($why; $TORCH_CPU_INDEX does not answer, so from pip's own sources)"
    fi
}

# The one line for when pip could not install the CPU build (after torch_plan chose it).
torch_cpu_missing_hint() {
    local where="is in none of pip's sources and $TORCH_CPU_INDEX does not answer"
    [ -n "${TORCH_CPU_INDEX_ANSWERS:-}" ] && where="could not come from pip's sources or $TORCH_CPU_INDEX (pip's error above)"
    echo "torch $TORCH_VERSION+cpu (the CPU build) $where:" \
        "put torch-$TORCH_VERSION+cpu-*.whl in a folder and rerun with PIP_FIND_LINKS=<that folder>," \
        "or STUDIO_TORCH_CPU_INDEX=<a mirror of that index>, or STUDIO_TORCH=cuda for PyPI's CUDA build (several GB)" >&2
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    torch_plan
    echo "torch: $TORCH_BUILD: $TORCH_CHOICE" >&2
    printf '%s\n' "${TORCH_PIP_ARGS[@]}"
fi
