"""opd_train's loop on tiny models: the diagnostics schedule (no teacher lm_head product on the
steps between with topk), one host copy a step, token-budget micro-batches, gradient
checkpointing, the held-out diagnostics, the cold start's exact ids, the SFT warmup, the plot."""
import math

import pytest
import torch

import opd_kernels
import opd_kernels.reference
from opd_kernels.backends import triton_fused_grad
from opd_train import batching, coldstart, heldout, plots, task, train
from opd_train.config import Config
from opd_train.loss import PairedModels, opd_loss_sum
from opd_train.models import enable_checkpointing, output_head, tiny_llama
from opd_train.rollout import Batch, generate
from opd_train.sft import schedule
from opd_train.tokenizer import build_char_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPTS = ["Q:1+2\nA:", "Q:123+456\nA:", "Q:9\nA:", "Q:45+6\nA:"]


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer(task.ALPHABET)


@pytest.fixture
def models(tok):
    torch.manual_seed(0)
    return tiny_llama(tok, 16, 2, 2, 64), tiny_llama(tok, 24, 1, 2, 64)


def _pair(student, teacher):
    s_head, t_head = output_head(student, "student"), output_head(teacher, "teacher")
    return PairedModels(student, teacher, s_head, t_head, s_head.weight.shape[0], torch.float32)


def _products(monkeypatch):
    """Rows of full-vocabulary lm_head products, per weight (the PyTorch path forms every full
    product through reference.linear_logits, in the forward and in the backward's recompute; the
    native CPU path through triton_fused_grad.logits_into)."""
    rows = {}
    real, real_into = opd_kernels.reference.linear_logits, triton_fused_grad.logits_into

    def count(hidden, weight):
        rows[weight.data_ptr()] = rows.get(weight.data_ptr(), 0) + hidden.shape[0]

    def counting(hidden, weight, *args, **kwargs):
        count(hidden, weight)
        return real(hidden, weight, *args, **kwargs)

    def counting_into(out, hidden, weight):
        count(hidden, weight)
        return real_into(out, hidden, weight)

    monkeypatch.setattr(opd_kernels.reference, "linear_logits", counting)
    monkeypatch.setattr(triton_fused_grad, "logits_into", counting_into)
    return rows


def test_topk_without_diagnostics_does_no_teacher_product(tok, models, monkeypatch):
    student, teacher = models
    pair = _pair(student, teacher)
    batch, _ = generate(student, tok, PROMPTS, max_new_tokens=6, temperature=1.0)
    rows = _products(monkeypatch)
    given = []
    real = opd_kernels.fused_linear_opd_loss
    monkeypatch.setattr(opd_kernels, "fused_linear_opd_loss",
                        lambda *a, **kw: given.append(kw["tokens"]) or real(*a, **kw))
    grads = []
    for diagnostics in (False, True):
        rows.clear()
        loss, stats = opd_loss_sum(pair, batch, objective="topk", k=4, temperature=1.0,
                                   diagnostics=diagnostics)
        loss.backward()
        grads.append([p.grad.clone() for p in student.parameters()])
        student.zero_grad()
        teacher_rows = rows.get(pair.teacher_head.weight.data_ptr(), 0)
        assert (stats is not None) == diagnostics
        assert (teacher_rows > 0) == diagnostics, rows
        assert rows[pair.student_head.weight.data_ptr()] > 0
    for a, b in zip(*grads):  # the same gradient either way
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # topk reads no token ids: without diagnostics none are passed (their range check syncs)
    assert given[0] is None and given[1] is not None


def test_diagnostics_schedule():
    cfg = Config(steps=25, diagnostics_every=10)
    assert [s for s in range(1, 26) if train.diagnoses(cfg, s)] == [1, 10, 20, 25]


def _fake_batch(prompt_lens, response_lens, pad=0):
    """Rows left-padded to one prompt column and right-padded after their responses."""
    p, r = max(prompt_lens), max(response_lens)
    ids = torch.arange(1, 1 + len(prompt_lens) * (p + r)).reshape(len(prompt_lens), p + r)
    attn = torch.zeros_like(ids)
    resp = torch.zeros_like(ids, dtype=torch.bool)
    for i, (a, b) in enumerate(zip(prompt_lens, response_lens)):
        attn[i, p - a:p + b] = 1
        resp[i, p:p + b] = True
    return Batch(ids, attn, resp, p, list(response_lens), [a + b for a, b in zip(prompt_lens, response_lens)])


def test_micro_batches_fit_the_token_budget():
    batch = _fake_batch([3, 7, 2, 5, 4, 1], [10, 2, 8, 1, 9, 3])
    parts = batching.micro_batches(batch, 24)
    assert len(parts) > 1
    seen = sorted(int(row[m][0]) for part in parts for row, m in
                  zip(part.input_ids[:, part.prompt_len:], part.response_mask[:, part.prompt_len:]))
    assert seen == sorted(int(row[m][0]) for row, m in
                          zip(batch.input_ids[:, batch.prompt_len:], batch.response_mask[:, batch.prompt_len:]))
    for part in parts:  # trimmed to its own rows, within the budget (or a single row)
        assert part.input_ids.numel() <= 24 or part.input_ids.shape[0] == 1
        assert part.attention_mask[:, 0].any() and part.attention_mask[:, -1].any()
        assert part.response_tokens == int(part.response_mask.sum())
    assert batching.micro_batches(batch, 0) == [batch]


