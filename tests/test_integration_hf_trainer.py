"""opd_kernels.integrations.hf_trainer: OPDTrainer steps on tiny random Llamas, the shared loss
against eager logits, and the construction-time checks. The helpers are shared with the TRL tests."""
import copy

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainingArguments

import opd_kernels
from opd_kernels.integrations.hf_trainer import OPDTrainer, check_pair, divergence_loss

WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(45)]  # 48 ids


def tiny_tokenizer(words=WORDS):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


def tiny_lm(seed, hidden=32, vocab=len(WORDS), **extra):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                         bos_token_id=None, tie_word_embeddings=False)
    for name, value in extra.items():  # e.g. final_logit_softcapping: read from the config
        setattr(config, name, value)
    return LlamaForCausalLM(config).float()


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def labelled_rows(n=8, length=10, seed=0):
    """input_ids with labels = input_ids on a 'response' (the last part), -100 on the prompt."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(3, len(WORDS), (length,), generator=g)
        labels = ids.clone()
        labels[: 3 + i % 4] = -100  # prompts of different lengths
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return rows


def run_opd_trainer(tmp_path, student, teacher, *, batch, accumulation, steps, **opd):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulation, max_steps=steps,
                             learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                             dataloader_drop_last=True, seed=0)
    trainer = OPDTrainer(student, teacher, args, train_dataset=ListDataset(labelled_rows(4)),
                         processing_class=tiny_tokenizer(), **opd)
    trainer.train()
    return trainer


def eager_loss(student, teacher, rows, objective, num_items, **kw):
    """The same loss from the full [B, L, V] logits of both models, by the library's logits form."""
    ids = torch.stack([r["input_ids"] for r in rows])
    labels = torch.stack([r["labels"] for r in rows])[:, 1:]
    s = student(input_ids=ids).logits[:, :-1]
    with torch.no_grad():
        t = teacher(input_ids=ids).logits[:, :-1]
    total = opd_kernels.opd_loss(s, t, objective=objective, tokens=labels, mask=labels != -100,
                                 reduction="sum", **kw)
    return total / num_items


@pytest.mark.parametrize("objective", ["topk", "sampled", "full"])
def test_gradient_accumulation_matches_one_big_batch(tmp_path, one_torch_thread, objective):
    # 2 micro-batches of 2 accumulated == one batch of 4 (SGD: the weights show the gradient),
    # and both equal an eager step on the full logits
    student, teacher = tiny_lm(0), tiny_lm(1, hidden=48)
    eager = copy.deepcopy(student)
    accumulated = run_opd_trainer(tmp_path / "ga", copy.deepcopy(student), teacher, batch=2,
                                  accumulation=2, steps=1, objective=objective, k=4)
    big = run_opd_trainer(tmp_path / "big", copy.deepcopy(student), teacher, batch=4,
                          accumulation=1, steps=1, objective=objective, k=4)
    rows = labelled_rows(4)  # the whole training set: one step of 4 sees every row
    num_items = sum(int((r["labels"][1:] != -100).sum()) for r in rows)
    loss = eager_loss(eager, teacher, rows, objective, num_items, k=4)
    loss.backward()
    with torch.no_grad():
        for p in eager.parameters():
            p -= 0.5 * p.grad
    for (name, a), b, c in zip(accumulated.model.named_parameters(), big.model.parameters(),
                               eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6, msg=name)
    assert big.state.log_history[0]["loss"] == pytest.approx(loss.item(), rel=1e-5)
    logged = accumulated.state.log_history[0]
    assert 0.0 <= logged["opd/overlap"] <= 1.0 and logged["opd/student_entropy"] > 0


