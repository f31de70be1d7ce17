"""Optional, hardware-specific kernels that plug in behind a config switch and are never
needed for correctness: onednn/ is a oneDNN convolution for XLA:CPU (`model.conv_backend`)."""
