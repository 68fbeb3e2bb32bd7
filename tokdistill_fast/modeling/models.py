"""Loading a Hugging Face causal LM and running it truncated: embeddings in, hidden states of chosen layers out.

`Decoder` drives the model's own decoder layers (no copy of their math), so any Llama-, Qwen2-, Mistral- or
Gemma-style model works; it computes rotary embeddings once per layer type and stops at the deepest layer asked
for. Layer l means `hidden_states[l]` of the HF model: the output of decoder layer l, with the final norm
applied only when l is the last layer (which is what `hidden_states[-1]` holds). A call swaps prepacked products
(CPU bf16) and fused norms, attention and MLP forwards (C++ kernels on CPU, Triton on GPU) into the layers it runs
(packed.py, fused.py) and puts the modules back after it; the Hugging Face modules themselves are the reference
the tests compare against.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import re
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from ..config import UserInputError
from ..control import observed
from . import attention
from .attention import Attend
from .packed import Packs

log = logging.getLogger(__name__)


def _named(path: str | Path, flag: str | None) -> str:
    """How an error names a path: with the option that gave it, if any."""
    return f"{flag} {path}" if flag else str(path)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # a repository on the Hugging Face hub: owner/name
# config, tokenizer and weights (.bin only where a repository has no safetensors)
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def local_dir(path: str | Path, flag: str | None, what: str = "a Hugging Face save_pretrained directory") -> Path:
    """The directory `path` names or, where none exists and it reads as a hub id (owner/name), that repository's
    snapshot: from the hub into the Hugging Face cache, or from the cache alone where the hub cannot be reached
    (HF_HUB_OFFLINE=1, or no network); else a clear error naming `flag`."""
    if Path(path).is_dir():
        return Path(path)
    if Path(path).exists() or not HUB_ID.fullmatch(str(path)):
        raise UserInputError(f"{_named(path, flag)}: not a directory ({what} is expected)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(str(path), allow_patterns=HUB_FILES))
        if not any(snapshot.glob("*.safetensors")):  # weights saved the older way only
            snapshot = Path(snapshot_download(str(path), allow_patterns=HUB_FILES + ["*.bin"]))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UserInputError(f"{_named(path, flag)}: no such directory, and not a model the Hugging Face hub or its "
                             f"cache holds ({reason})") from None
    log.info("%s: the Hugging Face snapshot in %s", _named(path, flag), snapshot)
    return snapshot


def model_dir(path: str | Path, flag: str | None = "--model") -> Path:
    """`path` (given as `flag`, if any) as a Hugging Face model directory (local_dir: a hub id too), or a clear
    error naming it."""
    path = local_dir(path, flag)
    if not (path / "config.json").is_file():
        raise UserInputError(f"{_named(path, flag)}: no config.json; is this a Hugging Face model directory?")
    return path


def load_tokenizer(path: str | Path, flag: str | None = None) -> tuple[object, float]:
    """The fast tokenizer of a directory (given as `flag`, if any) as users load it (AutoTokenizer), and the
    seconds that took."""
    from transformers import AutoTokenizer

    where = _named(path, flag)
    path = local_dir(path, flag, "a save_pretrained tokenizer directory")
    if not any((Path(path) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise UserInputError(f"{where}: no tokenizer.json or tokenizer_config.json; is this a save_pretrained "
                             "directory?")
    t0 = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise UserInputError(f"{where}: cannot load its tokenizer with transformers: {e}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise UserInputError(f"{where}: only fast (tokenizer.json) tokenizers are supported")
    return tokenizer, time.perf_counter() - t0


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype, tokenizer=None, flag: str = "--model"):
    """Load model and tokenizer (unless given) from a local directory, frozen, with SDPA attention. Errors name the
    path and the `flag` that gave it."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    path = model_dir(path, flag)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path, flag)[0]
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    except (OSError, ValueError, KeyError, SafetensorError, RuntimeError) as e:  # a cut or mismatched weights file
        if "scaled_dot_product_attention" in str(e):  # Gemma-2: eager attention only, which the passes cannot use
            raise UserInputError(f"{flag} {path}: unsupported model: transformers cannot run its attention through "
                                 "scaled_dot_product_attention (SDPA), which the truncated passes need") from None
        raise UserInputError(f"{flag} {path}: cannot load the model with transformers: {e}") from None
    model.to(device).eval().requires_grad_(False)
    Decoder(model).check_forward(f"{flag} {path}")  # fail early and clearly on a model we cannot drive
    log.info("%s %s: %s", flag, path, summary(model))
    return model, tokenizer


