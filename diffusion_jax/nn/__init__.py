"""Networks as functional Flax modules: shared layers and conditioning (layers.py), the U-Net
(unet.py) and DiT (dit.py) backbones, and the `model.arch` registry (backbones.py). Networks know
nothing of diffusion: they map (x, t, y) to an output whose meaning the objective defines."""
