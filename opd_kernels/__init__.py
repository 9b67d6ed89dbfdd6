"""opd-kernels: fused on-policy distillation losses and top-k shared-mass statistics.

    from opd_kernels import opd_loss, fused_linear_opd_loss, topk_overlap, OPDLoss
"""
from . import objectives
from .distributed import VocabParallel
from .api import (fused_linear_logsumexp, fused_linear_opd_loss, fused_linear_reverse_kl,
                  fused_linear_sparse_teacher_opd_loss, fused_linear_student_topk_ids,
                  fused_linear_token_logprobs, fused_linear_topk_overlap, logsumexp, opd_loss,
                  reverse_kl, sparse_teacher_opd_loss, student_topk_ids, token_logprobs,
                  topk_overlap)
from .modules import OPDLoss
from .stats import TopKStats

__version__ = "0.1.0"

__all__ = [
    "logsumexp", "token_logprobs", "reverse_kl", "topk_overlap", "opd_loss",
    "fused_linear_logsumexp", "fused_linear_token_logprobs", "fused_linear_reverse_kl",
    "fused_linear_topk_overlap", "fused_linear_opd_loss", "sparse_teacher_opd_loss",
    "fused_linear_sparse_teacher_opd_loss", "student_topk_ids", "fused_linear_student_topk_ids",
    "OPDLoss", "TopKStats", "VocabParallel", "objectives",
]