def summary(model: nn.Module) -> str:
    """What a run computes with, for its log: the class, its size, and the dtype and device (--dtype auto's pick)."""
    rows, hidden = model.get_input_embeddings().weight.shape
    p = next(model.parameters())
    return (f"{type(model).__name__}, {len(model.model.layers)} layers, hidden size {hidden}, {rows:,} embedding rows, "
            f"{str(p.dtype).removeprefix('torch.')} on {p.device}")


def _attention_backend(h: torch.Tensor):
    """On CPU with gradients, SDPA's math backend: the CPU flash kernel's backward is slow for snippet-length
    sequences (SmolLM2, B=16, T=48, 30 layers: fwd+bwd 1.11 s with flash, 0.79 s with math). Else the default."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if h.device.type == "cpu" and torch.is_grad_enabled() and h.requires_grad:
        return sdpa_kernel(SDPBackend.MATH)
    return nullcontext()


ATTENTION_LAYERS = {"full_attention", "sliding_attention"}  # config.layer_types the truncated passes run
FORWARD_TOLERANCE = 1e-2  # check_forward's relative error (SmolLM2, Gemma-3: 0 in fp32 and bf16; Cohere's scale 0.9)


class Decoder:
    """Truncated forward passes over a frozen HF decoder-only model."""

    def __init__(self, model: nn.Module):
        self.model = model
        base = getattr(model, "model", None)
        layers = getattr(base, "layers", None)
        if base is None or layers is None or not all(hasattr(base, a) for a in ("embed_tokens", "rotary_emb", "norm")):
            raise UserInputError(
                f"unsupported model {type(model).__name__}: expected a decoder-only model with "
                "model.embed_tokens, model.layers, model.rotary_emb and model.norm (Llama, Qwen2, Qwen3, Mistral, "
                "Gemma-3 and the families built like them)")
        if other := sorted(set(getattr(model.config, "layer_types", None) or ()) - ATTENTION_LAYERS):
            raise UserInputError(f"unsupported model {type(model).__name__}: its layers of type {', '.join(other)} "
                                 "are not attention layers the truncated passes can run (hybrid models)")
        if getattr(model.config, "_attn_implementation", "sdpa") not in ("sdpa", "flash_attention_2",
                                                                         "flash_attention_3"):
            model.set_attn_implementation("sdpa")  # eager attention without a mask would not be causal
        self.base = base
        self.layers = layers
        self.config = model.config
        self.num_layers = len(layers)
        self.layer_types = getattr(self.config, "layer_types", None)
        self._rotary_takes_type = "layer_type" in inspect.signature(base.rotary_emb.forward).parameters
        # Gemma scales looked-up rows by sqrt(hidden) in the table's dtype; inputs_embeds paths must do the same.
        scale = getattr(base.embed_tokens, "embed_scale", None)
        self.embed_scale = None if scale is None else float(torch.as_tensor(scale).to(self.embed_weight.dtype))
        sliding = getattr(self.config, "sliding_window", None)  # every layer's where no layer_types say (Mistral)
        windowed = ("sliding_attention" in self.layer_types if self.layer_types
                    else getattr(self.config, "use_sliding_window", True))
        self.max_len = sliding if sliding and windowed else None
        self.packs = Packs(layers)  # the layers' fast path: packed linears, fused kernels (packed.py)
        self.attention_kernels = True  # packed passes' attention: flash / C++ kernels where they run, else dense

    def use_references(self) -> None:
        """Run the PyTorch references only (--backend torch): the Hugging Face layers as they are, and the dense
        attention in packed passes."""
        self.packs.enabled = False
        self.attention_kernels = False

    def check_forward(self, where: str) -> None:
        """Refuse a model whose own forward the truncated passes do not reproduce (a multiplier or logit scale its
        family's forward applies outside the layers, say): a short sequence through both, at the first and last
        layer and the logits, within FORWARD_TOLERANCE. The passes run the model's own layer modules here (the fast
        kernels off: tests compare those), so the check reads what the model computes around its layers."""
        vocab = self.embed_weight.shape[0]
        ids = torch.arange(5, 5 + 8 * 7, 7, device=self.embed_weight.device).remainder(vocab).unsqueeze(0)
        enabled, self.packs.enabled = self.packs.enabled, False
        try:
            with torch.no_grad(), observed.unrecorded():  # the report says what the job ran, not this check
                ref = self.model(ids, output_hidden_states=True)
                ours = self.hidden_states(self.embed(ids), [1, self.num_layers])
                pairs = {"layer 1": (ours[1], ref.hidden_states[1]),
                         f"layer {self.num_layers}": (ours[self.num_layers], ref.hidden_states[-1]),
                         "the logits": (self.logits(ours[self.num_layers]), ref.logits)}
        finally:
            self.packs.enabled = enabled
        for name, (a, b) in pairs.items():
            a, b = a.float(), b.float()
            err = float((a - b).norm() / b.norm().clamp_min(1e-12))
            if not err <= FORWARD_TOLERANCE:
                raise UserInputError(f"{where}: unsupported model {type(self.model).__name__}: its own forward and "
                                     f"the truncated passes differ at {name} (relative error {err:.3g}); its "
                                     "family computes something the passes do not (an embedding multiplier or "
                                     "logit scale, say)")

    @property
    def embed_weight(self) -> torch.Tensor:
        return self.base.embed_tokens.weight

    @property
    def hidden_size(self) -> int:
        return self.embed_weight.shape[1]

    def resolve_layer(self, layer: int, flag: str = "--target-layer") -> int:
        """Map a user layer index (1..L, or negative from the end) to 1..L; 0 (the embeddings) is refused, naming
        the option `flag` that gave it."""
        resolved = layer + self.num_layers + 1 if layer < 0 else layer
        if not 1 <= resolved <= self.num_layers:
            raise UserInputError(f"{flag} {layer} is outside 1..{self.num_layers} (or -1..-{self.num_layers})")
        return resolved

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Look up original rows exactly as the model does (including Gemma's embed_scale)."""
        return self.base.embed_tokens(ids)

    def _position_embeddings(self, h: torch.Tensor, position_ids: torch.Tensor) -> list:
        rotary = self.base.rotary_emb
        if not self._rotary_takes_type:
            shared = rotary(h, position_ids)
            return [shared] * self.num_layers
        per_type = {t: rotary(h, position_ids, t) for t in set(self.layer_types)}
        return [per_type[t] for t in self.layer_types]

    def hidden_states(self, h: torch.Tensor, layers: list[int] | tuple[int, ...],
                      position_ids: torch.Tensor | None = None,
                      attend: Attend | None = None, start: int = 0) -> dict[int, torch.Tensor]:
        """Run decoder layers on embeddings h [B, T, D] up to max(layers) and return {l: hidden_states[l]}.
        Without `attend`: right-padded rows, causal attention without a mask (right padding never leaks into real
        tokens). With it: the layout and attention it describes (prefix sharing, packed rows; see attention.py).
        `start`: h are the states after that many layers (hidden_states[start]), and the pass runs on from there."""
        B, T, _ = h.shape
        longest = T if attend is None else attend.spec.max_len
        if self.max_len is not None and longest > self.max_len:
            raise UserInputError(f"sequences of {longest} tokens exceed the sliding window ({self.max_len})")
        if position_ids is None:
            position_ids = torch.arange(T, device=h.device).unsqueeze(0)
        wanted = sorted(set(layers))
        pos = self._position_embeddings(h, position_ids)
        if attend is not None and not self.attention_kernels:
            attend = dataclasses.replace(attend, kernels=False)
        extra = {} if attend is None else {attention.KWARG: attend}
        out: dict[int, torch.Tensor] = {}
        with _attention_backend(h), self._implementation(attend is not None), self.packs.active(wanted[-1]):
            for i in range(start, wanted[-1]):
                h = self.layers[i](h, attention_mask=None, position_ids=position_ids, position_embeddings=pos[i],
                                   **extra)
                h = h[0] if isinstance(h, tuple) else h  # older releases' layers return tuples
                if i + 1 in wanted:
                    out[i + 1] = self.base.norm(h) if i + 1 == self.num_layers else h
        return out

    @contextmanager
    def _implementation(self, ours: bool):
        """Select the registered `tokdistill` attention for one call only, so the model is left as it was found."""
        if not ours:
            yield
            return
        before = self.config._attn_implementation
        self.config._attn_implementation = attention.register()
        try:
            yield
        finally:
            self.config._attn_implementation = before

    def logits(self, h_last: torch.Tensor) -> torch.Tensor:
        """LM head on final-normed states (only for losses that need logits)."""
        logits = self.model.get_output_embeddings()(h_last)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


@contextmanager
def left_as_given(model):
    """Leave an in-memory model's modes and requires_grad flags as the caller had them when the run ends:
    compute_copy freezes the caller's model in place where it needs no copy (a tokenizer-swap tool that goes on to
    fine-tune it would find no parameter trainable). Anything else passes through."""
    if not isinstance(model, nn.Module):
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


def compute_copy(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The frozen model to compute with: the caller's model itself when it already has the device and dtype (then
    it is put in eval mode with requires_grad off, in place: frozen weights spare the backward its weight
    gradients), else a converted copy, so the caller's weights are never cast or moved."""
    p = next(model.parameters())
    if p.device != device or p.dtype != dtype:
        import copy

        model = copy.deepcopy(model).to(device=device, dtype=dtype)
    return model.eval().requires_grad_(False)
