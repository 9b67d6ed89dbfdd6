"""opd_kernels' losses through verl 0.9's own distillation registry and loss dispatch
(``verl.trainer.distillation.losses.distillation_ppo_loss``), on verl's data structures, compared
with this library's functions, the float64 reference and verl's own top-k metrics."""
import pytest
import torch

# No skip: the README's test command installs verl, and CI must not pass without running these
# (without verl this import fails saying how to install it).
from opd_kernels.integrations import verl as opd_verl
from verl.trainer.distillation import losses as verl_losses
from verl.utils import tensordict_utils as tu
from verl.workers.config import ActorConfig, DistillationConfig, DistillationLossConfig
from verl.workers.utils.padding import left_right_2_no_padding

import opd_kernels
from opd_kernels import reference

V, K = 40, 16
PROMPTS, RESPONSES = [3, 2, 4], [5, 6, 1]


def configs(loss_mode, strategy="fsdp", use_fused_kernels=False, **loss_options):
    options = dict(topk=V, use_policy_gradient=False, use_task_rewards=False,
                   loss_max_clamp=None, log_prob_min_clamp=None)
    options.update(loss_options)
    actor = ActorConfig(strategy=strategy, loss_agg_mode="token-mean", rollout_n=1,
                        ppo_mini_batch_size=1, use_dynamic_bsz=True,
                        use_fused_kernels=use_fused_kernels)
    return actor, DistillationConfig(
        distillation_loss=DistillationLossConfig(loss_mode=loss_mode, **options))


def jagged(values, offsets):
    return torch.nested.nested_tensor_from_jagged(values, offsets)


def rollout(seed=0):
    """Left-right padded rollouts as verl's trainer holds them, and both models' logits at the
    valid positions in verl's packed order (the one at position i predicts token i + 1)."""
    g = torch.Generator().manual_seed(seed)
    width, prompt_width = max(PROMPTS) + max(RESPONSES), max(PROMPTS)
    pos = torch.arange(width)
    attention = ((pos >= prompt_width - torch.tensor(PROMPTS)[:, None])
                 & (pos < prompt_width + torch.tensor(RESPONSES)[:, None]))
    input_ids = torch.randint(0, V, attention.shape, generator=g) * attention
    response_mask = attention[:, prompt_width:].clone()
    response_mask[0, 2] = False  # a response position that is not trained on
    nnz = int(attention.sum())
    student = (2 * torch.randn(nnz, V, generator=g)).requires_grad_()
    teacher = 2 * torch.randn(nnz, V, generator=g)
    starts = [0] + torch.tensor([p + r for p, r in zip(PROMPTS, RESPONSES)]).cumsum(0).tolist()
    at = torch.cat([torch.arange(s + p - 1, s + p + r - 1) for s, p, r in zip(starts, PROMPTS, RESPONSES)])
    valid = attention[:, prompt_width:]  # [B, R]: the response positions, in the order of `at`
    padded = {"input_ids": input_ids, "attention_mask": attention.long(),
              "position_ids": (attention.cumsum(1) - 1).clamp(min=0),
              "prompts": input_ids[:, :prompt_width], "responses": input_ids[:, prompt_width:],
              "response_mask": response_mask.long()}
    tokens = torch.cat([input_ids[attention][1:], torch.zeros(1, dtype=torch.long)])
    return padded, student, teacher, at, valid, response_mask[valid], tokens


def micro_batch(padded, teacher_ids, teacher_logprobs):
    """verl's micro batch: the padded rollouts with the teacher's [B, S, K] data, packed by
    verl's own left_right_2_no_padding."""
    attention = padded["attention_mask"].bool()
    spread = lambda flat: flat.new_zeros(*attention.shape, flat.shape[-1]).index_put_((attention,), flat)
    data = tu.get_tensordict({**padded, "teacher_ids": spread(teacher_ids),
                              "teacher_logprobs": spread(teacher_logprobs)},
                             {"dp_size": 1, "batch_num_tokens": int(padded["response_mask"].sum()),
                              "global_batch_size": attention.shape[0]})
    return left_right_2_no_padding(data)


def full_teacher(teacher):
    """The teacher's whole distribution as verl's top-k data carries it (ids ranked by log-prob)."""
    log_q = torch.log_softmax(teacher, -1)
    order = log_q.argsort(-1, descending=True)
    return order.to(torch.int32), log_q.gather(-1, order)


