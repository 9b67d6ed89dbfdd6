"""opd_train end to end on tiny models (seconds): a run with every output, resume equal to an
uninterrupted run, checkpoint reload, and the command line's errors."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_kernels import objectives
from opd_kernels.objectives import Need
from opd_train import cli, config, train
from opd_train.checkpoint import latest_checkpoint, model_dir, save_model_dir
from opd_train.cli import main
from opd_train.errors import UsageError
from opd_train.models import tiny_llama
from opd_train.tokenizer import build_char_tokenizer

METRIC_KEYS = {"step", "loss", "reverse_kl", "overlap", "student_mass", "teacher_mass",
               "overlap_advantage", "student_entropy", "teacher_entropy", "token_reward",
               "rollout_accuracy", "grad_norm", "response_length", "tokens_per_s"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _args(root, out, *extra):
    return ["--student", str(root / "student"), "--teacher", str(root / "teacher"),
            "--prompts", str(root / "prompts.jsonl"), "--eval-file", str(root / "eval.jsonl"),
            "--output-dir", str(out), "--prompts-per-step", "2", "--rollouts-per-prompt", "2",
            "--max-new-tokens", "8", "--lr", "1e-2", "--k", "4", "--seed", "5", *extra]


@pytest.mark.parametrize("objective, extra", [("full", ()), ("sampled", ()), ("topk", ()),
                                               ("jsd", ("--beta", "0.25"))])
def test_tiny_end_to_end(setup, tmp_path, objective, extra, capsys, monkeypatch):
    calls = []
    real_loss = train.opd_loss_sum

    def recording_loss(*args, **kwargs):
        calls.append(kwargs)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train, "opd_loss_sum", recording_loss)
    out = tmp_path / "run"
    assert main(_args(setup, out, "--steps", "2", "--objective", objective, *extra)) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["objective"] == objective and config["device"] == "cpu" and config["dtype"] == "float32"
    # the objective's declared parameters, and only those, reach the loss
    expected = {"beta": 0.25} if extra else {}
    assert calls and all({n: kw[n] for n in kw if n not in ("objective", "k", "temperature", "diagnostics")}
                         == expected and kw["objective"] == objective for kw in calls)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and METRIC_KEYS <= set(rows[0])
    assert all(r["reverse_kl"] > 0 and 0 <= r["overlap"] <= 1 and r["grad_norm"] > 0 for r in rows)
    assert (out / "diagnostics.png").stat().st_size > 0
    results = json.loads((out / "eval.json").read_text())
    assert {"student_before", "student_after", "teacher", "gap_recovery"} <= set(results)
    assert "gap recovery" in capsys.readouterr().out
    # the checkpoint is a Hugging Face model folder, and it holds the trained weights
    ckpt = model_dir(latest_checkpoint(str(out / "checkpoints")))
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    AutoTokenizer.from_pretrained(ckpt)
    start = AutoModelForCausalLM.from_pretrained(setup / "student")
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, start.model.layers[0].mlp.up_proj.weight)


def test_cold_start_and_prompt_template(setup, tmp_path):
    """The recipe: SFT on teacher responses to held-out prompts, then OPD on the rest, with the
    prompts posed in a given template."""
    out = tmp_path / "run"
    argv = _args(setup, out, "--steps", "1", "--objective", "topk", "--cold-start",
                 "--cold-start-prompts", "4", "--cold-start-steps", "2",
                 "--prompt-template", "Solve. {prompt}", "--max-new-tokens", "16")
    assert main(argv) == 0
    results = json.loads((out / "eval.json").read_text())
    assert {"student_before", "student_cold_start", "student_after"} <= set(results)
    # the random teacher ends some responses within 16 tokens and not others: both counted
    assert results["cold_start_responses"] > 0 and results["cold_start_dropped"] > 0
    assert results["cold_start_responses"] + results["cold_start_dropped"] == 4
    assert json.loads((out / "config.json").read_text())["prompt_template"] == "Solve. {prompt}"


def _weights(out):
    return load_file(os.path.join(model_dir(latest_checkpoint(str(out / "checkpoints"))), "model.safetensors"))


def test_resume_equals_uninterrupted(setup, tmp_path, interrupt_at_generation):
    """Ctrl-C during step 2 (of 4): the run finishes that step, checkpoints and stops; --resume
    then ends with weights bitwise equal to a run that was never interrupted."""
    common = ("--steps", "4", "--save-every", "3", "--objective", "sampled")
    assert main(_args(setup, tmp_path / "straight", *common)) == 0

    disarm = interrupt_at_generation(2)
    out = tmp_path / "interrupted"
    assert main(_args(setup, out, *common)) == cli.INTERRUPTED  # non-zero, after its checkpoint
    assert latest_checkpoint(str(out / "checkpoints")).endswith("step-000002")
    disarm()
    assert main(["--resume", str(out)]) == 0

    straight, resumed = _weights(tmp_path / "straight"), _weights(out)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def _error(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr().err


def test_missing_model_path(setup, tmp_path, capsys):
    argv = _args(setup, tmp_path / "r", "--steps", "1")
    argv[1] = str(tmp_path / "no-such-model")
    code, err = _error(capsys, argv)
    assert code == 2 and "model path not found" in err


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "Q:1+2"}\n{"prompt": \n', "prompts.jsonl:2: not valid JSON"),
    ('{"question": "Q:1+2"}\n', 'non-empty string "prompt"'),
    ("\n", "holds no prompts"),
])
def test_malformed_prompts(setup, tmp_path, capsys, content, message):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text(content)
    argv = _args(setup, tmp_path / "r", "--steps", "1")
    argv[argv.index("--prompts") + 1] = str(bad)
    code, err = _error(capsys, argv)
    assert code == 2 and message in err


def test_tokenizers_differ(setup, tmp_path, capsys):
    other = build_char_tokenizer("0123456789abcdef")
    save_model_dir(str(tmp_path / "other"), tiny_llama(other, 16, 1, 2, 64), other)
    argv = _args(setup, tmp_path / "r", "--steps", "1")
    argv[argv.index("--teacher") + 1] = str(tmp_path / "other")
    code, err = _error(capsys, argv)
    assert code == 2 and "tokenizers differ" in err


def test_objective_the_models_cannot_support(setup, tmp_path, capsys):
    code, err = _error(capsys, _args(setup, tmp_path / "r", "--steps", "1", "--k", "64"))
    assert code == 2 and "share only 22 ids" in err


@pytest.mark.parametrize("objective", objectives.names())
def test_k_larger_than_the_vocabulary(setup, tmp_path, objective):
    """k must fit the shared vocabulary only for the objectives over the student's top-k (their
    declared needs); for the others it only sizes the diagnostics, so it is clipped."""
    cfg, _ = config.from_args(_args(setup, tmp_path / "r", "--steps", "1", "--k", "64",
                                    "--objective", objective))
    cfg = config.resolve(cfg)
    spec = objectives.get(objective)
    if Need.SUPPORT in spec.needs(spec.check_params(cfg.objective_params)):
        with pytest.raises(UsageError, match="share only 22 ids"):
            cli.load_pair(cfg, str(setup / "student"), str(setup / "teacher"))
    else:
        cli.load_pair(cfg, str(setup / "student"), str(setup / "teacher"))
        assert cfg.k == 22


def test_command_line_exit_code(tmp_path):
    """The real entry point: a clear message on stderr and a non-zero exit status."""
    proc = subprocess.run([sys.executable, "-m", "opd_train", "--student", str(tmp_path / "nope"),
                           "--teacher", str(tmp_path / "nope"), "--prompts", str(tmp_path / "x.jsonl")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --prompts: file not found")
