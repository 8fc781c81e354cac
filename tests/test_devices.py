"""calm.devices: device and dtype names as users write them, checked before anything is loaded."""

import pytest
import torch

from calm.devices import check_device, parse_dtype, resolve_device
from calm.errors import InputError


@pytest.mark.parametrize(
    "name, dtype",
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        (torch.float16, torch.float16),
        (None, None),
    ],
)
def test_dtype_names(name, dtype):
    assert parse_dtype(name) == dtype


def test_an_unknown_dtype_is_named_with_the_choices():
    with pytest.raises(InputError, match="unknown dtype 'int8'; choose one of float32, fp32"):
        parse_dtype("int8")


def test_device_names_are_checked_against_this_machine():
    assert check_device(" CPU ") == "cpu" and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="unknown device 'tpu'"):
        check_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            check_device("cuda:0")
        assert resolve_device("auto") is None
