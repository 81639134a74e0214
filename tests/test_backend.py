"""The backend choice: fastbn.use_backend, FASTBN_BACKEND, and what "auto" resolves to."""

from __future__ import annotations

import os
import threading

import pytest
import torch

import fastbn
import fastbn.functional
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


def test_each_call_sees_the_environment_variable_as_it_is_then(monkeypatch):
    """The value is cached between calls (read cheaply, re-parsed on a change): a change
    between two calls, through monkeypatch or os.environ itself, shows in the next one."""
    monkeypatch.setenv("FASTBN_BACKEND", "torch")
    assert current_backend() == "torch"
    monkeypatch.setenv("FASTBN_BACKEND", "triton")
    assert current_backend() == "triton"
    os.environ["FASTBN_BACKEND"] = "auto"
    assert current_backend() == "auto"
    os.environ["FASTBN_BACKEND"] = "torch"
    assert current_backend() == "torch"
    del os.environ["FASTBN_BACKEND"]
    assert current_backend() == "auto"


def test_environment_variable_is_read_from_a_replaced_os_environ(monkeypatch):
    """os.environ replaced by another mapping (the fast read looks at the one found at
    import): the variable is read from the new one, and again from the old one after."""
    monkeypatch.setattr(os, "environ", {"FASTBN_BACKEND": "torch"})
    assert current_backend() == "torch"
    os.environ["FASTBN_BACKEND"] = "triton"
    assert current_backend() == "triton"
    monkeypatch.undo()
    assert current_backend() == "auto"


def test_a_backend_block_in_another_thread_leaves_this_threads_default(monkeypatch):
    """While another thread's use_backend block is open (so the thread-local choice is
    read), this thread still sees the environment's default, and follows its changes."""
    entered, leave = threading.Event(), threading.Event()

    def hold_a_block():
        with fastbn.use_backend("triton"):
            entered.set()
            leave.wait()

    thread = threading.Thread(target=hold_a_block)
    thread.start()
    entered.wait()
    try:
        assert current_backend() == "auto"
        monkeypatch.setenv("FASTBN_BACKEND", "torch")
        assert current_backend() == "torch"
    finally:
        leave.set()
        thread.join()
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


def test_empty_environment_variable_means_unset(monkeypatch):
    monkeypatch.setenv("FASTBN_BACKEND", "")
    assert current_backend() == "auto"


def in_thread(function):
    """function() run in a new thread: its result, or the exception it raised, re-raised."""
    outcome = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as error:  # noqa: BLE001 (handed back to the caller)
            outcome["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def test_use_backend_does_not_reach_another_thread():
    with fastbn.use_backend("triton"):
        assert in_thread(current_backend) == "auto"
        assert current_backend() == "triton"


def test_use_backend_in_another_thread_does_not_reach_this_one():
    def choose_and_report():
        with fastbn.use_backend("torch"):
            return current_backend()

    with fastbn.use_backend("triton"):
        assert in_thread(choose_and_report) == "torch"
        assert current_backend() == "triton"


def test_interleaved_use_backend_in_two_threads_restores_each():
    """Thread A enters "triton", B enters "torch", A exits, then B exits: each thread sees
    its own choice throughout, and both end on the default."""
    steps = [threading.Event() for _ in range(4)]
    seen = {}

    def thread_a():
        with fastbn.use_backend("triton"):
            steps[0].set()
            steps[1].wait()
            seen["a inside"] = current_backend()
        steps[2].set()
        steps[3].wait()
        seen["a after"] = current_backend()

    def thread_b():
        steps[0].wait()
        with fastbn.use_backend("torch"):
            steps[1].set()
            steps[2].wait()
            seen["b inside"] = current_backend()
        steps[3].set()
        seen["b after"] = current_backend()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == {"a inside": "triton", "b inside": "torch", "a after": "auto",
                    "b after": "auto"}
    assert current_backend() == "auto"


def test_calls_in_a_thread_run_on_that_threads_backend(monkeypatch):
    """The backend a call resolves to follows its own thread's use_backend."""
    resolved = []
    monkeypatch.setattr(
        fastbn.functional, "resolve_backend",
        lambda x, *args: resolved.append(current_backend()) or resolve_backend(x, *args),
    )

    def call():
        with fastbn.use_backend("torch"):
            fastbn.batch_norm(torch.randn(4, 3), None, None, training=True)

    with fastbn.use_backend("auto"):
        in_thread(call)
        fastbn.batch_norm(torch.randn(4, 3), None, None, training=True)
    assert resolved == ["torch", "auto"]


def test_backend_choice_compiles_without_graph_breaks_and_guards_on_it():
    """torch.compile(fullgraph=True) traces the thread's choice (no graph break) and
    recompiles when it changes, instead of baking in the first one."""
    seen = []

    def spy(x):
        seen.append(current_backend())
        return x

    def function(x):
        return fastbn.batch_norm(spy(x), None, None, training=True)

    compiled = torch.compile(function, fullgraph=True, backend="eager")
    x = torch.randn(4, 3)
    with fastbn.use_backend("torch"):
        expected = fastbn.batch_norm(x, None, None, training=True)
        torch.testing.assert_close(compiled(x), expected)
    with fastbn.use_backend("auto"):
        torch.testing.assert_close(compiled(x), expected)
    assert seen == ["torch", "auto"]
