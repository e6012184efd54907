"""The CPU/GPU engine: everything that touches weights and kernels (torch-touching).

It takes plain values (devices, a per-layer map, labels) and knows nothing of profiles,
planning or the plugin manager; the builtin plugins in ``gemma_profiles.hooks`` call it.
One module per builtin: ``loading`` (checkpoint loading), ``quantization`` (int8 weights),
``kernels`` (packed full-precision weights for fast CPU matmuls), ``fused`` (whole decoder
layers in native code), ``offload`` (CPU/disk offload and weight streaming); and what they
share: ``native`` (the C kernels in ``csrc/``, built on first use), ``half`` (float16
storage, float32 compute), ``tied`` (the tied embedder for the sampler), ``lazy``
(parameters without memory until loaded), ``hugepages`` and ``pages`` (OS page work).
"""
