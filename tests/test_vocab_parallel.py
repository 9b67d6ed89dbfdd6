"""Vocabulary-parallel ops on 2 gloo ranks equal the single-process ops on the whole vocabulary.

One pair of processes runs every case (two_ranks.py): each rank computes the single-process op
on the full tensors and the sharded op on its shard, and compares values, gradients (its shard
of the logits' or weight's, the whole hidden states') and statistics. The single-process op is
itself tested against the float64 reference (test_api_torch.py); the float64 cases here hold
the sharded op to 1e-12."""
import pytest
import torch
import torch.distributed as dist

import opd_kernels as O
from opd_kernels import VocabParallel, objectives

import two_ranks

V, PADDED, LEAD, H, H_T = 37, 40, (2, 3), 8, 5
RELATIVE = {torch.float32: 1e-6, torch.float64: 1e-12}


def rand(*shape, seed, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def positions(seed=2):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, LEAD, generator=g)
    tokens[0, 1] = V - 1  # the last id of the last shard
    mask = torch.tensor([[True, False, True], [True, True, False]])
    return tokens, mask


def shard(t, vp: VocabParallel, dim=-1):
    return t.narrow(dim, vp.start, vp.width)


def close(got, want, what, dtype=torch.float32):
    two_ranks.close(got, want, what, RELATIVE[dtype])


def stats_close(got, want):
    """The statistics are fp32 whatever the input's dtype."""
    assert set(got.tensors()) == set(want.tensors()), (set(got.tensors()), set(want.tensors()))
    for name, value in want.tensors().items():
        close(got.tensors()[name], value, f"stats.{name}")
    assert got.teacher_entropy_is_bound == want.teacher_entropy_is_bound


def grads(out, inputs, upstream=None):
    return torch.autograd.grad(out, inputs, upstream)


def upstream_for(out):
    """Per-position weights for a per-position loss (None for a scalar)."""
    if out.dim() == 0:
        return None
    return torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype).reshape(out.shape)


# ---- the logits form ----------------------------------------------------------------------------

def logits_loss(objective, dtype=torch.float32, reduction="none", **params):
    def case(rank):
        vp = VocabParallel.even(V)
        zs, zt = rand(*LEAD, V, seed=0, dtype=dtype), rand(*LEAD, V, seed=1, dtype=dtype)
        tokens, mask = positions()
        kw = dict(objective=objective, tokens=tokens, k=4, mask=mask, temperature=0.7,
                  student_softcap=6.0, teacher_softcap=8.0, reduction=reduction,
                  return_stats=True, **params)
        full = zs.clone().requires_grad_()
        want, want_stats = O.opd_loss(full, zt, backend="torch", **kw)
        local = shard(zs, vp).clone().requires_grad_()
        got, got_stats = O.opd_loss(local, shard(zt, vp), vocab_parallel=vp, **kw)
        close(got, want, "loss", dtype)
        up = upstream_for(want)
        close(grads(got, local, up)[0], shard(grads(want, full, up)[0], vp), "grad", dtype)
        stats_close(got_stats, want_stats)
    return case


def logits_single_ops(rank):
    vp = VocabParallel.even(V)
    zs = rand(*LEAD, V, seed=3)
    tokens, _ = positions()
    for op, args in ((O.logsumexp, ()), (O.token_logprobs, (tokens,))):
        full, local = zs.clone().requires_grad_(), shard(zs, vp).clone().requires_grad_()
        want = op(full, *args, temperature=1.3, softcap=5.0, backend="torch")
        got = op(local, *args, temperature=1.3, softcap=5.0, vocab_parallel=vp)
        close(got, want, op.__name__)
        up = upstream_for(want)
        close(grads(got, local, up)[0], shard(grads(want, full, up)[0], vp), f"{op.__name__} grad")


def tied_across_the_boundary(seed):
    """Logits whose largest values tie at ids 17..20, across the shards' boundary at 19."""
    z = rand(*LEAD, V, seed=seed)
    z[..., 17:21] = 10.0
    return z


def logits_statistics_with_ties(rank):
    vp = VocabParallel.even(V)
    zs, zt = tied_across_the_boundary(4), tied_across_the_boundary(5)
    tokens, mask = positions()
    kw = dict(k=3, mask=mask, tokens=tokens, temperature=0.9)
    want = O.topk_overlap(zs, zt, backend="torch", **kw)
    got = O.topk_overlap(shard(zs, vp), shard(zt, vp), vocab_parallel=vp, **kw)
    stats_close(got, want)
    ids = O.student_topk_ids(shard(zs, vp), k=3, vocab_parallel=vp)
    assert ids.tolist() == [[[17, 18, 19]] * 3] * 2, ids  # ties go to the lower global id
    assert torch.equal(ids, O.student_topk_ids(zs, k=3, backend="torch"))


