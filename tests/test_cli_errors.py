"""Every option of every `calm` command, given bad values: one `Error:` line, a non-zero exit, no traceback,
and no model loaded. The cases come from the click command objects, so a new option is covered (or, for a
free-text option, the test asks for its bad values) without anyone remembering to add it here."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import click
import pytest

from calm.cli.main import LAZY_COMMANDS, cli
from calm.cli.options import Device
from helpers import DOCS, assert_clean_error, invoke, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


class Files:
    """Paths the cases point at: a tiny model, a JSONL file, a directory and a file that is not there."""

    def __init__(self, root: Path, model: str):
        self.model = model
        self.docs = str(write_jsonl(root / "docs.jsonl", DOCS))
        self.dir = str(root)
        self.missing = str(root / "missing" / "nothing.jsonl")
        self.out = str(root / "out")


# The valid arguments each command gets besides the bad one.
BASE: dict[str, Callable[[Files], list[str]]] = {
    "summarize": lambda f: ["--model", f.model, f.docs],
    "generate": lambda f: ["--model", f.model, "the cat"],
    "eval": lambda f: ["--model", f.model, "--data", f.docs, "--out", f.out],
    "calibrate": lambda f: ["--model", f.model, "--data", f.docs, "--out", f.out],
    "bench": lambda f: ["--model", f.model, "--data", f.docs, "--out", f.out],
    "train": lambda f: ["--model", f.model, "--data", f.docs, "--out", f.out],
    "info": lambda f: [],
    "serve": lambda f: ["--model", f.model],
}

# Bad values of free-text options, by parameter name (types and callbacks cover the rest).
TEXT: dict[str, Callable[[Files], list[str]]] = {
    "model_name": lambda f: [f.missing, f.docs, "", " "],
    "model": lambda f: [f.missing, f.docs, ""],
    "data": lambda f: [f.missing, f.dir],
    "field_document": lambda f: ["nope"],
    "field_summary": lambda f: ["nope"],
    "text": lambda f: ["", "   "],
    "file": lambda f: [f.missing, f.dir],
    "prompts": lambda f: ["", " \n "],
    "lora_layers": lambda f: ["x", "a-b", "-3", "5-2"],
    "host": lambda f: ["", "local host", "http://127.0.0.1"],
}

CALLBACKS: dict[str, list[str]] = {
    "float_list": ["x", "nan", "0.5,inf", "1.5", "-0.5", ","],
    "int_list": ["x", "0", "1,-8", ""],
    "optional_int_list": ["x", "0", "1,-8", ","],
    "policy_specs": ["bogus", "softmax:nan", "state:inf", "fixed:x", "classifier:2,x"],
    "output_file": ["<dir>", "<missing>"],
    "_template": ["Summarize:", "{document} {document}"],
}

# Options whose bad value only shows once their base input is read; each still fails before a model loads.
ARGUMENT_BASE = {
    ("summarize", "text"): lambda f: ["--model", f.model],
    ("summarize", "file"): lambda f: ["--model", f.model],
    ("generate", "prompts"): lambda f: ["--model", f.model],
}


def number_values(kind: click.ParamType) -> list[str]:
    """nan, inf, words, fractions for integers, and each side of the range."""
    is_float = isinstance(kind, click.types.FloatParamType)
    values = ["nan", "inf", "-inf", "abc", ""] if is_float else ["abc", "1.5", "", "nan"]
    low, high = getattr(kind, "min", None), getattr(kind, "max", None)
    step = 0 if is_float else 1
    if low is not None:
        values.append(str(low if getattr(kind, "min_open", False) else low - step - (1 if is_float else 0)))
    if high is not None:
        values.append(str(high if getattr(kind, "max_open", False) else high + step + (1 if is_float else 0)))
    return values


def device_values() -> list[str]:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["tpu", "cuda:x", "", "cuda" if count == 0 else f"cuda:{count}"]


def path_values(kind: click.Path, f: Files) -> list[str]:
    values = [f.missing] if kind.exists else []
    values += [f.docs] if not kind.file_okay else []
    values += [f.dir] if not kind.dir_okay else []
    return values


def bad_values(command: str, param: click.Parameter, f: Files) -> list[str]:
    kind = param.type
    if isinstance(param, click.Option) and param.is_flag:
        return []  # handled as --flag=value below
    if param.callback is not None and param.callback.__name__ in CALLBACKS:
        return [v.replace("<dir>", f.dir).replace("<missing>", f.missing) for v in CALLBACKS[param.callback.__name__]]
    if isinstance(kind, (click.types.FloatParamType, click.types.IntParamType)):
        return number_values(kind)
    if isinstance(kind, click.Choice):
        return ["bogus", ""]
    if isinstance(kind, Device):
        return device_values()
    if isinstance(kind, click.Path):
        return path_values(kind, f)
    if param.name in TEXT:
        return TEXT[param.name](f)
    raise AssertionError(
        f"calm {command} {param.opts[0] if param.opts else param.name}: no bad values known; add "
        "them to TEXT or CALLBACKS in tests/test_cli_errors.py"
    )


def cases(f: Files) -> list[tuple[str, list[str]]]:
    """(label, argv) for every bad value of every parameter of every command, and of the group itself."""
    ctx = click.Context(cli)
    out = [("calm --version=x", ["--version=x"])]
    for name in cli.list_commands(ctx):
        command = cli.get_command(ctx, name)
        assert name in BASE, f"calm {name} has no base arguments in tests/test_cli_errors.py"
        for param in command.params:
            if param.name == "help":
                continue
            base = ARGUMENT_BASE.get((name, param.name), BASE[name])(f)
            if isinstance(param, click.Option) and param.is_flag:
                out.append((f"calm {name} {param.opts[0]}=x", [name, *base, f"{param.opts[0]}=x"]))
                continue
            for value in bad_values(name, param, f):
                argv = (
                    [name, *base, value] if isinstance(param, click.Argument) else [name, *base, param.opts[0], value]
                )
                out.append((f"calm {name} {param.name}={value!r}", argv))
    return out


@pytest.fixture(scope="module")
def files(tiny_model, tmp_path_factory) -> Files:
    return Files(tmp_path_factory.mktemp("bad-values"), tiny_model)


def test_every_option_of_every_command_refuses_bad_values(files, monkeypatch):
    from calm import model
    from calm.checkpoints import loading

    loads: list[str] = []
    real_from_pretrained, real_load_backbone = model.CalmModel.from_pretrained.__func__, loading.load_backbone

    def from_pretrained(cls, name, *args, **kwargs):
        loads.append(str(name))
        return real_from_pretrained(cls, name, *args, **kwargs)

    def load_backbone(name, *args, **kwargs):
        loads.append(str(name))
        return real_load_backbone(name, *args, **kwargs)

    monkeypatch.setattr(model.CalmModel, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(loading, "load_backbone", load_backbone)
    all_cases = cases(files)
    assert len(all_cases) > 300
    failures = []
    for label, argv in all_cases:
        loads.clear()
        result = invoke(*argv)
        try:
            assert_clean_error(result)
            assert not loads or files.missing in loads or files.docs in loads, f"loaded {loads}"
        except AssertionError as exc:
            failures.append(f"{label}: {exc}\n{result.output[-600:]}")
    assert not failures, f"{len(failures)} of {len(all_cases)} cases:\n\n" + "\n\n".join(f[:400] for f in failures)


def test_the_cases_cover_every_parameter(files):
    labels = {label.split("=")[0] for label, _ in cases(files)}
    ctx = click.Context(cli)
    for name in cli.list_commands(ctx):
        for param in cli.get_command(ctx, name).params:
            if param.name != "help":
                key = (
                    f"calm {name} {param.opts[0]}"
                    if isinstance(param, click.Option) and param.is_flag
                    else f"calm {name} {param.name}"
                )
                assert key in labels, key


def test_number_values_cover_the_range():
    assert number_values(click.FloatRange(0.0, 1.0)) == ["nan", "inf", "-inf", "abc", "", "-1.0", "2.0"]
    assert number_values(click.FloatRange(0.0, 1.0, min_open=True, max_open=True))[-2:] == ["0.0", "1.0"]
    assert number_values(click.IntRange(min=1)) == ["abc", "1.5", "", "nan", "0"]
    assert all(not math.isfinite(float(v)) for v in ("nan", "inf", "-inf"))


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_threshold_nan_and_inf_are_refused_at_parse_time(value):
    result = invoke("summarize", "--text", "the cat", "--threshold", value)
    assert_clean_error(result, "--threshold", "not a finite number")


def test_devices_are_checked_before_loading():
    assert_clean_error(invoke("summarize", "--text", "the cat", "--device", "tpu"), "--device", "unknown device 'tpu'")
    import torch

    if not torch.cuda.is_available():
        assert_clean_error(invoke("summarize", "--text", "the cat", "--device", "cuda"), "--device", "no CUDA GPU")


def test_a_directory_given_as_file_is_called_a_directory(tmp_path):
    # issue 29, item 6: it said "file not found: DIR", though the directory exists
    for name in ("plain", "docs.jsonl"):
        (tmp_path / name).mkdir()
        result = invoke("summarize", str(tmp_path / name))
        assert_clean_error(result, "is a directory")
        assert "not found" not in result.output


@pytest.mark.parametrize("command", [["summarize", "--text", "the cat"], ["generate", "the cat"], ["info"]])
def test_an_empty_model_name_is_refused_as_such(command, tmp_path, monkeypatch):
    # issue 29, item 6: --model "" tried the current directory (". is a directory but holds no config.json")
    monkeypatch.chdir(tmp_path)
    args = [*command, ""] if command == ["info"] else [*command, "--model", ""]
    result = invoke(*args)
    assert_clean_error(result, "empty model name")
    assert "config.json" not in result.output


def test_the_library_refuses_an_empty_model_name(tmp_path, monkeypatch):
    from calm import CalmModel
    from calm.errors import ModelNotFoundError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="empty model name"):
        CalmModel.from_pretrained("")


def test_lazy_commands_have_their_own_short_help():
    ctx = click.Context(cli)
    for name, (_, _, short_help) in LAZY_COMMANDS.items():
        command = cli.get_command(ctx, name)
        assert command.get_short_help_str(limit=200) == short_help


def test_help_and_version_import_neither_torch_nor_transformers():
    import subprocess
    import sys

    code = (
        "import sys\nfrom calm.cli.main import cli\n"
        "for args in (['--help'], ['--version'], ['summarize', '--help'], ['generate', '--help']):\n"
        "    try:\n        cli.main(args, prog_name='calm')\n    except SystemExit:\n        pass\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.splitlines()[-1] == "[]"


def test_train_help_has_an_example_and_help_for_every_option():
    result = invoke("train", "--help")
    assert result.exit_code == 0 and "Examples:" in result.output and "calm train --data" in result.output
    ctx = click.Context(cli)
    for param in cli.get_command(ctx, "train").params:
        assert isinstance(param, click.Option) and param.help, f"calm train {param.opts[0]} has no help"


# ---- truncated or corrupt weights (issue 20, item 7) ----------------------------------------------------


def _cut(file: Path, how: str) -> None:
    data = file.read_bytes()
    cuts = {"half": data[: len(data) // 2], "header": data[:4], "empty": b"", "garbage": b"\x7f" * 64}
    file.write_bytes(cuts[how])


@pytest.fixture(scope="module")
def damaged(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """A plain transformers folder, a self-contained checkpoint, a checkpoint's exit heads and a GGUF file,
    each whole (cut per test from a fresh copy)."""
    import shutil

    from calm.checkpoints.checkpoint import CheckpointConfig, save_checkpoint
    from calm.exits.heads import ExitHeads, HeadsConfig
    from calm.model import CalmModel

    root = tmp_path_factory.mktemp("damaged")
    plain = Path(shutil.copytree(tiny_model, root / "plain"))
    CalmModel.from_pretrained(tiny_model).save_pretrained(root / "whole", include_backbone=True)
    heads = HeadsConfig(num_layers=4, hidden_size=64, rank=4)
    save_checkpoint(root / "heads", CheckpointConfig(backbone=tiny_model, heads=heads), heads=ExitHeads(heads))
    (root / "model.gguf").write_bytes(b"GGUF" + bytes(60))
    return {"plain": plain, "whole": root / "whole", "heads": root / "heads", "gguf": root / "model.gguf"}


@pytest.mark.parametrize("how", ["half", "header", "empty", "garbage"])
@pytest.mark.parametrize(
    "target,file",
    [("plain", "model.safetensors"), ("whole", "backbone/model.safetensors"), ("heads", "exit_heads.safetensors")],
)
@pytest.mark.parametrize("command", ["summarize", "generate", "info"])
def test_truncated_weights_are_one_error_line(damaged, tmp_path, target, file, how, command):
    import shutil

    from calm.errors import CheckpointError
    from calm.model import CalmModel

    model = Path(shutil.copytree(damaged[target], tmp_path / target))
    _cut(model / file, how)
    args = {"summarize": ["--text", "the cat sat"], "generate": ["the cat"], "info": []}[command]
    model_args = [str(model)] if command == "info" else ["--model", str(model)]
    assert_clean_error(invoke(command, *model_args, *args), "corrupt")
    with pytest.raises(CheckpointError, match="corrupt"):
        CalmModel.from_pretrained(str(model))


def test_a_corrupt_gguf_file_is_one_error_line(damaged, tmp_path, monkeypatch):
    monkeypatch.setenv("CALM_CACHE_DIR", str(tmp_path / "cache"))
    for command in (["info", str(damaged["gguf"])], ["generate", "--model", str(damaged["gguf"]), "the cat"]):
        assert_clean_error(invoke(*command), "not a readable GGUF file")
