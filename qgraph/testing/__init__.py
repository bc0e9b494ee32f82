"""What qgraph's tests and benchmarks check it with, shipped so an installed qgraph can check
itself: ``emulation`` (onnxruntime for arm64 under QEMU, ``python -m qgraph.testing.emulation
setup``) and ``node_tests`` (onnx's backend node tests run through onnxruntime)."""