def uneven_split_k_above_a_shard(rank):
    # rank 0 holds 3 ids, fewer than k: its top-k is padded, never selected
    vp = [VocabParallel(0, 3, V), VocabParallel(3, V, V)][rank]
    zs, zt = rand(*LEAD, V, seed=6), rand(*LEAD, V, seed=7)
    zs[..., :3] += 4.0  # rank 0's ids are all in S
    full, local = zs.clone().requires_grad_(), shard(zs, vp).clone().requires_grad_()
    kw = dict(objective="topk_pg", k=5, return_stats=True, reduction="sum")
    want, want_stats = O.opd_loss(full, zt, backend="torch", **kw)
    got, got_stats = O.opd_loss(local, shard(zt, vp), vocab_parallel=vp, **kw)
    close(got, want, "loss")
    close(grads(got, local)[0], shard(grads(want, full)[0], vp), "grad")
    stats_close(got_stats, want_stats)


# ---- the fused-linear form ----------------------------------------------------------------------

def linear_inputs(dtype=torch.float32):
    """Both models' hidden states and padded lm_heads (PADDED rows, ids >= V padding)."""
    return tuple(rand(*shape, seed=seed, scale=1.0, dtype=dtype) for seed, shape in enumerate(
        [(*LEAD, H), (PADDED, H), (PADDED,), (*LEAD, H_T), (PADDED, H_T), (PADDED,)], start=10))


def fused_loss(objective, dtype=torch.float32, reduction="none", reduce_hidden_grad=True, **params):
    def case(rank):
        # rank 1 holds [20, 40), its ids 37..39 the padding
        vp = VocabParallel.even(PADDED, reduce_hidden_grad=reduce_hidden_grad)
        hs, ws, bs, ht, wt, bt = linear_inputs(dtype)
        tokens, mask = positions()
        kw = dict(objective=objective, tokens=tokens, k=4, mask=mask, temperature=0.8,
                  vocab_size=V, student_softcap=7.0, reduction=reduction, return_stats=True,
                  **params)
        full = [t.clone().requires_grad_() for t in (hs, ws, bs)]
        want, want_stats = O.fused_linear_opd_loss(full[0], full[1], ht, wt, student_bias=full[2],
                                                   teacher_bias=bt, backend="torch", **kw)
        local = [t.clone().requires_grad_() for t in (hs, shard(ws, vp, 0), shard(bs, vp, 0))]
        got, got_stats = O.fused_linear_opd_loss(
            local[0], local[1], ht, shard(wt, vp, 0), student_bias=local[2],
            teacher_bias=shard(bt, vp, 0), vocab_parallel=vp, **kw)
        close(got, want, "loss", dtype)
        up = upstream_for(want)
        want_grads, got_grads = grads(want, full, up), list(grads(got, local, up))
        if not reduce_hidden_grad:  # each rank's part of the hidden states' gradient
            dist.all_reduce(got_grads[0])
        close(got_grads[0], want_grads[0], "hidden grad", dtype)
        close(got_grads[1], shard(want_grads[1], vp, 0), "weight grad", dtype)
        close(got_grads[2], shard(want_grads[2], vp, 0), "bias grad", dtype)
        stats_close(got_stats, want_stats)
    return case


