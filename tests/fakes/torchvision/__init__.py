"""Import-only stand-in of torchvision: optimum-habana's GLM-4V tokenizer imports `torchvision.transforms`
when `adapt_transformers_to_gaudi()` loads its model modules, and PyPI's torchvision cannot load beside
the CPU torch the tests use. Nothing here runs; it has no distribution metadata, so transformers still
sees torchvision as absent."""
