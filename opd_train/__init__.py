"""opd_train: on-policy distillation of causal LMs with the opd_kernels fused-linear losses.

``python -m opd_train`` runs the embedded demonstration (a generated arithmetic task, a tokenizer
and two small models trained here); ``python -m opd_train --student S --teacher T --prompts F``
distills real Hugging Face models; under ``torchrun --nproc-per-node N -m opd_train ...`` the same
run spans N processes, both models sharded with FSDP2 (distributed.py).
"""
