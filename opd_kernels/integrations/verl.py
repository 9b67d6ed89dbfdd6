"""opd_kernels' losses in verl's distillation loss registry (verl 0.9).

``import opd_kernels.integrations.verl`` registers, with verl's ``register_distillation_loss``:

=============  ===========================================  ==================  =====================
loss_mode      per-token loss                               verl settings       the teacher verl sends
=============  ===========================================  ==================  =====================
``opd_topk``   KL(p̄ ‖ q̄) over S = TopK(p, 16) (eq. 5)      ``use_topk``        its full distribution
``opd_full``   KL(p ‖ q) over the vocabulary (eq. 4)        ``use_topk``        its full distribution
``opd_sampled``  -r log p(y), r = log q(y) - log p(y)       ``use_estimator``   log q(y)
=============  ===========================================  ==================  =====================

(``register(name, objective, k=..., **params)`` adds any other objective of
``opd_kernels.objectives``.) verl calls a top-k loss twice: once as the *logits processor*, on the
student's [1, nnz, V] logits with the teacher's ``teacher_ids``/``teacher_logprobs`` of the micro
batch, and once as the registered loss ``fn(config, distillation_config, model_output, data)`` on
what the first call left in ``model_output``. verl 0.9.1 sends every top-k loss mode's logits
processor to its own forward-KL code (``losses.compute_topk_loss``), so this module routes the
modes it registers to :func:`logits_processor` and leaves every other mode to verl.

The dense modes need q at ids the teacher did not rank highly, so the teacher must return its
whole distribution (``distillation.distillation_loss.topk`` = the vocabulary size, as verl's open
reverse-KL PRs do); anything less is refused, not approximated. The per-token losses are to be
backpropagated directly (``use_policy_gradient=False``). Metrics: verl's keys with verl's
definitions (T = TopK(q, k) the teacher's top-k): ``student_mass`` = Σ_T p, ``teacher_mass`` =
Σ_T q, ``overlap_count`` = |S ∩ T|, ``overlap_token_advantage`` = mean over S ∩ T of
-q (log q - log p) (0 where empty); and this library's :class:`~opd_kernels.TopKStats` under
``opd_*`` keys (``opd_student_mass`` = Σ_{S∩T} p, etc.).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

try:
    from tensordict import TensorDict
    from verl.trainer.distillation import losses as verl_losses
    from verl.trainer.distillation.losses import DistillationLossSettings, register_distillation_loss
    from verl.utils.metric import AggregationType, Metric
    from verl.utils.ulysses import get_ulysses_sequence_parallel_world_size, slice_input_tensor
    from verl.workers.utils.padding import no_padding_2_padding
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("opd_kernels.integrations.verl needs verl 0.9: pip install 'opd-kernels[verl]' "
                      "&& pip install --no-deps 'verl==0.9.1'") from error

from .. import api, objectives
from ..objectives import Need, topk_ids

# The statistics of opd_kernels' own pass that travel in model_output (as "opd_<name>").
OPD_STATS = ("overlap", "student_mass", "teacher_mass", "overlap_advantage", "reverse_kl")
# The FSDP-family strategies hand the logits processor the full vocabulary; megatron shards it.
FULL_VOCAB_STRATEGIES = ("fsdp", "fsdp2", "veomni")


@dataclass(frozen=True)
class Spec:
    """One registered loss mode: an opd_kernels objective, its k and parameters."""
    objective: str
    k: int = 16
    params: dict = field(default_factory=dict)

    @property
    def sampled(self) -> bool:
        return Need.TOKENS in objectives.get(self.objective).needs(self.params)


LOSSES: dict[str, Spec] = {}


def register(name: str, objective: str, *, k: int = 16, **params) -> Spec:
    """Register ``objective`` as verl loss mode ``name`` (``sampled`` as a single-sample
    estimator, every other objective as a top-k mode on the teacher's full distribution)."""
    found = objectives.get(objective)
    spec = Spec(found.name, k, found.check_params(params))
    if spec.sampled and found.name != "sampled":
        raise ValueError(f"objective {found.name!r} needs the sampled tokens and the full "
                         f"distributions; verl's data gives one or the other")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    settings = DistillationLossSettings(names=[name], use_estimator=spec.sampled,
                                        use_topk=not spec.sampled)
    register_distillation_loss(settings)(sampled_loss if spec.sampled else topk_loss)
    LOSSES[name] = spec
    return spec


def check_config(distillation_config, actor_config=None, *, student_tokenizer=None) -> Spec:
    """Refuse a verl configuration these losses cannot honor (called by every loss call; call it
    once at start-up to fail before the first rollout). Returns the loss mode's Spec.

    ``student_tokenizer`` (a path, hub id or tokenizer): compared with every teacher's."""
    loss_config = distillation_config.distillation_loss
    spec = LOSSES.get(loss_config.loss_mode)
    if spec is None:
        raise ValueError(f"loss_mode {loss_config.loss_mode!r} is not an opd_kernels loss; "
                         f"registered: {sorted(LOSSES)}")
    if loss_config.use_policy_gradient:
        raise ValueError(f"loss_mode {loss_config.loss_mode!r} is a loss to backpropagate: set "
                         f"distillation.distillation_loss.use_policy_gradient=False (with True, "
                         f"verl would use the negated loss as a sampled-token advantage)")
    if actor_config is not None and not spec.sampled:
        if actor_config.strategy not in FULL_VOCAB_STRATEGIES:
            raise ValueError(f"loss_mode {loss_config.loss_mode!r} needs the full-vocabulary "
                             f"logits; strategy {actor_config.strategy!r} is not supported "
                             f"(supported: {FULL_VOCAB_STRATEGIES})")
        if actor_config.use_fused_kernels:
            raise ValueError(f"loss_mode {loss_config.loss_mode!r} reads the student's logits; "
                             f"set actor.use_fused_kernels=False (the fused kernels never "
                             f"materialize them)")
    if student_tokenizer is not None:
        for teacher in distillation_config.teacher_models.values():
            path = teacher.get("model_path") if isinstance(teacher, dict) else teacher.model_path
            if path is not None:
                check_tokenizers(student_tokenizer, path)
    return spec


def check_tokenizers(student, teacher) -> None:
    """The teacher scores the student's token ids, so both must map ids to the same strings."""
    from transformers import AutoTokenizer
    load = lambda t: AutoTokenizer.from_pretrained(t) if isinstance(t, str) else t
    student, teacher = load(student), load(teacher)
    if student.get_vocab() != teacher.get_vocab():
        differ = set(student.get_vocab().items()) ^ set(teacher.get_vocab().items())
        raise ValueError(f"the student's and the teacher's tokenizers differ ({len(differ)} "
                         f"(token, id) pairs not in both, e.g. {sorted(differ)[:3]}); the "
                         f"teacher would score other tokens than the student sampled")


def dense_teacher(teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                  student_logits: torch.Tensor) -> torch.Tensor:
    """The teacher's log-probs [..., V] from verl's (ids, log-probs) pairs, which must list every
    id of the student's vocabulary once at every position."""
    vocab = student_logits.shape[-1]
    if teacher_ids.shape != teacher_logprobs.shape or teacher_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"teacher_ids {tuple(teacher_ids.shape)} / teacher_logprobs "
                         f"{tuple(teacher_logprobs.shape)} do not match the student's logits "
                         f"{tuple(student_logits.shape)}")
    if not teacher_logprobs.is_floating_point():
        raise TypeError(f"teacher_logprobs must be floating point, got {teacher_logprobs.dtype}")
    if teacher_ids.shape[-1] != vocab:
        raise ValueError(f"the teacher returned {teacher_ids.shape[-1]} log-probs a position but "
                         f"the student's vocabulary has V={vocab}: these losses need the "
                         f"teacher's full distribution, set distillation.distillation_loss.topk="
                         f"{vocab} (and a tokenizer shared with the student)")
    ids = teacher_ids.to(student_logits.device, torch.int64)
    if bool(((ids < 0) | (ids >= vocab)).any()):
        raise ValueError(f"teacher_ids outside the student's vocabulary [0, {vocab}): the "
                         f"teacher's tokenizer differs from the student's")
    seen = torch.zeros(ids.shape, dtype=torch.int32, device=ids.device).scatter_add_(
        -1, ids, torch.ones_like(ids, dtype=torch.int32))
    if not bool((seen == 1).all()):
        raise ValueError("teacher_ids do not list every vocabulary id once at every position")
    logprobs = teacher_logprobs.to(student_logits.device, torch.float32)
    dense = torch.empty(ids.shape, dtype=torch.float32, device=ids.device).scatter_(-1, ids, logprobs)
    return dense.to(student_logits.dtype)


