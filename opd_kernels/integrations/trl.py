"""TRL: ``OPDDistillationTrainer``, a ``trl.DistillationTrainer`` whose loss is this library's.

TRL's ``DistillationTrainer._compute_loss`` runs both backbones (through the DDP/FSDP/DeepSpeed
wrappers, via ``_forward_redirection``), reads each model's logit scale and soft-capping from its
config, and hands everything to the module-level ``_chunked_divergence_loss``. This trainer keeps
all of that and replaces only that one call, with the same arguments, by
``fused_linear_opd_loss``: TRL's ``beta`` JSD by default (``opd_objective="jsd"``), or any
objective of ``opd_kernels.objectives`` (``topk``, ``sampled``, ``full``, ...). The ZeRO-3 lm_heads
are gathered with TRL's own ``maybe_gather_lm_head_ctx``, FSDP2 DTensor heads with
``full_tensor()`` as TRL does. The top-k statistics go into the trainer's own metrics
(``opd/<name>``, averaged over the logging window by ``DistillationTrainer.log``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from unittest import mock

import torch
from trl import DistillationConfig, DistillationTrainer
from trl.models import prepare_deepspeed
from trl.trainer import distillation_trainer as trl_distillation
from trl.trainer.utils import create_model_from_path, get_config_model_id, maybe_gather_lm_head_ctx

from .hf_trainer import check_pair, divergence_loss


@dataclass
class OPDDistillationConfig(DistillationConfig):
    """``DistillationConfig`` plus the choice of this library's objective."""

    opd_objective: str = field(default="jsd", metadata={
        "help": "Objective of opd_kernels.objectives: 'jsd' is TRL's generalized JSD with `beta`; "
                "'topk', 'sampled', 'full', 'forward_kl', 'topk_pg' are the OPD objectives."})
    opd_k: int = field(default=16, metadata={"help": "k of the top-k objectives and statistics."})
    opd_log_stats: bool = field(default=True, metadata={
        "help": "Log the top-k shared-mass statistics (for 'topk' this adds the teacher's lm_head "
                "product the objective itself does not need)."})


class OPDDistillationTrainer(DistillationTrainer):
    """Drop-in for ``trl.DistillationTrainer``; takes an ``OPDDistillationConfig``.

    ``teacher_processing_class``: the teacher's tokenizer, checked against the student's.
    Differently padded lm_heads are accepted (the shared first rows are compared) where
    ``DistillationTrainer`` requires equal ``vocab_size``.
    """

    def __init__(self, model, teacher_model=None, args: OPDDistillationConfig | None = None, *,
                 teacher_processing_class=None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = OPDDistillationConfig(f"{name.split('/')[-1]}-Distillation")
        if not isinstance(args, OPDDistillationConfig):
            raise TypeError(f"args must be an OPDDistillationConfig (a DistillationConfig with the "
                            f"opd_* fields), got {type(args).__name__}")
        if teacher_model is None:
            raise ValueError("OPDDistillationTrainer needs a teacher_model")
        if isinstance(teacher_model, str):
            teacher_model = self._load_teacher(teacher_model, args)
        # The teacher is prepared below as DistillationTrainer.__init__ prepares it, with our checks
        # in place of its vocab_size one, which rejects differently padded lm_heads.
        super().__init__(model, None, args, **kwargs)
        self.opd_objective_params = {"beta": args.beta} if args.opd_objective == "jsd" else {}
        if self.is_deepspeed_enabled:
            self.teacher_model = prepare_deepspeed(teacher_model, self.accelerator)
        else:
            self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
        unwrap = self.accelerator.unwrap_model
        self.opd_vocab_size = check_pair(
            unwrap(self.model), unwrap(self.teacher_model), objective=args.opd_objective,
            objective_params=self.opd_objective_params, k=args.opd_k, tokenizer=self._tokenizer,
            teacher_tokenizer=teacher_processing_class)
        self._opd_summary = None

    @staticmethod
    def _load_teacher(name: str, args: OPDDistillationConfig):
        # as DistillationTrainer.__init__ loads a teacher given by name
        init_kwargs = dict(args.teacher_model_init_kwargs or {})
        dtype = init_kwargs.get("dtype")
        init_kwargs["dtype"] = dtype if dtype in ["auto", None] else getattr(torch, dtype)
        if args.teacher_model_revision is not None:
            init_kwargs.setdefault("revision", args.teacher_model_revision)
        if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
            init_kwargs["device_map"] = None
        init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        args.teacher_model_init_kwargs = None  # consumed here
        return create_model_from_path(name, **init_kwargs)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        # The hidden states TRL passes predict `completion_ids` position by position: the sampled
        # tokens of the on-policy objectives.
        def loss(student_hidden_states, teacher_hidden_states, student_lm_head_weight,
                 teacher_lm_head_weight, completion_mask, beta, **options):
            with maybe_gather_lm_head_ctx(student_lm_head_weight, options["student_lm_head_bias"]), \
                    maybe_gather_lm_head_ctx(teacher_lm_head_weight, options["teacher_lm_head_bias"]):
                value, n_valid, stats = divergence_loss(
                    student_hidden_states, teacher_hidden_states, student_lm_head_weight,
                    teacher_lm_head_weight, completion_mask, objective=self.args.opd_objective,
                    tokens=inputs["completion_ids"], k=self.args.opd_k,
                    vocab_size=self.opd_vocab_size, return_stats=self.args.opd_log_stats,
                    **options, **self.opd_objective_params)
            if stats is None:  # no entropy without the statistics: DistillationTrainer.log skips NaN
                return value, torch.full((), float("nan"), device=n_valid.device), n_valid
            counted = stats.mask
            self._opd_summary = stats.summary()
            return value, stats.student_entropy[counted].sum().detach(), n_valid

        with mock.patch.object(trl_distillation, "_chunked_divergence_loss", loss):
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self._opd_summary is not None:
            # Gathered here, outside the wrapped forward, as DistillationTrainer gathers its entropy;
            # the logged value is the mean over processes of each process's token mean.
            mode = "train" if self.model.training else "eval"
            names = list(self._opd_summary)
            local = torch.tensor([self._opd_summary[n] for n in names],
                                 device=self.accelerator.device)
            merged = self.accelerator.gather_for_metrics(local[None]).nanmean(dim=0)
            for name, value in zip(names, merged.tolist()):
                self._metrics[mode][f"opd/{name}"].append(value)
            self._opd_summary = None
        return out
