"""opd_train pieces: the task and its checker, the tokenizer, the command line's objectives (from
the registry), the loss path (shift, masks, logit scaling, soft-capping, an lm_head bias, every
objective and its parameters) against the float64 reference on the models' own logits, the
diagnostics from the loss's own pass, and checkpoint atomicity."""
import json
import math
import os

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, CohereConfig, CohereForCausalLM,
                          Gemma2Config, Gemma2ForCausalLM)

import opd_kernels
from opd_kernels import objectives, reference
from opd_train import checkpoint, config, demo, task
from opd_train.errors import UsageError
from opd_train.loss import PairedModels, opd_loss_sum, predicting_states
from opd_train.models import OutputHead, output_head, tiny_llama, verify_output_head
from opd_train.rollout import generate, response_mask_after
from opd_train.tokenizer import build_char_tokenizer
from opd_train.train import step_prompts


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer(task.ALPHABET)


def test_solution_and_checker():
    assert task.solution(347, 285, 3) == "7+5+0=12,4+8+1=13,3+2+1=06;0632"
    p = task.make_problem(999, 1, 3)
    assert p.prompt == "Q:999+001\nA:" and task.check(p.solution, p.answer)
    assert task.solution(999, 1, 3).endswith(";1000")
    assert not task.check(p.solution[:-1] + "1", p.answer)
    assert not task.check("no answer", p.answer)
    assert task.check_reference("so the total is #### 1,234", "1234")
    assert task.check_reference("\\boxed{12} and then 13", "12")
    assert not task.check_reference("it is 13", "12")


def test_problem_sets_disjoint():
    spec = demo.DemoSpec(sft_problems=300, opd_problems=100, cold_start_problems=50, eval_problems=80)
    sets = demo.problem_sets(spec)
    prompts = [{p.prompt for p in s} for s in sets]
    assert [len(s) for s in prompts] == [300, 100, 50, 80]
    assert sum(len(s) for s in prompts) == len(set().union(*prompts))


def test_tokenizer_roundtrip(tok, tmp_path):
    text = "Q:012+999\nA:2+9+0=11;1011"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids and again.padding_side == tok.padding_side


