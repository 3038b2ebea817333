"""The trainer: trains the project's models and exports them to ONNX.

Today it trains the demo detector (``python -m services.trainer detector``); torch is imported only here,
never by the runtime services, which run the exported ONNX with ONNX Runtime.
"""
