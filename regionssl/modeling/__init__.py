from . import meta_arch, roi_heads  # noqa: F401  (registers meta-architectures and fine-tuning heads)
