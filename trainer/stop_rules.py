"""The label-free stopping rules' names and the paper's thresholds, torch-free: settings
(``trainer/config.py``) and the CLI read them without importing torch. The rules themselves are
``trainer/stopping.py``."""

TAU_FN = 0.05  # FN rate of θ0's instances above which the run stops (SelfAdapt)
TAU_EMB = 0.5  # embedding distance to θ0 above which the run stops (SelfAdapt)
STOP_RULES = ("fn", "emb", "both", "flow")  # --stop choices besides none
DEFAULT_STOP = "none"  # the whole budget; the guarded selection protects θ0 (README)
