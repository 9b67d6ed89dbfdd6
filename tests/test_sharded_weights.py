"""DTensor lm_head weights on 2 gloo ranks (two_ranks.py): an FSDP2 ``fully_shard``'ed weight is
gathered for the loss and its gradient averaged over the ranks, as FSDP2 averages the gradients
of the parameters it uses in its own forward; a Replicate weight is used as it is; a Shard(0)
weight under ``vocab_parallel`` is this rank's vocabulary shard; other placements raise, naming
the argument."""
import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

import opd_kernels as O
from opd_kernels import VocabParallel

import two_ranks

V, ROWS, H, H_T = 37, 4, 8, 5  # V uneven over 2 ranks: Shard(0) holds 19 and 18 rows


def rand(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def batch():
    """Both ranks' rows (ROWS each) of the global batch: student and teacher hidden states,
    tokens; the teacher's lm_head and the student's initial one."""
    hs, ht = rand(2 * ROWS, H, seed=0), rand(2 * ROWS, H_T, seed=1)
    tokens = torch.randint(0, V, (2 * ROWS,), generator=torch.Generator().manual_seed(2))
    return hs, ht, tokens, rand(V, H_T, seed=3)


def rows_of(t, rank):
    return t[rank * ROWS:(rank + 1) * ROWS]


def fsdp2_weight_and_bias(rank):
    """The op's gradient for an FSDP2 lm_head used outside the module's forward is the one FSDP2
    itself gives the same parameters used inside it (the logits-form op on head(x)): the ranks'
    gradients averaged, i.e. the single-process gradient of the mean of the ranks' losses."""
    mesh = init_device_mesh("cpu", (2,))
    hs, ht, tokens, wt = batch()
    torch.manual_seed(0)
    head = torch.nn.Linear(H, V)
    weight0, bias0 = head.weight.detach().clone(), head.bias.detach().clone()
    fully_shard(head, mesh=mesh)
    assert isinstance(head.weight, DTensor) and head.weight.placements == (Shard(0),)
    for objective in ("full", "topk", "sampled"):
        kw = dict(objective=objective, k=4, reduction="sum")
        local_tokens, local_teacher = rows_of(tokens, rank), rows_of(ht, rank)
        grads = {}
        for where in ("outside the forward", "inside the forward"):
            head.zero_grad()
            local_hidden = rows_of(hs, rank).clone().requires_grad_()
            if where == "outside the forward":
                loss = O.fused_linear_opd_loss(local_hidden, head.weight, local_teacher, wt,
                                               student_bias=head.bias, tokens=local_tokens, **kw)
            else:
                loss = O.opd_loss(head(local_hidden), local_teacher @ wt.T, tokens=local_tokens,
                                  backend="torch", **kw)
            loss.backward()
            grads[where] = [head.weight.grad.full_tensor(), head.bias.grad.full_tensor(),
                            local_hidden.grad]
            assert isinstance(head.weight.grad, DTensor)
            assert head.weight.grad.placements == (Shard(0),)
        full = [t.clone().requires_grad_() for t in (hs, weight0, bias0)]
        want = O.fused_linear_opd_loss(full[0], full[1], ht, wt, student_bias=full[2],
                                       backend="torch", tokens=tokens, **kw)
        (want / 2).backward()  # the mean of the two ranks' losses
        total = loss.detach().clone()
        dist.all_reduce(total)
        two_ranks.close(total, want.detach(), f"{objective} loss summed over the ranks")
        for where, (weight_grad, bias_grad, hidden_grad) in grads.items():
            for got, expected, what in ((weight_grad, full[1].grad, "weight"),
                                        (bias_grad, full[2].grad, "bias"),
                                        (hidden_grad, 2 * rows_of(full[0].grad, rank), "hidden")):
                two_ranks.close(got, expected, f"{objective} {what} gradient, {where}")


def replicated_weight_and_hidden(rank):
    mesh = init_device_mesh("cpu", (2,))
    hs, ht, tokens, wt = batch()
    w = rand(V, H, seed=4)
    weight = torch.nn.Parameter(distribute_tensor(w, mesh, [Replicate()]))
    hidden = distribute_tensor(hs, mesh, [Replicate()])
    loss = O.fused_linear_opd_loss(hidden, weight, ht, wt, objective="jsd", reduction="mean")
    loss.backward()
    plain = w.clone().requires_grad_()
    want = O.fused_linear_opd_loss(hs, plain, ht, wt, objective="jsd", reduction="mean",
                                   backend="torch")
    want.backward()
    two_ranks.close(loss, want.detach(), "loss")
    assert weight.grad.placements == (Replicate(),)
    two_ranks.close(weight.grad.to_local(), plain.grad, "gradient")


def tensor_parallel_weight_with_vocab_parallel(rank):
    mesh = init_device_mesh("cpu", (2,))
    hs, ht, tokens, wt = batch()
    ws = rand(V, H, seed=5)
    weight = torch.nn.Parameter(distribute_tensor(ws, mesh, [Shard(0)]))
    teacher = distribute_tensor(wt, mesh, [Shard(0)])
    vp = VocabParallel.even(V, mesh.get_group())
    kw = dict(objective="full", tokens=tokens, k=4, return_stats=True, reduction="sum")
    loss, stats = O.fused_linear_opd_loss(hs, weight, ht, teacher, vocab_parallel=vp, **kw)
    loss.backward()
    plain = ws.clone().requires_grad_()
    want, want_stats = O.fused_linear_opd_loss(hs, plain, ht, wt, backend="torch", **kw)
    want.backward()
    two_ranks.close(loss, want.detach(), "loss")
    two_ranks.close(stats.reverse_kl, want_stats.reverse_kl, "stats.reverse_kl")
    assert weight.grad.placements == (Shard(0),)
    two_ranks.close(weight.grad.full_tensor(), plain.grad, "gradient")


def unsupported_placements(rank):
    mesh = init_device_mesh("cpu", (2,))
    hs, ht, tokens, wt = batch()
    ws = rand(V, H, seed=6)
    cases = {
        r"student_weight is a DTensor with placements \(Shard\(dim=1\),\)":
            dict(student_weight=distribute_tensor(ws, mesh, [Shard(1)])),
        r"teacher_weight is a DTensor with placements \(Partial\(sum\),\)":
            dict(teacher_weight=DTensor.from_local(wt, mesh, [Partial()])),
        r"student_weight is a DTensor .* on a mesh of shape \(1, 2\)":
            dict(student_weight=distribute_tensor(ws, init_device_mesh("cpu", (1, 2)),
                                                  [Replicate(), Shard(0)])),
        r"student_hidden is a DTensor with placements \(Shard\(dim=0\),\)":
            dict(student_hidden=distribute_tensor(hs, mesh, [Shard(0)])),
    }
    for words, given in cases.items():
        args = {"student_hidden": hs, "student_weight": ws, "teacher_hidden": ht,
                "teacher_weight": wt, **given}
        with pytest.raises(ValueError, match=words):
            O.fused_linear_opd_loss(**args, objective="full")
    sharded = distribute_tensor(ws, mesh, [Shard(0)])
    alone = [dist.new_group([0]), dist.new_group([1])][rank]
    with pytest.raises(ValueError,
                       match="sharded over a mesh of 2 ranks but vocab_parallel.group has 1"):
        O.fused_linear_logsumexp(hs, sharded, vocab_parallel=VocabParallel(0, 19, V, alone))
    swapped = [VocabParallel(19, V, V), VocabParallel(0, 19, V)][rank]  # not the DTensor's rows
    with pytest.raises(ValueError, match=r"Shard\(0\) with rows \[\d+, \d+\) of 37 on this "
                                         r"rank but vocab_parallel says"):
        O.fused_linear_logsumexp(hs, sharded, vocab_parallel=swapped)


CASES = {
    "FSDP2 fully_shard weight and bias: gathered, gradient as FSDP2 reduces it": fsdp2_weight_and_bias,
    "Replicate weight and hidden states": replicated_weight_and_hidden,
    "tensor-parallel Shard(0) weight with vocab_parallel":
        tensor_parallel_weight_with_vocab_parallel,
    "unsupported placements raise, naming the argument": unsupported_placements,
}


@pytest.fixture(scope="module")
def results():
    return two_ranks.run_cases(__name__)


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_weights(results, name):
    two_ranks.check_case(results, name)
