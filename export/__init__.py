"""Export (installed as ``selfadapt_deploy.export``): ONNX export of the model and the teacher-TTA
graph, TensorRT engines, Triton repository, bioimage.io package. Not built yet: see its issue."""
