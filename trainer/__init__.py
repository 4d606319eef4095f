"""SelfAdapt trainer (installed as ``selfadapt_deploy.trainer``).

One module per part of the method: ``ema`` (in-place EMA teacher), ``teacher`` (D4 pseudo-labels),
``confidence`` (ACTIS masks), ``augment`` (strong student view), ``losses`` (BCE/MSE/L2-SP),
``schedule`` (warm-up + cosine), ``stopping`` (FN rate / embedding distance), ``step`` (one
optimisation step in the method's order), ``loop`` (run directory, snapshots, resume), ``run``
(images on disk → ``adapt``), ``report`` (curves.png), ``engine_teacher`` (the teacher's
pseudo-labels from its exported graph in onnxruntime / TensorRT) and ``pseudo_label`` (the
teacher's ensemble for whole images, ``sa-deploy pseudo-label``).
"""
