"""The trainer: trains the project's models and exports them to ONNX.

Its tasks (``tasks/``: detector, dcgan, classifier, sky-position) run through one loop (``loop.py``), from
``tessera train`` or a queued job (``worker.py``); torch is imported only here, never by the runtime
services, which run the exported ONNX with ONNX Runtime.
"""