def test_softcap_scale_and_padded_vocab_reach_the_loss(one_torch_thread):
    # the shared loss against eager logits: logit scale, soft-capping, bias, temperature, a
    # teacher lm_head with 8 more (padding) rows, num_items_in_batch
    torch.manual_seed(0)
    hs = torch.randn(2, 5, 16, requires_grad=True)
    ws = torch.randn(48, 16, requires_grad=True)
    bs = torch.randn(48, requires_grad=True)
    ht, wt, bt = torch.randn(2, 5, 24), torch.randn(56, 24), torch.randn(56)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    loss, n_valid, stats = divergence_loss(
        hs, ht, ws, wt, mask, objective="full", num_items_in_batch=torch.tensor(11.0),
        student_lm_head_bias=bs, teacher_lm_head_bias=bt, student_logit_scale=0.5,
        teacher_logit_scale=2.0, student_final_logit_softcapping=3.0,
        teacher_final_logit_softcapping=4.0, temperature=0.7, vocab_size=48, return_stats=True)
    zs = 3.0 * torch.tanh(0.5 * (hs @ ws.T + bs) / 3.0)
    zt = (4.0 * torch.tanh(2.0 * (ht @ wt.T + bt) / 4.0))[..., :48]
    expected = opd_kernels.opd_loss(zs, zt, objective="full", mask=mask != 0, temperature=0.7,
                                    reduction="sum") / 11.0
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    grads = torch.autograd.grad(loss, (hs, ws, bs))
    for got, want in zip(grads, torch.autograd.grad(expected, (hs, ws, bs))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert int(n_valid) == 7 and stats.summary()["reverse_kl"] > 0


def test_dtensor_lm_head_is_gathered(one_torch_thread):
    # FSDP2's lm_head.weight is a DTensor: a one-process gloo group, the weight sharded on it
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        hs, ht = torch.randn(6, 16), torch.randn(6, 24)
        ws, wt = torch.randn(48, 16), torch.randn(48, 24)
        sharded = torch.nn.Parameter(distribute_tensor(ws, mesh, [Shard(0)]))
        plain = torch.nn.Parameter(ws.clone())
        mask = torch.ones(6)
        results = []
        for weight in (sharded, plain):
            loss, _, _ = divergence_loss(hs, ht, weight, distribute_tensor(wt, mesh, [Shard(0)]),
                                         mask, objective="jsd", beta=0.5)
            loss.backward()
            results.append((loss, weight.grad))
        torch.testing.assert_close(results[0][0], results[1][0])
        torch.testing.assert_close(results[0][1].full_tensor(), results[1][1])
    finally:
        dist.destroy_process_group()


def test_bad_configuration_fails_at_construction(tmp_path):
    student, teacher = tiny_lm(0), tiny_lm(1)
    tokenizer = tiny_tokenizer()
    pair = dict(objective_params={}, k=4, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="unknown objective|not_an_objective"):
        check_pair(student, teacher, objective="not_an_objective", **pair)
    with pytest.raises(ValueError, match="beta"):
        check_pair(student, teacher, objective="jsd", objective_params={"beta": 1.5}, k=4)
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_pair(student, teacher, objective="topk", **pair,
                   teacher_tokenizer=tiny_tokenizer(WORDS[:3] + [f"v{i}" for i in range(45)]))
    with pytest.raises(ValueError, match="k must be"):
        check_pair(student, teacher, objective="topk", objective_params={}, k=49)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        check_pair(student, tiny_lm(1, final_logit_softcapping=-30.0), objective="full", **pair)
    with pytest.raises(ValueError, match="only padding"):  # 47 and 48 rows, 48 token ids
        check_pair(student, tiny_lm(1, vocab=47), objective="full", **pair)
    assert check_pair(student, tiny_lm(1, vocab=56), objective="full", **pair) == 48
    meta_teacher = tiny_lm(1)
    meta_teacher.lm_head.to("meta")
    with pytest.raises(ValueError, match="same device"):
        check_pair(student, meta_teacher, objective="full", **pair)
    quantized = tiny_lm(1)
    quantized.lm_head.weight = torch.nn.Parameter(torch.zeros(48, 32, dtype=torch.int8),
                                                  requires_grad=False)
    with pytest.raises(TypeError, match="quantized"):
        check_pair(student, quantized, objective="full", **pair)
    # and through the trainer itself
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="tokenizers differ"):
        OPDTrainer(student, teacher, args, train_dataset=ListDataset(labelled_rows()),
                   processing_class=tokenizer,
                   teacher_processing_class=tiny_tokenizer(WORDS[::-1]))


def test_batches_without_labels_are_refused(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = OPDTrainer(tiny_lm(0), tiny_lm(1), args, processing_class=tiny_tokenizer())
    ids = torch.randint(3, 48, (2, 6))
    with pytest.raises(ValueError, match="needs `labels`"):
        trainer.compute_loss(trainer.model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
