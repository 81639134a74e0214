"""The backend choice: fastbn.use_backend, FASTBN_BACKEND, and what "auto" resolves to."""

from __future__ import annotations

import pytest
import torch

import fastbn
from fastbn.backend import current_backend, resolve_backend


@pytest.fixture(autouse=True)
def no_environment_default(monkeypatch):
    """Each test starts from the built-in default, whatever the shell sets."""
    monkeypatch.delenv("FASTBN_BACKEND", raising=False)


def test_default_backend_is_auto():
    assert current_backend() == "auto"


def test_use_backend_sets_the_backend_inside_the_block():
    with fastbn.use_backend("torch"):
        assert current_backend() == "torch"


def test_use_backend_restores_the_previous_backend_on_exit():
    with fastbn.use_backend("torch"):
        pass
    assert current_backend() == "auto"


def test_use_backend_restores_the_previous_backend_after_an_exception():
    with pytest.raises(KeyError), fastbn.use_backend("torch"):
        raise KeyError("inside")
    assert current_backend() == "auto"


def test_nested_use_backend_restores_each_level():
    with fastbn.use_backend("torch"):
        with fastbn.use_backend("triton"):
            assert current_backend() == "triton"
        assert current_backend() == "torch"
    assert current_backend() == "auto"


def test_use_backend_rejects_an_unknown_name():
    with pytest.raises(ValueError, match="cuda"), fastbn.use_backend("cuda"):
        pass
    assert current_backend() == "auto"


def test_environment_variable_sets_the_default(monkeypatch):
    monkeypatch.setenv("FASTBN_BACKEND", "torch")
    assert current_backend() == "torch"


def test_use_backend_overrides_the_environment_variable(monkeypatch):
    monkeypatch.setenv("FASTBN_BACKEND", "torch")
    with fastbn.use_backend("auto"):
        assert current_backend() == "auto"


def test_invalid_environment_variable_raises_value_error_naming_it(monkeypatch):
    monkeypatch.setenv("FASTBN_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTBN_BACKEND"):
        fastbn.batch_norm(torch.randn(4, 3), None, None, training=True)


@pytest.mark.parametrize("name", ["auto", "torch"])
def test_cpu_tensors_resolve_to_torch(name):
    with fastbn.use_backend(name):
        assert resolve_backend(torch.randn(2, 3)) == "torch"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_resolves_cuda_tensors_to_triton():
    with fastbn.use_backend("auto"):
        assert resolve_backend(torch.randn(2, 3, device="cuda")) == "triton"
