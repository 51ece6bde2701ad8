"""TensorRT: engines built from a bundle's ONNX graphs, kept in a keyed cache inside the bundle.

``flavor.py`` isolates what differs between TensorRT (10/11) and TensorRT for RTX; ``build.py`` turns one ONNX
graph into a serialized engine; ``cache.py`` names, locks, writes and checks engines. Nothing here imports
torch, and tensorrt is imported only when a function here is called.
"""