def fused_single_ops_and_statistics(rank):
    hs, ws, bs, ht, wt, bt = linear_inputs()
    ws, wt = ws[:V], wt[:V]  # these ops take no vocab_size: an unpadded vocabulary
    vp = VocabParallel.even(V)
    tokens, mask = positions()
    for op, args in ((O.fused_linear_logsumexp, ()), (O.fused_linear_token_logprobs, (tokens,))):
        full = [t.clone().requires_grad_() for t in (hs, ws)]
        local = [t.clone().requires_grad_() for t in (hs, shard(ws, vp, 0))]
        want = op(*full, *args, temperature=0.6, backend="torch")
        got = op(*local, *args, temperature=0.6, vocab_parallel=vp)
        close(got, want, op.__name__)
        up = upstream_for(want)
        want_grads, got_grads = grads(want, full, up), grads(got, local, up)
        close(got_grads[0], want_grads[0], f"{op.__name__} hidden grad")
        close(got_grads[1], shard(want_grads[1], vp, 0), f"{op.__name__} weight grad")
    kw = dict(k=5, mask=mask, tokens=tokens, student_bias=bs[:V], teacher_bias=bt[:V])
    want = O.fused_linear_topk_overlap(hs, ws, ht, wt, backend="torch", **kw)
    got = O.fused_linear_topk_overlap(hs, shard(ws, vp, 0), ht, shard(wt, vp, 0), vocab_parallel=vp,
                                      **{**kw, "student_bias": shard(bs[:V], vp, 0),
                                         "teacher_bias": shard(bt[:V], vp, 0)})
    stats_close(got, want)
    padded = VocabParallel.even(PADDED)
    want_ids = O.fused_linear_student_topk_ids(hs, linear_inputs()[1], k=6, vocab_size=V,
                                               backend="torch")
    got_ids = O.fused_linear_student_topk_ids(hs, shard(linear_inputs()[1], padded, 0), k=6,
                                              vocab_size=V, vocab_parallel=padded)
    assert torch.equal(got_ids, want_ids), (got_ids, want_ids)


# ---- a served teacher ---------------------------------------------------------------------------

def served_answer(zs, zt, k, top_k=6):
    """A served teacher from full teacher logits: its top-K (ids in both shards), the log-prob
    of each token, and its log-probs at the student's top-k."""
    log_q = torch.log_softmax(zt, -1)
    ids = objectives.topk_ids(zt, top_k)
    tokens, mask = positions()
    at = O.student_topk_ids(zs, k=k, backend="torch")
    return dict(teacher_ids=ids, teacher_logprobs=log_q.gather(-1, ids),
                teacher_token_logprob=log_q.gather(-1, tokens[..., None])[..., 0],
                teacher_logprobs_at=log_q.gather(-1, at), tokens=tokens, mask=mask, k=k)


def served_losses(rank):
    vp = VocabParallel.even(V)
    zs, zt = rand(*LEAD, V, seed=20), rand(*LEAD, V, seed=21)
    answer = served_answer(zs, zt, k=4)
    for objective in objectives.names("served"):
        kw = dict(objective=objective, return_stats=True, reduction="sum", **answer)
        full, local = zs.clone().requires_grad_(), shard(zs, vp).clone().requires_grad_()
        want, want_stats = O.sparse_teacher_opd_loss(full, backend="torch", **kw)
        got, got_stats = O.sparse_teacher_opd_loss(local, vocab_parallel=vp, **kw)
        close(got, want, f"{objective} loss")
        close(grads(got, local)[0], shard(grads(want, full)[0], vp), f"{objective} grad")
        stats_close(got_stats, want_stats)


def fused_served_losses(rank):
    vp = VocabParallel.even(PADDED)
    hs, ws, bs, *_ = linear_inputs()
    zs = hs @ ws[:V].T + bs[:V]
    answer = served_answer(zs, rand(*LEAD, V, seed=22), k=4)
    for objective in objectives.names("served"):
        kw = dict(objective=objective, return_stats=True, reduction="mean", vocab_size=V, **answer)
        full = [t.clone().requires_grad_() for t in (hs, ws, bs)]
        local = [t.clone().requires_grad_() for t in (hs, shard(ws, vp, 0), shard(bs, vp, 0))]
        want, want_stats = O.fused_linear_sparse_teacher_opd_loss(
            full[0], full[1], student_bias=full[2], backend="torch", **kw)
        got, got_stats = O.fused_linear_sparse_teacher_opd_loss(local[0], local[1],
                                                                student_bias=local[2],
                                                                vocab_parallel=vp, **kw)
        close(got, want, f"{objective} loss")
        want_grads, got_grads = grads(want, full), grads(got, local)
        close(got_grads[0], want_grads[0], f"{objective} hidden grad")
        close(got_grads[1], shard(want_grads[1], vp, 0), f"{objective} weight grad")
        close(got_grads[2], shard(want_grads[2], vp, 0), f"{objective} bias grad")
        stats_close(got_stats, want_stats)


# ---- bad set-ups: every rank raises the same error (none hangs) ---------------------------------

def raises(words, call):
    with pytest.raises(ValueError, match=words):
        call()