def test_step_prompts_cover_each_epoch():
    seen = [i for s in range(5) for i in step_prompts(10, 4, s, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert step_prompts(10, 4, 2, seed=3) == seen[8:12]


def test_response_mask_stops_after_eos():
    generated = torch.tensor([[5, 2, 7, 7], [5, 6, 7, 8], [2, 0, 0, 0]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(response_mask_after(generated, eos_id=2), expected)


def _pair(student, teacher):
    s_head, t_head = output_head(student, "student"), output_head(teacher, "teacher")
    return PairedModels(student, teacher, s_head, t_head,
                        min(s_head.weight.shape[0], t_head.weight.shape[0]), torch.float32)


def test_objective_choices_and_params_come_from_the_registry():
    parser = config.parser()
    action = next(a for a in parser._actions if a.dest == "objective")
    assert tuple(action.choices) == objectives.names(None)  # the dense and the served ones
    for name in objectives.names(None):
        assert objectives.get(name).summary in action.help
    jsd_beta = objectives.get("jsd").params["beta"]
    beta = next(a for a in parser._actions if a.dest == "beta")
    assert "jsd" in beta.help and f"[{jsd_beta.low:g}, {jsd_beta.high:g}]" in beta.help
    assert config.Config().beta == jsd_beta.default

    cfg, _ = config.from_args(["--objective", "jsd", "--beta", "0.25"])
    assert cfg.objective_params == {"beta": 0.25}
    cfg, _ = config.from_args(["--objective", "jsd"])
    assert cfg.objective_params == {"beta": jsd_beta.default}
    for name in objectives.names():  # only the objectives declaring beta get it
        cfg, _ = config.from_args(["--objective", name])
        assert set(cfg.objective_params) == set(objectives.get(name).params)
    with pytest.raises(UsageError, match="--beta is a parameter of objective jsd"):
        config.from_args(["--objective", "topk", "--beta", "0.25"])
    cfg, _ = config.from_args(["--objective", "jsd", "--beta", "1.5", "--output-dir", "unused"])
    with pytest.raises(UsageError, match=r"beta of objective 'jsd' must be a number in \[0, 1\]"):
        config.resolve(cfg)
    with pytest.raises(SystemExit):
        config.from_args(["--objective", "no-such-objective"])


CASES = [(name, {}) for name in objectives.names()] + [("jsd", {"beta": 0.25})]


@pytest.mark.parametrize("objective, params", CASES, ids=[f"{n}{p}" for n, p in CASES])
def test_loss_matches_reference_on_model_logits(tok, objective, params):
    """Left-padded prompts of different lengths: the loss over response tokens, computed from
    hidden states, equals the reference on the models' own (shifted) logits, value and gradient;
    the diagnostics (exact reverse KL, token reward) come from that same pass and equal both the
    reference and separate fused-linear passes on the same batch."""
    torch.manual_seed(0)
    student, teacher = tiny_llama(tok, 16, 1, 2, 64), tiny_llama(tok, 24, 1, 2, 64)
    prompts = ["Q:1+2\nA:", "Q:123+456\nA:", "Q:9\nA:"]
    batch, _ = generate(student, tok, prompts, max_new_tokens=6, temperature=1.0)
    assert batch.input_ids[0, 0] == tok.pad_token_id  # really left-padded
    pair = _pair(student, teacher)
    loss, stats = opd_loss_sum(pair, batch, objective=objective, k=4, temperature=1.0,
                               diagnostics=True, **params)
    loss.backward()
    ours = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    counted = lambda t: t[stats.mask].sum()  # noqa: E731
    kl, token_reward = counted(stats.reverse_kl), counted(stats.teacher_logprob - stats.student_logprob)

    def logits(model):
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids).logits.double()

    p = batch.prompt_len
    mask = batch.response_mask[:, p:]
    s_logits = logits(student)[:, p - 1:-1]
    with torch.no_grad():
        t_logits = logits(teacher)[:, p - 1:-1]
    want = reference.opd_loss(s_logits, t_logits, objective, tokens=batch.input_ids[:, p:], k=4,
                              mask=mask, reduction="sum", **params)
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-5)
    for g, param in zip(ours, student.parameters()):
        torch.testing.assert_close(g.double(), param.grad.double(), rtol=1e-3, atol=1e-5)
    want_kl = reference.reverse_kl(s_logits.detach(), t_logits)[mask].sum()
    torch.testing.assert_close(kl.double(), want_kl, rtol=1e-4, atol=1e-5)
    y = batch.input_ids[:, p:]
    want_reward = (reference.token_logprobs(t_logits, y) - reference.token_logprobs(s_logits.detach(), y))[mask].sum()
    torch.testing.assert_close(token_reward.double(), want_reward, rtol=1e-4, atol=1e-5)
    assert stats.overlap.shape == mask.shape and torch.isnan(stats.overlap[~mask]).all()
    assert not kl.requires_grad and not token_reward.requires_grad
    summary = stats.summary()
    assert math.isclose(summary["teacher_logprob"] - summary["student_logprob"],
                        token_reward.item() / mask.sum().item(), rel_tol=1e-5, abs_tol=1e-7)

    # The same diagnostics as the separate full-vocabulary passes the loop used to spend on them.
    with torch.no_grad():
        hs = predicting_states(student, pair.student_head, batch, torch.float32)
        ht = predicting_states(teacher, pair.teacher_head, batch, torch.float32)
        ws, wt = pair.student_head.weight, pair.teacher_head.weight
        separate_kl = opd_kernels.fused_linear_reverse_kl(hs, ws, ht, wt, mask=mask, reduction="sum")
        ids = torch.where(mask, y, torch.zeros_like(y))
        log_q, log_p = (opd_kernels.fused_linear_token_logprobs(h, w, ids) for h, w in ((ht, wt), (hs, ws)))
    torch.testing.assert_close(kl, separate_kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(token_reward, (log_q - log_p)[mask].sum(), rtol=1e-5, atol=1e-6)


def test_objective_params_reach_the_kernels(tok, monkeypatch):
    """--beta arrives at opd_kernels as the jsd's beta; the loss differs from the default's."""
    torch.manual_seed(0)
    student, teacher = tiny_llama(tok, 16, 1, 2, 64), tiny_llama(tok, 24, 1, 2, 64)
    batch, _ = generate(student, tok, ["Q:1+2\nA:"], max_new_tokens=5, temperature=1.0)
    seen = []
    real = opd_kernels.fused_linear_opd_loss

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(opd_kernels, "fused_linear_opd_loss", spy)
    cfg, _ = config.from_args(["--objective", "jsd", "--beta", "0.1"])
    pair = _pair(student, teacher)
    low, _ = opd_loss_sum(pair, batch, objective=cfg.objective, k=4, temperature=1.0,
                          diagnostics=False, **cfg.objective_params)
    default, _ = opd_loss_sum(pair, batch, objective="jsd", k=4, temperature=1.0, diagnostics=False)
    assert seen[0]["objective"] == "jsd" and seen[0]["beta"] == 0.1 and "beta" not in seen[1]
    assert not torch.allclose(low, default)


def _cohere(tok):
    return CohereForCausalLM(CohereConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                          num_hidden_layers=1, num_attention_heads=2,
                                          num_key_value_heads=2, logit_scale=0.25,
                                          pad_token_id=tok.pad_token_id))


def test_logit_scale_is_applied(tok):
    """Cohere multiplies its logits by logit_scale: the head records it, the probe agrees, and
    the loss equals the reference on the model's real logits."""
    torch.manual_seed(0)
    student, teacher = _cohere(tok), _cohere(tok)
    head = output_head(student, "student")
    assert head.hidden_scale == 0.25
    ids = tok(["Q:12+34\nA:1+2"], return_tensors="pt")["input_ids"]
    verify_output_head(student, head, ids, "student")
    batch, _ = generate(student, tok, ["Q:1+2\nA:"], max_new_tokens=5, temperature=1.0)
    loss, _ = opd_loss_sum(_pair(student, teacher), batch, objective="full", k=4,
                           temperature=1.0, diagnostics=False)
    p = batch.prompt_len
    s = student(input_ids=batch.input_ids).logits.double()[:, p - 1:-1]
    t = teacher(input_ids=batch.input_ids).logits.double()[:, p - 1:-1]
    want = reference.opd_loss(s, t, "full", mask=batch.response_mask[:, p:], reduction="sum")
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-5)


def _gemma2(tok, softcap):
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                          num_hidden_layers=1, num_attention_heads=2,
                                          num_key_value_heads=2, head_dim=8,
                                          final_logit_softcapping=softcap,
                                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                          eos_token_id=tok.eos_token_id))


