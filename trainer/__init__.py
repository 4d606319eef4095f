"""SelfAdapt trainer (installed as ``selfadapt_deploy.trainer``): teacher TTA, confidence masks,
losses, L2-SP, EMA, stopping criteria, loop, checkpoints. Not built yet: see the trainer issue."""