def verl_topk_metrics(log_p: torch.Tensor, log_q: torch.Tensor, k: int,
                      log_prob_min_clamp=None) -> dict:
    """verl's top-k diagnostics (fsdp/losses.py ``compute_forward_kl_topk``) with the teacher's
    top-k T = TopK(q, k) and the student's S = TopK(p, k), per position."""
    teacher_ids = topk_ids(log_q, k)
    log_p_t, log_q_t = log_p.gather(-1, teacher_ids), log_q.gather(-1, teacher_ids)
    student_mass, teacher_mass = log_p_t.exp().sum(-1), log_q_t.exp().sum(-1)
    if log_prob_min_clamp is not None:
        log_p_t, log_q_t = log_p_t.clamp_min(log_prob_min_clamp), log_q_t.clamp_min(log_prob_min_clamp)
    shared = (teacher_ids.unsqueeze(-1) == topk_ids(log_p, k).unsqueeze(-2)).any(-1)
    count = shared.sum(-1)
    token_kl = log_q_t.exp() * (log_q_t - log_p_t)
    advantage = torch.where(count > 0, (-token_kl * shared).sum(-1) / count.clamp_min(1), 0.0)
    return {"student_mass": student_mass, "teacher_mass": teacher_mass, "overlap_count": count,
            "overlap_token_advantage": advantage}


