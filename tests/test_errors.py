"""Bad input raises a clear error naming the argument, on every backend, before any kernel runs."""
import pytest
import torch

import opd_kernels as O

BACKENDS = ["torch", "triton", "cpp"]
zs, zt = torch.randn(4, 10), torch.randn(4, 10)
tokens = torch.tensor([0, 1, 2, 9])
hs, ws, ht, wt = torch.randn(4, 6), torch.randn(10, 6), torch.randn(4, 3), torch.randn(10, 3)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.mark.parametrize("call, error, words", [
    (lambda b: O.opd_loss(zs, torch.randn(4, 11), backend=b), ValueError, "vocab mismatch"),
    (lambda b: O.opd_loss(zs, torch.randn(5, 10), backend=b), ValueError, "teacher_logits shape"),
    (lambda b: O.opd_loss(zs.long(), zt, backend=b), TypeError, "student_logits must be a floating"),
    (lambda b: O.reverse_kl(zs, zt.to(torch.int32), backend=b), TypeError, "teacher_logits must be a floating"),
    (lambda b: O.logsumexp([1.0, 2.0], backend=b), TypeError, "logits must be a torch.Tensor"),
    (lambda b: O.opd_loss(zs, zt.to("meta"), backend=b), ValueError, "teacher_logits is on meta"),
    (lambda b: O.opd_loss(zs, zt, k=0, backend=b), ValueError, "k must satisfy"),
    (lambda b: O.opd_loss(zs, zt, k=11, backend=b), ValueError, "k must satisfy"),
    (lambda b: O.topk_overlap(zs, zt, k=2.0, backend=b), TypeError, "k must be an int"),
    (lambda b: O.opd_loss(zs, zt, objective="sampled", backend=b), ValueError, "needs tokens"),
    (lambda b: O.opd_loss(zs, zt, objective="nope", backend=b), ValueError, "objective must be one of"),
    (lambda b: O.opd_loss(zs, zt, objective="jsd", beta=2.0, backend=b), ValueError, "beta of objective 'jsd'"),
    (lambda b: O.opd_loss(zs, zt, objective="full", beta=0.5, backend=b), ValueError, "takes no parameters; got beta"),
    (lambda b: O.opd_loss(zs, zt, student_softcap=0.0, backend=b), ValueError, "student_softcap must be"),
    (lambda b: O.opd_loss(zs, zt, teacher_softcap=float("nan"), backend=b), ValueError, "teacher_softcap must be"),
    (lambda b: O.fused_linear_opd_loss(hs, ws, ht, wt, student_bias=torch.randn(9), backend=b), ValueError, "student_bias must have shape"),
    (lambda b: O.fused_linear_opd_loss(hs, ws, ht, wt, teacher_bias=torch.randn(10, device="meta"), backend=b), ValueError, "teacher_bias is on meta"),
    (lambda b: O.opd_loss(zs, zt, tokens=tokens, ignore_index="pad", backend=b), TypeError, "ignore_index must be"),
    (lambda b: O.opd_loss(zs, zt, reduction="avg", k=4, backend=b), ValueError, "reduction must be one of"),
    (lambda b: O.opd_loss(zs, zt, temperature=0.0, k=4, backend=b), ValueError, "temperature must be"),
    (lambda b: O.opd_loss(zs, zt, mask=torch.ones(4), backend=b), TypeError, "mask must be a bool"),
    (lambda b: O.opd_loss(zs, zt, mask=torch.ones(3, dtype=torch.bool), backend=b), ValueError, "mask shape"),
    (lambda b: O.token_logprobs(zs, torch.tensor([0, 1, 2, 10]), backend=b), ValueError, "outside the vocabulary"),
    (lambda b: O.token_logprobs(zs, torch.tensor([0, -1, 2, 3]), backend=b), ValueError, "outside the vocabulary"),
    (lambda b: O.token_logprobs(zs, tokens.float(), backend=b), TypeError, "tokens must be an integer"),
    (lambda b: O.token_logprobs(zs, tokens[:3], backend=b), ValueError, "tokens shape"),
    (lambda b: O.opd_loss(zs, zt, objective="sampled", tokens=tokens, backend="gpu"), ValueError, "backend must be one of"),
    (lambda b: O.fused_linear_opd_loss(hs, ws, ht, torch.randn(12, 3), backend=b), ValueError, "pass vocab_size"),
    (lambda b: O.fused_linear_opd_loss(hs, ws, ht, wt, vocab_size=11, backend=b), ValueError, "vocab_size must be"),
    (lambda b: O.fused_linear_opd_loss(hs, ws, ht, torch.randn(10, 4), backend=b), ValueError, "teacher_hidden has hidden size 3"),
    (lambda b: O.fused_linear_opd_loss(hs, ws, ht[:3], wt, backend=b), ValueError, "teacher_hidden positions"),
    (lambda b: O.fused_linear_opd_loss(hs, ws.double(), ht, wt, backend=b), TypeError, "student_weight is torch.float64"),
    (lambda b: O.fused_linear_opd_loss(hs, ws.view(10, 2, 3), ht, wt, backend=b), ValueError, "student_weight must be [V, H]"),
    (lambda b: O.fused_linear_opd_loss(hs, ws, ht, wt, k=11, backend=b), ValueError, "k must satisfy"),
    (lambda b: O.fused_linear_token_logprobs(hs, ws, torch.tensor([0, 1, 2, 10]), backend=b), ValueError, "outside the vocabulary"),
    (lambda b: O.fused_linear_opd_loss(hs, ws, ht, wt, weight_grad_dtype="fp32", k=4, backend=b), TypeError, "weight_grad_dtype"),
])
def test_bad_input_names_the_argument(call, error, words, backend):
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        call(backend)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_uncounted_positions_may_hold_any_token_id(backend_name):
    mask = torch.tensor([True, True, False, True])
    ignore = torch.tensor([0, 1, 10**6, 3])
    loss = O.opd_loss(zs, zt, objective="sampled", tokens=ignore, mask=mask, backend=backend_name)
    assert torch.isfinite(loss)
    # the ignore_index (-100 by default) uncounts a position by itself, without a mask
    loss = O.opd_loss(zs, zt, objective="sampled", tokens=torch.tensor([0, -100, 2, 3]),
                      backend=backend_name)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 10\) \(ignore_index is 5\)"):
        O.opd_loss(zs, zt, objective="sampled", tokens=torch.tensor([0, -100, 2, 3]),
                   ignore_index=5, backend=backend_name)


def test_triton_rejects_float64():
    with pytest.raises(TypeError, match="backend='torch' for float64"):
        O.reverse_kl(zs.double(), zt.double(), backend="triton")


def test_triton_names_its_k_limit():
    wide_s, wide_t = torch.randn(2, 100), torch.randn(2, 100)
    with pytest.raises(ValueError, match="k must be <= 64 on backend='triton'"):
        O.topk_overlap(wide_s, wide_t, k=65, backend="triton")
    with pytest.raises(ValueError, match="k must be <= 64 on backend='triton'"):
        O.fused_linear_opd_loss(torch.randn(2, 4), torch.randn(100, 4), torch.randn(2, 4),
                                torch.randn(100, 4), k=65, backend="triton")
    assert O.topk_overlap(wide_s, wide_t, k=65, backend="torch").overlap.shape == (2,)
