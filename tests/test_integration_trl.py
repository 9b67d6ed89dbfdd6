"""opd_kernels.integrations.trl against the real TRL: DistillationTrainer steps on tiny random
Llamas with TRL's own loss and with ours, and the loss function against TRL's
``_chunked_divergence_loss`` (its PyTorch fallback on CPU)."""
import copy

import pytest
import torch

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import DistillationConfig, DistillationTrainer  # noqa: E402
from trl.trainer.distillation_trainer import _chunked_divergence_loss  # noqa: E402

import opd_kernels  # noqa: E402
from opd_kernels.integrations.hf_trainer import divergence_loss  # noqa: E402
from opd_kernels.integrations.trl import OPDDistillationConfig, OPDDistillationTrainer  # noqa: E402
from test_integration_hf_trainer import tiny_lm, tiny_tokenizer  # noqa: E402

# logit scale and soft-capping on both models: TRL reads them from the config, so must we
QUIRKS = dict(logit_scale=0.8, final_logit_softcapping=6.0)


class Recorder(TrainerCallback):
    """Each optimizer step's gradients, taken just before the step."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None})


def recording(trainer_cls):
    """The trainer, recording each micro-batch's loss and generated completions."""

    class Recording(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.recorded.append((loss.detach().clone(), inputs))
            return loss

    return Recording


def train(trainer_cls, config_cls, tmp_path, student, teacher, steps=2, **config):
    args = config_cls(output_dir=str(tmp_path), per_device_train_batch_size=2,
                      gradient_accumulation_steps=2, max_steps=steps, learning_rate=0.3,
                      optim="sgd", lr_scheduler_type="constant", max_completion_length=5,
                      temperature=0.9, logging_steps=1, report_to=[], save_strategy="no",
                      use_cpu=True, bf16=False, seed=0, **config)  # TRL defaults to bf16
    recorder = Recorder()
    prompts = Dataset.from_dict({"prompt": [f"w{i} w{i + 1} w{i + 2}" for i in range(3, 11)]})
    trainer = recording(trainer_cls)(model=student, teacher_model=teacher, args=args,
                                     train_dataset=prompts, processing_class=tiny_tokenizer(),
                                     callbacks=[recorder])
    trainer.recorded = []
    trainer.train()
    return trainer, recorder


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_same_losses_gradients_and_weights_as_trl(tmp_path, one_torch_thread, beta):
    student, teacher = tiny_lm(0, **QUIRKS), tiny_lm(1, hidden=48, **QUIRKS)
    theirs, their_grads = train(DistillationTrainer, DistillationConfig, tmp_path / "trl",
                                copy.deepcopy(student), teacher, beta=beta)
    ours, our_grads = train(OPDDistillationTrainer, OPDDistillationConfig, tmp_path / "opd",
                            copy.deepcopy(student), teacher, beta=beta, opd_objective="jsd")
    assert len(ours.recorded) == len(theirs.recorded) == 4  # 2 steps x 2 accumulated micro-batches
    for (our_loss, our_in), (their_loss, their_in) in zip(ours.recorded, theirs.recorded):
        assert torch.equal(our_in["completion_ids"], their_in["completion_ids"])
        assert int(their_in["completion_mask"].sum()) > 0
        torch.testing.assert_close(our_loss, their_loss, rtol=1e-5, atol=1e-7)
    assert len(our_grads.grads) == len(their_grads.grads) == 2
    for ours_g, theirs_g in zip(our_grads.grads, their_grads.grads):
        assert ours_g.keys() == theirs_g.keys() and "lm_head.weight" in ours_g
        for name in ours_g:
            torch.testing.assert_close(ours_g[name], theirs_g[name], rtol=1e-5, atol=1e-7,
                                       msg=name)
    for (name, a), b in zip(ours.model.named_parameters(), theirs.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    assert not torch.equal(ours.model.lm_head.weight, student.lm_head.weight)  # it trained
    # TRL's own entropy metric, and the top-k statistics, in the trainer's logs
    for our_log, their_log in zip(ours.state.log_history[:2], theirs.state.log_history[:2]):
        assert our_log["entropy"] == pytest.approx(their_log["entropy"], rel=1e-5)
        assert 0.0 <= our_log["opd/overlap"] <= 1.0
        assert our_log["opd/student_entropy"] == pytest.approx(our_log["entropy"], rel=1e-5)


@pytest.mark.parametrize("objective", ["topk", "sampled", "full"])
def test_opd_objectives_train_on_trl_completions(tmp_path, one_torch_thread, objective):
    # the first micro-batch's loss against the objective on both models' full logits
    student, teacher = tiny_lm(0, **QUIRKS), tiny_lm(1, hidden=48, **QUIRKS)
    initial = copy.deepcopy(student)
    trainer, _ = train(OPDDistillationTrainer, OPDDistillationConfig, tmp_path, student, teacher,
                       steps=1, opd_objective=objective, opd_k=4)
    loss, inputs = trainer.recorded[0]
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    width = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        s, t = (m(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, -width - 1:-1]
                for m in (initial, teacher))
    cap = lambda z: 6.0 * torch.tanh(0.8 * z / 6.0)  # noqa: E731
    expected = opd_kernels.opd_loss(cap(s), cap(t), objective=objective, k=4,
                                    tokens=inputs["completion_ids"],
                                    mask=inputs["completion_mask"] != 0, temperature=0.9,
                                    reduction="sum") / inputs["num_items_in_batch"]
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    logged = trainer.state.log_history[0]
    assert 0.0 <= logged["opd/overlap"] <= 1.0 and logged["entropy"] > 0
    assert not torch.equal(trainer.model.lm_head.weight, initial.lm_head.weight)


def test_loss_function_matches_trls(one_torch_thread):
    # same arguments as _chunked_divergence_loss: biases, scales, soft-caps, temperature,
    # num_items_in_batch; the teacher's head padded with 8 extra rows, which TRL's needs cut off
    torch.manual_seed(0)
    hs = torch.randn(2, 5, 16, requires_grad=True)
    ws, bs = torch.randn(48, 16, requires_grad=True), torch.randn(48, requires_grad=True)
    ht, wt, bt = torch.randn(2, 5, 24), torch.randn(56, 24), torch.randn(56)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    for beta in (0.0, 0.3, 1.0):
        options = dict(num_items_in_batch=torch.tensor(9.0), student_lm_head_bias=bs,
                       student_logit_scale=0.5, teacher_logit_scale=2.0,
                       student_final_logit_softcapping=3.0, teacher_final_logit_softcapping=4.0,
                       temperature=0.7)
        theirs, their_entropy, their_n = _chunked_divergence_loss(
            hs, ht, ws, wt[:48], mask, beta, teacher_lm_head_bias=bt[:48], **options)
        ours, our_n, stats = divergence_loss(hs, ht, ws, wt, mask, objective="jsd", beta=beta,
                                             teacher_lm_head_bias=bt, vocab_size=48,
                                             return_stats=True, **options)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
        assert int(our_n) == int(their_n) == 7
        torch.testing.assert_close(stats.student_entropy[stats.mask].sum(), their_entropy,
                                   rtol=1e-5, atol=1e-6)
        for a, b in zip(torch.autograd.grad(ours, (hs, ws, bs)),
                        torch.autograd.grad(theirs, (hs, ws, bs))):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bad_configuration_fails_at_construction(tmp_path):
    prompts = Dataset.from_dict({"prompt": ["w3 w4"] * 4})
    make = lambda teacher, **kw: OPDDistillationTrainer(  # noqa: E731
        model=tiny_lm(0), teacher_model=teacher, train_dataset=prompts,
        processing_class=tiny_tokenizer(),
        args=OPDDistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                   bf16=False, **kw.pop("config", {})), **kw)
    with pytest.raises(ValueError, match="not_an_objective"):
        make(tiny_lm(1), config=dict(opd_objective="not_an_objective"))
    with pytest.raises(ValueError, match="tokenizers differ"):
        make(tiny_lm(1), teacher_processing_class=tiny_tokenizer(
            ["<pad>", "<eos>", "<unk>"] + [f"v{i}" for i in range(45)]))
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        make(tiny_lm(1, final_logit_softcapping=0.0))
    with pytest.raises(TypeError, match="OPDDistillationConfig"):
        OPDDistillationTrainer(model=tiny_lm(0), teacher_model=tiny_lm(1), train_dataset=prompts,
                               processing_class=tiny_tokenizer(),
                               args=DistillationConfig(output_dir=str(tmp_path), report_to=[],
                                                       use_cpu=True, bf16=False))
    # differently padded lm_heads: TRL refuses them, ours compares the shared 48 rows
    with pytest.raises(ValueError, match="vocab_size"):
        DistillationTrainer(model=tiny_lm(0), teacher_model=tiny_lm(1, vocab=56),
                            train_dataset=prompts, processing_class=tiny_tokenizer(),
                            args=DistillationConfig(output_dir=str(tmp_path), report_to=[],
                                                    use_cpu=True, bf16=False))
    assert make(tiny_lm(1, vocab=56)).opd_vocab_size == 48