def logits_processor(config, distillation_config, data: TensorDict, student_logits: torch.Tensor,
                     data_format: str = "thd") -> dict[str, torch.Tensor]:
    """The per-position loss and metrics of a registered top-k mode on the student's logits
    [1, nnz/sp, V] (already divided by the temperature), as verl's logits processor returns them."""
    spec = check_config(distillation_config, config)
    teacher_ids, teacher_logprobs = data["teacher_ids"], data["teacher_logprobs"]
    if teacher_ids.is_nested:
        teacher_ids, teacher_logprobs = teacher_ids.values(), teacher_logprobs.values()
    teacher_ids, teacher_logprobs = teacher_ids.unsqueeze(0), teacher_logprobs.unsqueeze(0)
    if get_ulysses_sequence_parallel_world_size() > 1:  # as verl: split the sequence over sp
        teacher_ids = slice_input_tensor(teacher_ids, dim=1)
        teacher_logprobs = slice_input_tensor(teacher_logprobs, dim=1)
    teacher = dense_teacher(teacher_ids, teacher_logprobs, student_logits)
    loss, stats = api.opd_loss(student_logits, teacher, objective=spec.objective, k=spec.k,
                               reduction="none", return_stats=True, **spec.params)
    with torch.no_grad():
        log_p = torch.log_softmax(student_logits.float(), -1)
        log_q = torch.log_softmax(teacher.float(), -1)
        outputs = verl_topk_metrics(log_p, log_q, spec.k,
                                    distillation_config.distillation_loss.log_prob_min_clamp)
    outputs = {"distillation_losses": loss, **outputs}
    outputs.update({f"opd_{name}": getattr(stats, name) for name in OPD_STATS})
    return outputs


def _response_mask(data) -> torch.Tensor:
    mask = data["response_mask"]
    return (mask.bool().to_padded_tensor(False) if mask.is_nested else mask.bool())


def topk_loss(config, distillation_config, model_output: dict, data: TensorDict
              ) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's registered-loss call for the top-k modes: the per-token loss [bsz, resp_len] and the
    metrics, aggregated as verl's ``compute_forward_kl_topk`` aggregates them."""
    spec = check_config(distillation_config, config)
    losses = no_padding_2_padding(model_output["distillation_losses"], data)
    mask = _response_mask(data)
    value = lambda key: no_padding_2_padding(model_output[key], data)[mask]
    metrics = {}
    for key in ("student_mass", "teacher_mass"):
        mass = value(key)
        metrics[f"distillation/{key}"] = mass.mean().item()
        metrics[f"distillation/{key}_min"] = Metric(AggregationType.MIN, mass.min())
        metrics[f"distillation/{key}_max"] = Metric(AggregationType.MAX, mass.max())
    count = value("overlap_count")
    metrics["distillation/overlap_ratio"] = (count.float().mean() / spec.k).item()
    shared = count > 0
    metrics["distillation/overlap_token_advantage"] = (
        value("overlap_token_advantage")[shared].mean().item() if shared.any() else 0.0)
    for name in OPD_STATS:  # this library's statistics, NaN-free means (overlap_advantage: S∩T ≠ ∅)
        per_token = value(f"opd_{name}").float()
        metrics[f"distillation/opd_{name}"] = per_token.nanmean().item()
    return losses, metrics


def sampled_loss(config, distillation_config, model_output: dict, data: TensorDict
                 ) -> tuple[torch.Tensor, dict[str, Any]]:
    """The sampled-token estimator -r log p(y), r = log q(y) - log p(y) detached (eq. 3), from
    the student's ``log_probs`` and the teacher's ``teacher_logprobs`` [.., 1] (verl's estimator
    data, as ``compute_distillation_loss_reverse_kl_estimator`` reads it)."""
    check_config(distillation_config, config)
    log_p = no_padding_2_padding(model_output["log_probs"], data)
    teacher = data["teacher_logprobs"]
    if teacher.shape[-1] != 1:
        raise ValueError(f"teacher_logprobs has {teacher.shape[-1]} log-probs a position; the "
                         f"sampled-token estimator reads log q(y) only")
    log_q = no_padding_2_padding(teacher, data).squeeze(-1).to(log_p.device, log_p.dtype)
    mask = _response_mask(data)
    reward = (log_q - log_p).detach()
    losses = -reward * log_p
    metrics = {"distillation/opd_reward": Metric(AggregationType.MEAN, reward[mask].mean()),
               "distillation/abs_loss": Metric(AggregationType.MEAN, losses[mask].abs().mean())}
    return losses, metrics


_verl_compute_topk_loss = verl_losses.compute_topk_loss


def _compute_topk_loss(config, distillation_config, data, student_logits, data_format):
    """verl's logits-processor dispatch, with the modes registered here sent to ours."""
    if distillation_config.distillation_loss.loss_mode in LOSSES:
        return logits_processor(config, distillation_config, data, student_logits, data_format)
    return _verl_compute_topk_loss(config, distillation_config, data, student_logits, data_format)


verl_losses.compute_topk_loss = _compute_topk_loss

register("opd_topk", "topk", k=16)
register("opd_full", "full", k=16)  # k: the top-k of the overlap metrics
register("opd_sampled", "sampled")