def bad_setups(rank):
    zs, zt = rand(*LEAD, V, seed=30), rand(*LEAD, V, seed=31)
    vp = VocabParallel.even(V)
    # both ranks claim the whole vocabulary: an option built for a group of 1 on a group of 2
    raises(r"ranges \[\(0, 37\), \(0, 37\)\] .* do not tile",
           lambda: O.opd_loss(zs, zt, vocab_parallel=VocabParallel(0, V, V)))
    # each rank's range of a 2-rank split, on a group of one rank (every rank builds both groups)
    alone = [dist.new_group([0]), dist.new_group([1])][rank]
    raises("group's 1 ranks do not tile", lambda: O.reverse_kl(
        shard(zs, vp), shard(zt, vp), vocab_parallel=VocabParallel(vp.start, vp.stop, V, alone)))
    other = [dist.new_group([1]), dist.new_group([0])][rank]
    raises("vocab_parallel.group does not hold this process", lambda: O.logsumexp(
        shard(zs, vp), vocab_parallel=VocabParallel(vp.start, vp.stop, V, other)))
    # a shard whose width is not its range's (rank 0 drops a column)
    narrow = shard(zs, vp)[..., : vp.width - (rank == 0)]
    raises("student_logits on rank 0 has 18 vocabulary entries but its vocab_parallel range "
           r"\[0, 19\) has 19", lambda: O.opd_loss(narrow, narrow.clone(), vocab_parallel=vp))
    # ranks that disagree on the positions, or on k
    rows = shard(zs, vp)[:, : 3 - rank]
    raises("disagree on the number of positions", lambda: O.logsumexp(rows, vocab_parallel=vp))
    raises("disagree on k",
           lambda: O.student_topk_ids(shard(zs, vp), k=3 + rank, vocab_parallel=vp))
    # padding outside the last shard: vocab_size below the last shard's first id
    hs, ws, _, ht, wt, _ = linear_inputs()
    padded = VocabParallel.even(PADDED)
    raises(r"vocab_size=15 must lie in the last shard \[20, 40\)", lambda: O.fused_linear_opd_loss(
        hs, shard(ws, padded, 0), ht, shard(wt, padded, 0), k=4, vocab_size=15,
        vocab_parallel=padded))
    raises("backend must be 'auto' or 'torch'",
           lambda: O.opd_loss(shard(zs, vp), shard(zt, vp), backend="triton", vocab_parallel=vp))
    with pytest.raises(TypeError, match="vocab_parallel must be an opd_kernels.VocabParallel"):
        O.opd_loss(zs, zt, vocab_parallel=(0, V))
    with pytest.raises(ValueError, match="must satisfy 0 <= start < stop <= total"):
        VocabParallel(5, 5, V)


def loss_module(rank):
    """OPDLoss passes its vocab_parallel to the op."""
    vp = VocabParallel.even(V)
    zs, zt = rand(*LEAD, V, seed=8), rand(*LEAD, V, seed=9)
    tokens, mask = positions()
    want = O.OPDLoss(objective="jsd", beta=0.3, backend="torch")(zs, zt, tokens=tokens, mask=mask)
    got = O.OPDLoss(objective="jsd", beta=0.3, vocab_parallel=vp)(
        shard(zs, vp), shard(zt, vp), tokens=tokens, mask=mask)
    close(got, want, "OPDLoss")


CASES = {
    **{f"logits {name}": logits_loss(name) for name in objectives.names()},
    "logits jsd beta=0.2 mean": logits_loss("jsd", reduction="mean", beta=0.2),
    "logits jsd float64": logits_loss("jsd", dtype=torch.float64),
    "logits single-model ops": logits_single_ops,
    "logits statistics, ties across the boundary": logits_statistics_with_ties,
    "uneven split, k above a shard's width": uneven_split_k_above_a_shard,
    **{f"fused {name}": fused_loss(name) for name in objectives.names()},
    "fused full float64": fused_loss("full", dtype=torch.float64),
    "fused jsd sum, hidden gradient left partial": fused_loss("jsd", reduction="sum",
                                                              reduce_hidden_grad=False),
    "fused single-model ops and statistics": fused_single_ops_and_statistics,
    "served objectives": served_losses,
    "fused served objectives": fused_served_losses,
    "OPDLoss module": loss_module,
    "bad set-ups": bad_setups,
}


@pytest.fixture(scope="module")
def results():
    return two_ranks.run_cases(__name__)


@pytest.mark.parametrize("name", list(CASES))
def test_vocab_parallel_equals_single_process(results, name):
    two_ranks.check_case(results, name)
