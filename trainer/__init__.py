"""SelfAdapt trainer (installed as ``selfadapt_deploy.trainer``).

Built so far: the EMA teacher (``ema``), D4 teacher pseudo-labels (``teacher``), ACTIS confidence
masks (``confidence``), loss terms with L2-SP (``losses``), the LR schedule (``schedule``) and the
label-free stopping monitors (``stopping``). The training loop, ``sa-deploy adapt`` and
``sa-deploy demo`` are still to come (issue 3).
"""
