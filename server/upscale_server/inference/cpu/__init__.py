"""CPU kernels: the Winograd F(4x4, 3x3) C kernel (build and load) and the convolution primitives on it."""
