import pytest
import torch

from helpers import build_tiny_model, tiny_llama


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: more torch threads only add contention (tenfold slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def training_setup(tmp_path_factory) -> dict[str, str]:
    """The calm.training tests' tiny BPE backbone and data files (training_helpers.build_training_setup)."""
    from training_helpers import build_training_setup

    return build_training_setup(tmp_path_factory.mktemp("training"))