def test_softcap_and_bias_are_passed_through(tok):
    """Gemma 2 caps its logits (final_logit_softcapping); an output layer may have a bias. The
    head records both, the probe agrees, and the loss (value and gradient, the bias's included)
    equals the reference on the models' real logits."""
    torch.manual_seed(0)
    student, teacher = _gemma2(tok, 2.0), _gemma2(tok, 3.0)
    student.lm_head.bias = torch.nn.Parameter(torch.randn(len(tok)))
    s_head, t_head = output_head(student, "student"), output_head(teacher, "teacher")
    assert (s_head.softcap, t_head.softcap) == (2.0, 3.0)
    assert s_head.bias is student.lm_head.bias and t_head.bias is None
    ids = tok(["Q:12+34\nA:1+2"], return_tensors="pt")["input_ids"]
    verify_output_head(student, s_head, ids, "student")
    verify_output_head(teacher, t_head, ids, "teacher")
    uncapped = OutputHead(s_head.weight, s_head.hidden_scale, s_head.bias)
    with pytest.raises(UsageError, match="not hidden_states @ lm_head.weight"):
        verify_output_head(student, uncapped, ids, "student")  # the cap matters at these logits

    batch, _ = generate(student, tok, ["Q:1+2\nA:", "Q:45+6\nA:"], max_new_tokens=5, temperature=1.0)
    loss, stats = opd_loss_sum(_pair(student, teacher), batch, objective="full", k=4, temperature=1.0,
                               diagnostics=True)
    kl = stats.reverse_kl[stats.mask].sum()
    loss.backward()
    ours = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    p = batch.prompt_len
    mask = batch.response_mask[:, p:]
    run = lambda m: m(input_ids=batch.input_ids, attention_mask=batch.attention_mask,  # noqa: E731
                      position_ids=batch.position_ids).logits.double()[:, p - 1:-1]
    s = run(student)
    with torch.no_grad():
        t = run(teacher)
    want = reference.opd_loss(s, t, "full", mask=mask, reduction="sum")
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kl.double(), want.detach(), rtol=1e-4, atol=1e-5)
    assert student.lm_head.bias.grad is not None
    for g, param in zip(ours, student.parameters()):
        torch.testing.assert_close(g.double(), param.grad.double(), rtol=1e-3, atol=1e-5)


def test_unknown_logit_postprocessing_refused(tok):
    """A head whose claimed scale is wrong (stands for any post-processing we do not know)."""
    model = tiny_llama(tok, 16, 1, 2, 64)
    head = output_head(model, "student")
    head.hidden_scale = 0.5
    ids = tok(["Q:12+34\nA:"], return_tensors="pt")["input_ids"]
    with pytest.raises(UsageError, match="not hidden_states @ lm_head.weight"):
        verify_output_head(model, head, ids, "student")


def test_checkpoint_is_atomic_and_loadable(tok, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = tiny_llama(tok, 16, 1, 2, 64)
    optimizer = torch.optim.AdamW(model.parameters())
    first = checkpoint.save_checkpoint(str(tmp_path), 1, model, tok, optimizer)
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint.model_dir(first))
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", crash)
    with pytest.raises(RuntimeError):
        checkpoint.save_checkpoint(str(tmp_path), 2, model, tok, optimizer)
    assert checkpoint.latest_checkpoint(str(tmp_path)) == first
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-000001"]
    assert checkpoint.load_trainer_state(first)["step"] == 1
    json.loads(open(os.path.join(checkpoint.model_dir(first), "config.json")).read())
    # the optimizer state sits beside the Hugging Face folder, not in it
    assert sorted(os.listdir(first)) == ["model", "trainer_state.pt"]
    assert checkpoint.STATE_FILE not in os.listdir(checkpoint.model_dir(first))
