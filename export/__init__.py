"""Export (installed as ``selfadapt_deploy.export``): the torch graphs of ``runtime.graphs`` →
ONNX (``onnx_export``: export, bf16 islands, validation) → TensorRT engines (``tensorrt``),
assembled into an export directory with its manifest by ``exporter``. Later: Triton model
repository and bioimage.io package."""