def test_micro_batches_give_the_whole_batch_loss(tok, models):
    student, teacher = models
    pair = _pair(student, teacher)
    batch, _ = generate(student, tok, PROMPTS * 2, max_new_tokens=8, temperature=1.0)
    whole, _ = opd_loss_sum(pair, batch, objective="full", k=4, temperature=1.0, diagnostics=False)
    parts = batching.micro_batches(batch, 40)
    assert len(parts) > 2
    split = sum(opd_loss_sum(pair, p, objective="full", k=4, temperature=1.0, diagnostics=False)[0]
                for p in parts)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)


def test_one_host_copy_per_step(tok, models, monkeypatch):
    """Several micro-batches, full diagnostics: one device-to-host copy."""
    student, teacher = models
    pair = _pair(student, teacher)
    batch, _ = generate(student, tok, PROMPTS * 2, max_new_tokens=8, temperature=1.0)
    copies = []
    real = batching.to_host
    monkeypatch.setattr(batching, "to_host", lambda ts: copies.append(len(ts)) or real(ts))
    cfg = Config(objective="topk", k=4, micro_batch_tokens=40, loss_temperature=1.0)
    loss_sum, stats = train._loss_and_stats(cfg, pair, batch, diagnostics=True)
    assert copies == []  # nothing reached the host during the micro-batches
    (loss, norm), summary = batching.host_summary([loss_sum, torch.tensor(1.0)], stats)
    assert len(copies) == 1 and summary["reverse_kl"] > 0 and math.isfinite(summary["token_reward"])


def test_gradient_checkpointing_same_gradient(tok, models):
    student, teacher = models
    pair = _pair(student, teacher)
    batch, _ = generate(student, tok, PROMPTS, max_new_tokens=6, temperature=1.0)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            enable_checkpointing(student)
        student.train()
        loss, _ = opd_loss_sum(pair, batch, objective="full", k=4, temperature=1.0, diagnostics=False)
        loss.backward()
        grads.append([p.grad.clone() for p in student.parameters()])
        student.zero_grad()
    assert student.model.layers[0].gradient_checkpointing
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_heldout_is_fixed_and_leaves_the_rng_alone(tok, models, tmp_path):
    student, teacher = models
    pair = _pair(student, teacher)
    cfg = Config(k=4, max_new_tokens=8, sampling_temperature=1.0, loss_temperature=1.0,
                 micro_batch_tokens=0)
    held = heldout.HeldOut(str(tmp_path / "h.jsonl"), PROMPTS, every=5, steps=12, seed=3)
    assert [s for s in range(13) if held.due(s)] == [0, 5, 10, 12]
    torch.manual_seed(11)
    state = torch.get_rng_state()
    first = held.measure(0, pair, tok, cfg, True)
    assert torch.equal(torch.get_rng_state(), state)  # the training's random stream is untouched
    again = held.measure(5, pair, tok, cfg, True)  # same student, same seed: same rollouts
    assert {k: v for k, v in first.items() if k != "step"} == {k: v for k, v in again.items() if k != "step"}
    assert first["reverse_kl"] > 0 and 0 <= first["overlap"] <= 1 and not held.due(5)


def test_cold_start_keeps_teacher_ids_and_drops_cut_off(tok, monkeypatch):
    eos, pad = tok.eos_token_id, tok.pad_token_id
    # row 0 ends with eos; row 1 was cut off at the token limit; prompts left-padded
    ids = torch.tensor([[pad, 7, 8, 9, 10, eos], [5, 6, 8, 11, 12, 13]])
    attn = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    resp = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    batch = Batch(ids, attn, resp, 3, [3, 3], [5, 6])
    monkeypatch.setattr(coldstart, "generate", lambda *a, **k: (batch, ["", ""]))
    pairs, dropped = coldstart.teacher_pairs(None, tok, ["a", "b"], max_new_tokens=3,
                                             temperature=1.0, add_special_tokens=True)
    assert pairs == [([7, 8], [9, 10, eos])] and dropped == 1


def test_short_sft_reaches_its_learning_rate():
    assert max(schedule(5)(s) for s in range(5)) > 0.8
    assert max(schedule(30)(s) for s in range(30)) > 0.9
    long = schedule(600)  # the embedded models' SFT: the 20-step warmup it was trained with
    assert long(0) == pytest.approx(1 / 20) and long(19) == pytest.approx(0.5 * (1 + math.cos(math.pi * 19 / 600)))


def test_plot_labels_smoothing_and_both_masses():
    rows = [{"step": s, "loss": 1.0 / s, "student_mass": 0.5, "teacher_mass": 0.5 + 1e-3}
            if s % 2 else {"step": s, "loss": 1.0 / s} for s in range(1, 41)]
    held = [{"step": 0, "student_mass": 0.4}, {"step": 40, "student_mass": 0.6}]
    fig = plots.figure(rows, held)
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert all(ax.get_ylabel() for ax in axes)
    mass = next(ax for ax in axes if "mass" in ax.get_title())
    lines = {line.get_label(): line for line in mass.get_lines()}
    assert {"student_mass", "teacher_mass", "student_mass (held-out)"} <= set(lines)
    assert lines["student_mass"].get_color() != lines["teacher_mass"].get_color()
    assert len(lines["student_mass"].get_xdata()) == 20  # the steps without a value skipped
    assert plots.smoothed([1.0, 1.0, 1.0], 5) == pytest.approx([1.0, 1.0, 1.0])
    assert plots.series([{"step": 1, "x": math.nan}, {"step": 2, "x": 3.0}], "x") == ([2], [3.0])
