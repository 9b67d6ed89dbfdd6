import os

import pytest

# Triton kernels run on CPU tensors through the interpreter; it must be chosen before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def native_or_skip(request):
    """A test parametrized over backends skips "cpp" where the native extension cannot be built
    (the library then warns once and runs the PyTorch path: test_cpp_backend.py)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and "cpp" in callspec.params.values():
        from opd_kernels.backends import native

        if not native.available():
            pytest.skip("the native CPU extension could not be built here")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from more threads, and on a busy machine they lose much."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny student and teacher (random weights) and prompt/eval files of task problems."""
    import json

    import torch

    from opd_train import task
    from opd_train.checkpoint import save_model_dir
    from opd_train.models import tiny_llama
    from opd_train.tokenizer import build_char_tokenizer

    root = tmp_path_factory.mktemp("models")
    tok = build_char_tokenizer(task.ALPHABET)
    torch.manual_seed(0)
    for name, hidden in (("student", 16), ("teacher", 24)):
        save_model_dir(str(root / name), tiny_llama(tok, hidden, 1, 2, 64), tok)
    for name, seed in (("prompts.jsonl", 1), ("eval.jsonl", 2)):
        with open(root / name, "w") as f:
            for p in task.problems(8, 2, seed):
                f.write(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n")
    return root


@pytest.fixture
def interrupt_at_generation(monkeypatch):
    """interrupt_at_generation(n): the n-th rollout generation of a run sends the process a
    SIGINT (a user's Ctrl-C) before it generates; returns the function that disarms it."""
    import os
    import signal

    from opd_train import train

    def arm(n: int):
        calls = []
        real_generate = train.generate

        def interrupting_generate(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                os.kill(os.getpid(), signal.SIGINT)
            return real_generate(*args, **kwargs)

        monkeypatch.setattr(train, "generate", interrupting_generate)
        return lambda: monkeypatch.setattr(train, "generate", real_generate)

    return arm
