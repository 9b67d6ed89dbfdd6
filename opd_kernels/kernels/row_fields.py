"""The rows of a logits row pass's [NUM_FIELDS, N] fp32 output, shared by the Triton kernel
(row_stats.py) and the native one (csrc/row_pass.cpp, whose ``Field`` enum follows this order).
lse = max + logsum is kept split too: near |z| = 1e4 an fp32 lse is off by ~1e-3, so
log p = (x - max) - logsum is computed from the parts (in the backward as well) to keep p to
fp32 precision."""

FIELDS = ("lse_s", "lse_t", "max_s", "max_t", "logsum_s", "logsum_t", "kl", "forward_kl",
          "student_logprob", "teacher_logprob", "student_entropy", "teacher_entropy", "overlap",
          "student_mass", "teacher_mass", "overlap_advantage")