def run_topk_mode(loss_mode, padded, student, teacher_ids, teacher_logprobs, **options):
    """verl's two calls of a top-k mode: the logits processor on the student's logits, then the
    registered loss on model_output (wrapped as FSDPEngineWithLMHead.prepare_model_outputs does)."""
    actor, distill = configs(loss_mode, **options)
    data = micro_batch(padded, teacher_ids, teacher_logprobs)
    outputs = verl_losses.distillation_ppo_loss(actor, distill, data=data,
                                                student_logits=student.unsqueeze(0))
    offsets = data["input_ids"].offsets()
    model_output = {k: jagged(v.squeeze(0), offsets) for k, v in outputs.items()}
    loss, metrics = verl_losses.distillation_ppo_loss(actor, distill, model_output=model_output, data=data)
    per_token, _ = verl_losses.get_distillation_loss_fn(loss_mode)(actor, distill, model_output, data)
    return loss, metrics, outputs, per_token


def test_registered_in_verls_registry():
    for name, use_topk in [("opd_topk", True), ("opd_full", True), ("opd_sampled", False)]:
        settings = verl_losses.get_distillation_loss_settings(name)
        assert (settings.use_topk, settings.use_estimator) == (use_topk, not use_topk)
        fn = verl_losses.get_distillation_loss_fn(name)
        assert fn is (opd_verl.topk_loss if use_topk else opd_verl.sampled_loss)
        assert DistillationLossConfig(loss_mode=name, use_policy_gradient=False).loss_settings is settings
    with pytest.raises(ValueError, match="already registered"):
        opd_verl.register("opd_topk", "topk")


