"""calm.checkpoints.devices: device and dtype names as users write them, checked before anything is loaded."""

import pytest
import torch

from calm.checkpoints.devices import check_device, parse_dtype, resolve_device
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


# ---- issue 20: --threads everywhere (item 9), half precision on the CPU (item 10) -----------------------


def test_every_command_takes_threads_and_applies_it(tiny_model):
    import click
    import torch

    import calm
    from calm.cli.main import cli
    from helpers import invoke

    ctx = click.Context(cli)
    for name in cli.list_commands(ctx):
        assert any(p.name == "threads" for p in cli.get_command(ctx, name).params), f"calm {name} has no --threads"
    before = torch.get_num_threads()
    try:
        assert invoke("info", tiny_model, "--threads", "1").exit_code == 0
        assert torch.get_num_threads() == 1
        calm.set_threads(2)
        assert torch.get_num_threads() == 2
        with pytest.raises(InputError, match="threads"):
            calm.set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_half_precision_on_the_cpu_warns(tiny_model, caplog):
    from calm.model import CalmModel
    from helpers import invoke

    with caplog.at_level("WARNING", logger="calm"):
        CalmModel.from_pretrained(tiny_model, device="cpu", dtype="bfloat16")
    assert "bfloat16 on the CPU" in caplog.text
    result = invoke("generate", "--model", tiny_model, "the cat", "--max-new-tokens", 1, "--dtype", "float16")
    assert result.exit_code == 0 and "warning: float16 on the CPU" in result.stderr
    caplog.clear()
    with caplog.at_level("WARNING", logger="calm"):
        CalmModel.from_pretrained(tiny_model, device="cpu")
    assert "on the CPU" not in caplog.text


def test_the_cli_default_is_one_thread(tiny_model):
    import torch

    from helpers import invoke

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert invoke("info", tiny_model).exit_code == 0
        assert torch.get_num_threads() == 1  # the measured default (benchmarks/results/threads_cpu.md)
    finally:
        torch.set_num_threads(before)
