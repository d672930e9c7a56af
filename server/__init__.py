"""The serving core: model runtime, session store and batcher (no gRPC here).

``runtime`` loads the model repository into onnxruntime sessions from the exported
metadata alone; ``sessions`` keeps each session's recurrent state; ``batcher`` runs
one step of many sessions in one onnxruntime call. The gRPC adapters (issue B,
later) convert messages and call this core; the core never imports grpc.
"""
