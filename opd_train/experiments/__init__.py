"""The paper's phenomena reproduced on a toy world, one command each (python -m opd_train.experiments NAME)."""
