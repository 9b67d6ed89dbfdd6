"""opd_train pieces: the task and its checker, the tokenizer, the loss path (shift, masks, logit
scaling) against the float64 reference on the models' own logits, and checkpoint atomicity."""
import json
import os

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, CohereConfig, CohereForCausalLM,
                          Gemma2Config, Gemma2ForCausalLM)

from opd_kernels import reference
from opd_train import checkpoint, demo, task
from opd_train.errors import UsageError
from opd_train.loss import PairedModels, opd_loss_sum
from opd_train.models import output_head, tiny_llama, verify_output_head
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
    assert again(text)["input_ids"] == ids and again.padding_side == "left"


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


@pytest.mark.parametrize("objective", ["full", "sampled", "topk"])
def test_loss_matches_reference_on_model_logits(tok, objective):
    """Left-padded prompts of different lengths: the loss over response tokens, computed from
    hidden states, equals the reference on the models' own (shifted) logits, value and gradient."""
    torch.manual_seed(0)
    student, teacher = tiny_llama(tok, 16, 1, 2, 64), tiny_llama(tok, 24, 1, 2, 64)
    prompts = ["Q:1+2\nA:", "Q:123+456\nA:", "Q:9\nA:"]
    batch, _ = generate(student, tok, prompts, max_new_tokens=6, temperature=1.0)
    assert batch.input_ids[0, 0] == tok.pad_token_id  # really left-padded
    loss, stats, kl, token_reward = opd_loss_sum(_pair(student, teacher), batch, objective=objective,
                                                 k=4, temperature=1.0, exact_kl=True)
    loss.backward()
    ours = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()

    def logits(model):
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids).logits.double()

    p = batch.prompt_len
    mask = batch.response_mask[:, p:]
    s_logits = logits(student)[:, p - 1:-1]
    with torch.no_grad():
        t_logits = logits(teacher)[:, p - 1:-1]
    want = reference.opd_loss(s_logits, t_logits, objective, tokens=batch.input_ids[:, p:], k=4,
                              mask=mask, reduction="sum")
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
    loss, _, _, _ = opd_loss_sum(_pair(student, teacher), batch, objective="full", k=4,
                                 temperature=1.0, exact_kl=False)
    p = batch.prompt_len
    s = student(input_ids=batch.input_ids).logits.double()[:, p - 1:-1]
    t = teacher(input_ids=batch.input_ids).logits.double()[:, p - 1:-1]
    want = reference.opd_loss(s, t, "full", mask=batch.response_mask[:, p:], reduction="sum")
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-5)


def test_softcapped_model_refused(tok):
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2,
                                           num_key_value_heads=2, head_dim=8,
                                           final_logit_softcapping=30.0))
    with pytest.raises(UsageError, match="softcapping"):
        output_head(model, "teacher")


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
    loaded = AutoModelForCausalLM.from_pretrained(first)
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
    json.loads(open(os.path.join(first, "config.json")).read())
