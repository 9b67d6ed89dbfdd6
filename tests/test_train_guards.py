"""opd_train keeps runs: every option checked before any work, an existing run never overwritten
nor its checkpoints deleted, leftovers of a kill cleaned, exit 130 after a Ctrl-C, the umask
respected, the wall time summed over sessions, the student's own tokenizer in checkpoints."""
import json
import os
import stat

import pytest
import torch
from transformers import AutoTokenizer

from opd_kernels import backends
from opd_train import checkpoint, config, demo, task, train
from opd_train.cli import main
from opd_train.errors import UsageError
from opd_train.models import tiny_llama
from opd_train.tokenizer import build_char_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tok = build_char_tokenizer(task.ALPHABET)
    torch.manual_seed(0)
    checkpoint.save_model_dir(str(root / "teacher"), tiny_llama(tok, 24, 1, 2, 64), tok)
    # the student's own tokenizer: right padding and no pad token (the batching's copy gets one)
    own = build_char_tokenizer(task.ALPHABET)
    own.pad_token = None
    checkpoint.save_model_dir(str(root / "student"), tiny_llama(tok, 16, 1, 2, 64), own)
    for name, seed in (("prompts.jsonl", 1), ("eval.jsonl", 2)):
        with open(root / name, "w") as f:
            for p in task.problems(8, 2, seed):
                f.write(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n")
    return root


def _args(root, out, *extra, eval_file=True):
    return ["--student", str(root / "student"), "--teacher", str(root / "teacher"),
            "--prompts", str(root / "prompts.jsonl"), "--output-dir", str(out),
            *(["--eval-file", str(root / "eval.jsonl")] if eval_file else []),
            "--prompts-per-step", "2", "--rollouts-per-prompt", "2", "--max-new-tokens", "6",
            "--lr", "1e-2", "--k", "4", "--seed", "5", *extra]


def _resolve(argv):
    cfg, _ = config.from_args(argv)
    return config.resolve(cfg)


@pytest.mark.parametrize("extra, message", [
    (("--micro-batch-tokens", "-1"), "--micro-batch-tokens must be >= 0"),
    (("--save-every", "-5"), "--save-every must be >= 0"),
    (("--keep-checkpoints", "-1"), "--keep-checkpoints must be >= 0"),
    (("--diagnostics-every", "0"), "--diagnostics-every must be >= 1"),
    (("--loss-temperature", "0"), "--loss-temperature must be > 0"),
    (("--lr", "nan"), "--lr must be > 0"),
])
def test_bad_numbers_refused(setup, tmp_path, extra, message):
    with pytest.raises(UsageError, match=message):
        _resolve(_args(setup, tmp_path / "r", *extra))


def test_output_dir_that_is_a_file(setup, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(_args(setup, tmp_path / "f")) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_k_above_the_kernels_limit_on_gpu(setup, tmp_path, monkeypatch):
    """The limit is the fused-linear Triton backend's declared max_k (what "auto" picks on a
    GPU); on CPU the PyTorch path takes any k."""
    assert config.kernel_k_limit("cpu", torch.float32) is None
    triton = next(b for b in backends.registered()
                  if b.name == "triton" and "fused_linear" in b.capabilities.forms)
    limit = triton.capabilities.max_k
    monkeypatch.setattr(config, "kernel_k_limit", lambda device, dtype: limit)
    with pytest.raises(UsageError, match=f"take k <= {limit}"):
        _resolve(_args(setup, tmp_path / "r", "--k", str(limit + 1)))
    _resolve(_args(setup, tmp_path / "r", "--k", str(limit)))


def test_temperatures_default_to_temperature(setup, tmp_path):
    cfg = _resolve(_args(setup, tmp_path / "r", "--temperature", "0.7", "--loss-temperature", "0.9"))
    assert (cfg.sampling_temperature, cfg.loss_temperature) == (0.7, 0.9)


def test_cache_honors_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cfg = _resolve(["--output-dir", str(tmp_path / "r")])
    assert cfg.cache_dir == str(tmp_path / "opd_train")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert config.default_cache_dir() == os.path.join("~", ".cache", "opd_train")


def test_help_shows_defaults():
    text = config.parser().format_help().replace("\n", " ")
    text = " ".join(text.split())
    assert "(default: 16)" in text  # --k
    assert "(default: 100; embedded demonstration: 800)" in text  # --steps
    assert "default: --temperature" in text


def test_rerun_into_a_run_is_refused(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(setup, out, "--steps", "2")) == 0
    before = {name: (out / name).read_bytes() for name in ("config.json", "metrics.jsonl", "eval.json")}
    code = main(_args(setup, out, "--steps", "1", "--lr", "1e-3"))
    assert code == 2 and f"--resume {out}" in capsys.readouterr().err
    assert before == {name: (out / name).read_bytes() for name in before}
    assert os.path.isdir(checkpoint.latest_checkpoint(str(out / "checkpoints")))


def test_rotation_never_deletes_a_later_checkpoint(tmp_path):
    tok = build_char_tokenizer(task.ALPHABET)
    model = tiny_llama(tok, 16, 1, 2, 64)
    optimizer = torch.optim.AdamW(model.parameters())
    for step in (7, 8):  # another run's, higher-numbered
        checkpoint.save_checkpoint(str(tmp_path), step, model, tok, optimizer, keep=2)
    for step in (1, 2, 3):
        checkpoint.save_checkpoint(str(tmp_path), step, model, tok, optimizer, keep=2)
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("step-")) == [
        "step-000002", "step-000003", "step-000007", "step-000008"]
    assert checkpoint.latest_checkpoint(str(tmp_path)).endswith("step-000003")


def test_files_respect_the_umask(tmp_path):
    tok = build_char_tokenizer(task.ALPHABET)
    model = tiny_llama(tok, 16, 1, 2, 64)
    old = os.umask(0o022)
    try:
        saved = checkpoint.save_checkpoint(str(tmp_path), 1, model, tok, torch.optim.AdamW(model.parameters()))
        checkpoint.atomic_write_text(str(tmp_path / "x.json"), "{}")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(saved) == 0o755 and mode(checkpoint.model_dir(saved)) == 0o755
    assert mode(tmp_path / "x.json") == 0o644 and mode(tmp_path / "latest") == 0o644


def test_interrupt_resume_leftovers_wall_time_and_tokenizer(setup, tmp_path, capsys,
                                                            interrupt_at_generation):
    """Ctrl-C in step 2: exit 130 after the checkpoint; a kill's .tmp-* folder is removed on
    --resume; the final wall time covers both sessions; the checkpoint's tokenizer is the
    student's own (right padding, no pad token)."""
    disarm = interrupt_at_generation(2)
    out = tmp_path / "run"
    assert main(_args(setup, out, "--steps", "3", "--objective", "sampled", "--eval-every", "0")) == 130
    first = checkpoint.load_trainer_state(checkpoint.latest_checkpoint(str(out / "checkpoints")))
    assert first["step"] == 2 and first["wall_time_s"] > 0
    (out / "checkpoints" / ".tmp-killed").mkdir()
    disarm()
    assert main(["--resume", str(out)]) == 0
    assert not (out / "checkpoints" / ".tmp-killed").exists()
    results = json.loads((out / "eval.json").read_text())
    assert results["wall_time_s"] > first["wall_time_s"]
    own = AutoTokenizer.from_pretrained(checkpoint.model_dir(checkpoint.latest_checkpoint(str(out / "checkpoints"))))
    assert own.padding_side == "right" and own.pad_token is None


def test_run_logs_diagnostics_and_heldout_on_schedule(setup, tmp_path):
    out = tmp_path / "run"
    assert main(_args(setup, out, "--steps", "5", "--diagnostics-every", "2", "--eval-every", "2",
                      "--micro-batch-tokens", "30", "--eval-diagnostics-prompts", "3")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reverse_kl" in r] == [1, 2, 4, 5]
    assert all("loss" in r and "grad_norm" in r for r in rows)
    held = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    assert [r["step"] for r in held] == [0, 2, 4, 5] and all(r["reverse_kl"] > 0 for r in held)


def test_run_without_eval_file_says_so(setup, tmp_path, capsys):
    assert main(_args(setup, tmp_path / "run", "--steps", "1", eval_file=False)) == 0
    out = capsys.readouterr().out
    assert "no --eval-file" in out and "no held-out accuracy: give --eval-file" in out
    assert "student before" not in out and "%" not in out  # no empty table


def test_gradient_checkpointing_reaches_the_student(setup, tmp_path, monkeypatch):
    enabled = []
    monkeypatch.setattr(train, "enable_checkpointing", lambda model: enabled.append(model))
    assert main(_args(setup, tmp_path / "run", "--steps", "1", "--gradient-checkpointing")) == 0
    assert len(enabled) == 1


@pytest.mark.parametrize("argv, message", [
    (["--k", "64"], "share only 22 ids"),
    (["--prompt-template", "teacher"], "has no chat template"),
    (["--prompt-template", "Q: no placeholder"], "a string containing {prompt}"),
])
def test_embedded_options_checked_before_its_sft(tmp_path, monkeypatch, capsys, argv, message):
    def no_sft(*args, **kwargs):
        raise AssertionError("the demonstration's models were prepared before the options were checked")

    monkeypatch.setattr(demo, "prepare", no_sft)
    assert main([*argv, "--output-dir", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_resume_below_the_checkpoint_refused(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(setup, out, "--steps", "2", "--eval-every", "0")) == 0
    assert main(["--resume", str(out), "--steps", "1"]) == 2
    assert "latest checkpoint is of step 2" in capsys.readouterr().err
