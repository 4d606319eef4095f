"""``sa-deploy serve``: a Triton Inference Server with two Python-backend models.

``segment`` (an image and settings → the labels ``sa-deploy segment`` writes) and ``network``
(tiles → flows and cell probability, dynamically batched, the exported ONNX graph's names).
:mod:`.server` finds and starts ``tritonserver``, :mod:`.models` runs inside it, :mod:`.client`
speaks its HTTP protocol (KServe v2 with binary tensors) from the standard library, and
:mod:`.triton_runner` is the runner that sends tiles to a served ``network`` (``segment --triton``).
"""