def test_verl_loads_the_losses_as_its_plugin():
    """verl imports its "verl.plugins" entry points in every process: a fresh one that only
    imports verl has the opd_* modes (pyproject.toml declares the entry point)."""
    import subprocess
    import sys
    code = ("import verl; from verl.trainer.distillation import losses as L; "
            "print(sorted(n for n in L.DISTILLATION_LOSS_REGISTRY if n.startswith('opd_')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[-2] == "['opd_full', 'opd_sampled', 'opd_topk']"


@pytest.mark.parametrize("loss_mode,objective", [("opd_topk", "topk"), ("opd_full", "full")])
def test_topk_modes_match_library_and_reference(loss_mode, objective):
    padded, student, teacher, at, valid, mask, _ = rollout()
    loss, metrics, _, per_token = run_topk_mode(loss_mode, padded, student, *full_teacher(teacher))
    ours = opd_kernels.opd_loss(student, teacher, objective=objective, k=16, reduction="none")
    torch.testing.assert_close(per_token[valid], ours[at])
    student64 = student.detach().double().requires_grad_()
    oracle = reference.opd_loss(student64, teacher.double(), objective=objective, k=16,
                                reduction="none")[at]
    torch.testing.assert_close(per_token[valid].double(), oracle, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss.double(), oracle[mask].mean(), atol=1e-6, rtol=1e-5)
    assert metrics["distillation/loss"].aggregate() == pytest.approx(loss.item())
    (grad,) = torch.autograd.grad(loss, student)
    (grad64,) = torch.autograd.grad(oracle[mask].mean(), student64)
    torch.testing.assert_close(grad.double(), grad64, atol=1e-6, rtol=1e-5)


def test_metrics_are_verls_definitions_and_the_librarys_stats():
    """verl's keys equal what verl's own forward_kl_topk mode computes when the teacher sends
    its top-k; the opd_* keys equal opd_kernels.topk_overlap over the trained positions."""
    padded, student, teacher, at, valid, mask, _ = rollout(seed=1)
    ids, logprobs = full_teacher(teacher)
    _, ours, outputs, _ = run_topk_mode("opd_topk", padded, student, ids, logprobs,
                                        log_prob_min_clamp=-3.0)
    _, verls, verl_outputs, _ = run_topk_mode("forward_kl_topk", padded, student, ids[:, :K],
                                              logprobs[:, :K], topk=K, log_prob_min_clamp=-3.0)
    for key in ("student_mass", "teacher_mass", "overlap_count", "overlap_token_advantage"):
        torch.testing.assert_close(outputs[key].float(), verl_outputs[key].float().detach())
    for key in ("student_mass", "teacher_mass", "overlap_ratio", "overlap_token_advantage"):
        assert ours[f"distillation/{key}"] == pytest.approx(verls[f"distillation/{key}"], rel=1e-5)
    stats = opd_kernels.topk_overlap(student[at][mask], teacher[at][mask], k=16).summary()
    for name in ("overlap", "student_mass", "teacher_mass", "overlap_advantage", "reverse_kl"):
        assert ours[f"distillation/opd_{name}"] == pytest.approx(stats[name], rel=1e-5, abs=1e-6)
    # verl's student_mass (on the teacher's top-k) is another quantity than ours (on S ∩ T)
    assert ours["distillation/opd_student_mass"] < ours["distillation/student_mass"] - 0.01


def test_sampled_estimator_matches_library_and_reference():
    padded, student, teacher, at, valid, mask, tokens = rollout(seed=2)
    actor, distill = configs("opd_sampled", topk=None)
    log_p = opd_kernels.token_logprobs(student, tokens)              # model_output["log_probs"]
    log_q = reference.token_logprobs(teacher, tokens).unsqueeze(-1)  # the teacher server's log q(y)
    data = micro_batch(padded, tokens.unsqueeze(-1), log_q)
    loss, metrics = verl_losses.distillation_ppo_loss(
        actor, distill, model_output={"log_probs": jagged(log_p, data["input_ids"].offsets())}, data=data)
    ours = opd_kernels.opd_loss(student, teacher, objective="sampled", tokens=tokens, reduction="none")
    torch.testing.assert_close(loss, ours[at][mask].mean())
    student64 = student.detach().double().requires_grad_()
    oracle = reference.opd_loss(student64, teacher.double(), objective="sampled", tokens=tokens,
                                reduction="none")[at][mask].mean()
    torch.testing.assert_close(loss.double(), oracle, atol=1e-6, rtol=1e-5)
    (grad,) = torch.autograd.grad(loss, student)
    (grad64,) = torch.autograd.grad(oracle, student64)
    torch.testing.assert_close(grad.double(), grad64, atol=1e-6, rtol=1e-5)
    reward = (log_q.squeeze(-1) - log_p)[at][mask].detach()
    assert metrics["distillation/opd_reward"].aggregate() == pytest.approx(reward.mean().item(), rel=1e-5)


@pytest.mark.parametrize("change,message", [
    (dict(use_policy_gradient=True), "use_policy_gradient=False"),
    (dict(strategy="megatron"), "strategy 'megatron'"),
    (dict(use_fused_kernels=True), "use_fused_kernels=False"),
])
def test_bad_configuration_is_refused_at_start_up(change, message):
    actor, distill = configs("opd_topk", **change)
    with pytest.raises(ValueError, match=message):
        opd_verl.check_config(distill, actor)
    padded, student, teacher, *_ = rollout()
    data = micro_batch(padded, *full_teacher(teacher))
    with pytest.raises(ValueError, match=message):  # and by the loss itself, before any value
        verl_losses.distillation_ppo_loss(actor, distill, data=data, student_logits=student.unsqueeze(0))


def test_bad_teacher_data_is_refused():
    padded, student, teacher, *_ = rollout()
    ids, logprobs = full_teacher(teacher)
    with pytest.raises(ValueError, match="topk=40"):   # the teacher's top-16 only
        run_topk_mode("opd_topk", padded, student, ids[:, :K], logprobs[:, :K])
    wider = torch.cat([ids, torch.full_like(ids[:, :1], V)], -1)
    with pytest.raises(ValueError, match="log-probs a position"):  # a larger teacher vocabulary
        run_topk_mode("opd_topk", padded, student, wider, torch.cat([logprobs, logprobs[:, :1]], -1))
    shifted = ids.clone()
    shifted[0, 0] = V  # an id the student's vocabulary does not have
    with pytest.raises(ValueError, match="tokenizer differs"):
        run_topk_mode("opd_full", padded, student, shifted, logprobs)
    repeated = ids.clone()
    repeated[3, 1] = repeated[3, 0]
    with pytest.raises(ValueError, match="every vocabulary id once"):
        run_topk_mode("opd_full", padded, student, repeated, logprobs)
    actor, distill = configs("opd_sampled", topk=None)
    with pytest.raises(ValueError, match="reads log q"):  # top-k data for the estimator
        verl_losses.distillation_ppo_loss(actor, distill, model_output={"log_probs": jagged(
            student[:, 0], torch.tensor([0, 8, 16, 21]))}, data=micro_batch(padded, ids, logprobs))
    # a teacher in another dtype is reconciled, not refused: the same loss
    a = run_topk_mode("opd_full", padded, student, ids, logprobs)[0]
    b = run_topk_mode("opd_full", padded, student, ids.long(), logprobs.double())[0]
    torch.testing.assert_close(a, b)


def test_tokenizers_that_differ_are_refused(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    def tokenizer(words):
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
            {w: i for i, w in enumerate(words)}, unk_token="a")))

    student, teacher = tokenizer(["a", "b", "c"]), tokenizer(["a", "c", "b"])
    opd_verl.check_tokenizers(student, tokenizer(["a", "b", "c"]))
    teacher.save_pretrained(tmp_path)
    _, distill = configs("opd_topk")
    distill.teacher_models = {"teacher_model": {"model_path": str(tmp_path)}}
    with pytest.raises(ValueError, match="tokenizers differ"):
        opd_verl.check_config(distill, student_tokenizer=student)
