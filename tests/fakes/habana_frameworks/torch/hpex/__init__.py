from habana_frameworks.torch.hpex import optimizers  # noqa: F401
