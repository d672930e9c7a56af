"""torch -> ONNX export with recurrent state as graph inputs/outputs, and verification.

``metadata`` and ``repository`` are torch-free (the server imports them);
``onnx_export`` needs the ``train`` extra, ``verify`` needs onnx and onnxruntime
(and torch only to compare against a checkpoint).
"""
