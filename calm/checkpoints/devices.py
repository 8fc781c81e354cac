"""Device names as users write them ('auto', 'cpu', 'cuda', 'cuda:1', 'mps'), checked against this
machine before anything is loaded. torch is imported only for an accelerator name."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from calm.errors import InputError

if TYPE_CHECKING:
    import torch

KINDS = ("cuda", "mps")
HELP = "auto (a GPU if there is one), cpu, cuda, cuda:N or mps"


def check_device(name: str) -> str:
    """The device name, normalised; an InputError if it is unknown or not on this machine."""
    name = str(name).strip().lower()
    if name in ("auto", "cpu"):
        return name
    kind, colon, index = name.partition(":")
    if kind not in KINDS or (colon and not index.isdigit()) or (kind == "mps" and colon):
        raise InputError(f"unknown device {name!r}; use {HELP}")
    import torch

    if kind == "mps" and not torch.backends.mps.is_available():
        raise InputError("device 'mps' is not available on this machine; use cpu or auto")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(
                f"device {name!r} is not available: torch finds no CUDA GPU on this machine "
                f"(torch {torch.__version__}); use cpu or auto"
            )
        if colon and int(index) >= count:
            raise InputError(
                f"device {name!r} does not exist: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}"
            )
    return name


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """The torch device to load on: 'auto' (or None) is the GPU if there is one, else None (torch's default)."""
    import torch

    if device is None or str(device) == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else None
    return torch.device(check_device(str(device)))


DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A dtype as users write it ('float32', 'bf16', ...) or as torch names it; None: torch's default."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join(names)}")
    return names[dtype]


HALF = ("bfloat16", "float16")
SLOW_HALF = (
    "{dtype} on the CPU: this CPU's half-precision kernels are slow (SmolLM2 prefill took 6-7x longer in bfloat16 "
    "than in float32 on the AMD EPYC of the reports); use float32 on a CPU"
)


def warn_slow_dtype(dtype: torch.dtype | None, device: torch.device | None) -> None:
    """A warning (logger 'calm', shown on stderr by the CLI) for half precision on the CPU."""
    name = str(dtype).removeprefix("torch.") if dtype is not None else None
    if name in HALF and (device is None or device.type == "cpu"):
        logging.getLogger("calm").warning(SLOW_HALF.format(dtype=name))


def set_threads(threads: int | None) -> None:
    """The CPU threads torch computes with (calm.set_threads(1)), for this process. None leaves torch's
    choice (one per core). On a CPU that other work shares, fewer threads can be much faster: see
    benchmarks/results/threads_cpu.md for the measurement behind the CLI's --threads."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InputError(f"threads must be an integer >= 1, got {threads!r}")
    import torch

    torch.set_num_threads(threads)
