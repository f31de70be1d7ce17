"""oneDNN convolutions for XLA:CPU as an XLA FFI custom call (conv.py; C++ in csrc/), chosen by
`model.conv_backend='onednn'`. Built only with the `onednn` extra; the XLA path needs none of it."""
