"""Weight forms (quantized data, the linear layers that run them) and their kernels' Python side."""
