"""Every knob of a distillation run, its default and why, and the device and dtype `auto` picks (torch loads only
when one is asked for: the command line sets up the process first). Environment variables are read here only."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import operator
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

METHODS = (
    "token-distill",  # MSE between student and teacher hidden states at the target layer (the paper's method)
    "mean",  # subtoken mean, no training (FVT)
    "random",  # per-channel mean/std of the original table, no training
    "ntp",  # next-token prediction on the new rows only
    "ntp-all",  # next-token prediction on the new input and (untied) output rows; original rows stay bit-identical
    "token-distill+ntp",  # distillation loss + NTP loss
    "token-distill+alpha-ntp",  # distillation loss + alpha * NTP, alpha = stop_grad(L_distill / L_ntp)
    # tied models: + alpha * NTP read at the teacher's cached final states, whose only gradient is the one NTP gives
    # the new rows as output rows: the probability they take from the original vocabulary (objective.py)
    "token-distill+alpha-mass",
)
TRAINED_METHODS = tuple(m for m in METHODS if m not in ("mean", "random"))
LR_SCHEDULES = ("cooldown", "constant", "decay")  # after the warm-up (student/loop.py)
DTYPES = ("auto", "float32", "bfloat16", "float16")
OPTIMIZERS = ("auto", "whitened", "adamw")  # student/whitened.py; adamw: the paper's plain AdamW
LOSSES = ("mse", "kl", "logits-mse")
CONTEXT_SOURCES = ("retrieve", "generate")
TOP_UPS = ("continue", "word")
OUTPUT_POLICIES = ("auto", "zeros", "mean", "ntp")
TOKENIZER_MODES = ("auto", "vocab", "added")


class UserInputError(ValueError):
    """Bad input from the user: reported as one clear line and exit status 2, never a traceback."""


class GuaranteeError(RuntimeError):
    """An output breaks a guarantee `tokdistill check` verifies; the message names the check and the token.
    Exit status 1."""


def env_flag(name: str) -> bool:
    """True when the environment variable is set to 1 (this and env_int are the package's env-var readers)."""
    return os.environ.get(name, "") == "1"

# A token whose final loss at its own position (distill) or held-out KL (eval) is this many times the median is
# flagged as an outlier:
# before snippets started with a document-start token, words at the start of a snippet sat on the attention sink
# and ended training at 300-2,400x the other words' loss. distill trains such a row again alone
# (retrain.retry_outliers): a row can still become a sink of its own mid-run (13,846x with --epochs 8).
OUTLIER_FACTOR = 10.0
# `tokdistill eval` flags a word after which the adapted model puts more than this share of its next-token
# probability on new tokens (held-out text), and `tokdistill distill` the same on its training snippets: the original
# model puts none there, and sampling emits the word again ("apt-get apt-get ...") or another word whose row draws
# mass after many. 0-8 of 40 words per corpus were above it with plain AdamW, 0-4 with whitened Adam (the
# default), none with subtoken-mean rows (docs/defaults.md).
OVER_PREDICTION_FLAG = 0.2
# A tied model whose distilled rows make it put more than this share on new tokens right after some trained word
# (training snippets) -- a new token more often than not -- trains token-distill+alpha-ntp after all, where the
# search's sample did not show it (pipeline.distill_words): the defaults' rows on Gemma-3 / the Python Library Reference
# reached 0.93. Not lower: SmolLM2 / FOLDOC's fp32 rows reached 0.21, and after alpha-NTP (3.5x the training) two
# words were still over 0.2 (docs/defaults.md, "A hub the search did not see").
HUB_AFTER_RUN = 0.5
# Rows that train alone after the words' run (the hardest quarter, start-of-text variants) never see the states
# after the other words, and the more epochs can train a row until the model predicts it, so a tied row's output
# side can turn into a hub: on Gemma-3 / Exim's specification the trained variant "Exim’s" took 0.18 of the
# next-token probability after " Exim" (0.68 after "When a message arrives, Exim"; a few hundredths with its moved
# row), under OVER_PREDICTION_FLAG. While such rows raise some word's mass (training snippets) by more than this
# over their rows from before, the row taking most of the rise goes back (hubs.send_back; docs/defaults.md, "A
# variant may not make a word predict it"; after the more epochs only once their rows pass HUB_AFTER_RUN).
MASS_RISE = 0.05
# The share of trained words (those with the highest word loss) that --hardest-epochs trains on, and the warm-up of
# that continuation (its Adam moments start afresh from rows already trained).
HARDEST_FRACTION = 0.25
HARDEST_WARMUP = 0.25
# --left-context auto: LEFT_CONTEXT tokens before the word, or as many as hold LEFT_CONTEXT_CHARS characters of the
# corpus's text where that is more (rounded; English reads at 3.2-4.8 a token), at most LEFT_CONTEXT_MAX: in a script
# the tokenizer reads a byte or two at a time, 8 tokens are a word or less (docs/defaults.md, "A left context in
# characters").
LEFT_CONTEXT = 8
LEFT_CONTEXT_CHARS = 26
LEFT_CONTEXT_MAX = 24
# --loss-positions auto: for words, and for a --tokenizer run's own ids.
LOSS_POSITIONS = 4
TOKENIZER_LOSS_POSITIONS = 8
# --more-epochs and --hardest-epochs auto where the model runs in bf16.
MORE_EPOCHS = 4
# --more-epochs auto also keeps a run's epochs times its target layer within this (8 epochs at layer 16): a pass
# costs in proportion to the layers it runs, and at a deeper layer the search chose depth over passes (SmolLM2's
# layer 22 trains 1 more epoch, not 4; Gemma-3's layer 14 all 4; docs/defaults.md, "More epochs within a budget
# of layers").
MORE_LAYER_EPOCHS = 128
HARDEST_EPOCHS = 4
VARIANT_EPOCHS = 4
# A variant trains on at most this share of --snippets-per-token snippets of its own, so that the variants' stage
# costs at most about an eighth of the words' training (GCIDE's citation names, "--Dryden.", are bare everywhere).
VARIANT_SHARE = 0.25

@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun launch (RANK, LOCAL_RANK, WORLD_SIZE); one process without torchrun."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1


def launch() -> Launch:
    """The torchrun environment of this process (distributed.py initializes the process group from it)."""
    env = os.environ
    return Launch(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))


@functools.cache
def compiled(name: str) -> tuple[ModuleType | None, str]:
    """The package's compiled extension `name` (setup.py builds it from csrc/) and, where it is missing, why: "not
    built", or built but not loadable here (another ABI, a cut file), with the loader's reason. Imported once."""
    try:
        return importlib.import_module(f"tokdistill_fast.{name}"), ""
    except ModuleNotFoundError:
        return None, "not built"
    except ImportError as e:
        return None, f"built but cannot be loaded ({e})"


_bars_off = False  # set by silence_progress_bars(); progress() reads it at each bar
_hub_bars_env: str | None = None  # HF_HUB_DISABLE_PROGRESS_BARS as it was before the bars went off


def silence_progress_bars(silent: bool = True) -> None:
    """Turn this process's progress bars off (or back on with `silent=False`): `--quiet`, and ranks other than 0 of
    a torchrun launch (one terminal shows one set of bars). Works whenever it is called, unlike TQDM_DISABLE, which
    tqdm reads once on import; the bars of transformers (loading and writing weights) follow."""
    global _bars_off, _hub_bars_env
    if silent and not _bars_off:
        _hub_bars_env = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when transformers is first imported
    elif not silent and _bars_off:  # as the user had it
        os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        if _hub_bars_env is not None:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = _hub_bars_env
    _bars_off = silent
    user_off = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").lower() in ("1", "true", "yes", "on")
    if "transformers" in sys.modules and (silent or not user_off):  # bars the user had off stay off
        hf_logging = sys.modules["transformers"].utils.logging
        (hf_logging.disable_progress_bar if silent else hf_logging.enable_progress_bar)()


def progress(iterable: Any = None, **kwargs: Any) -> Any:
    """A tqdm bar, off after silence_progress_bars() (TQDM_* variables still apply where it is on)."""
    from tqdm.auto import tqdm

    if _bars_off:
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)


def not_a_file(path: Path) -> str:
    """Why `path` cannot be read as a file, for error messages. A pipe is refused too: inputs are read more than
    once (a corpus by the search, retrieval and top-up)."""
    return ("no such file" if not path.exists() else "is a directory; give a file" if path.is_dir()
            else "is not a regular file (a pipe or a device); give a file")


def env_int(name: str) -> int | None:
    """The environment variable as an integer, None when unset or empty."""
    value = os.environ.get(name, "")
    return int(value) if value else None


def cache_dir() -> Path:
    """Where converted demo models and corpora are cached: $TOKDISTILL_CACHE or ~/.cache/tokdistill_fast."""
    return Path(os.environ.get("TOKDISTILL_CACHE", Path.home() / ".cache" / "tokdistill_fast"))


def pick_device(name: str = "auto") -> torch.device:
    """`auto` is CUDA when present, else CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserInputError(f"--device {name!r} is not a device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda asked for, but no CUDA device is visible")
    return device


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls run ~6x faster than fp32 there (2.0 vs 0.33 TFLOP/s on 2 SPR cores)."""
    import torch

    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` runs the frozen model in bf16 on CUDA and on bf16-capable CPUs, else in fp32."""
    import torch

    if name not in DTYPES:
        raise UserInputError(f"--dtype must be one of {', '.join(DTYPES)}, not {name!r}")
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()):
        return torch.bfloat16
    return torch.float32


def _whole(name: str, value, least: int | None, words: tuple = ()) -> None:
    """A whole-number option (an int, not a bool, float or string) of at least `least`, or a user error naming it
    and the `words` it takes besides (None: the command line's centred or all)."""
    try:
        ok = not isinstance(value, bool) and operator.index(value) >= (-math.inf if least is None else least)
    except TypeError:
        ok = False
    if not ok:
        spoken = {"loss_positions": "all", "left_context": "centred"}
        others = "".join(f" or {spoken[name] if w is None else w}" for w in words if w is not None or name in spoken)
        bound = "a whole number" if least is None else f"{least} or more (a whole number)"
        raise UserInputError(f"--{name.replace('_', '-')} must be {bound}{others}, not {value!r}")


@dataclass
class DistillConfig:
    """Settings of one run. Defaults follow the paper unless our measurements (docs/) say otherwise."""

    method: str = "token-distill"
    # Tied models: train token-distill+alpha-mass instead where the job has 100+ words or trains more epochs
    # (control/settings.from_start), or the layer search (with the layer and epochs fixed, that one setting on its
    # sample) or the run's own rows show the token-distill rows make the model predict new tokens right after
    # reading one (control/settings.guarded_method).
    ntp_guard: bool = True
    loss: str = "mse"
    # "auto" searches candidate layers on held-out snippets (autotune.py); an int is a layer index in
    # hidden_states terms: 1..num_layers, negative counts from the end, -1 = last layer after the final norm.
    target_layer: int | str = "auto"
    lr: float | str = "auto"  # "auto": the measured rule autotune.default_lr (by layer and schedule)
    # After the warm-up: cooldown (constant, then linearly down over the run's last fifth: student/loop.py COOLDOWN),
    # constant (the schedule the paper states) or decay (linearly to zero at the last step, from 1.4x the constant
    # rate: the same held-out KL as constant within noise on 12 corpus rows of two models). docs/defaults.md.
    lr_schedule: str = "cooldown"
    # whitened: Adam in the embedding table's whitened coordinates (student/whitened.py), steps with the table's
    # own spread in every direction; adamw: the paper's plain AdamW; auto: whitened for the hidden-state MSE of the
    # token-distill methods, where it was measured, adamw otherwise (docs/defaults.md, "Steps shaped like the table").
    optimizer: str = "auto"
    # Four epochs (the paper: one) over short left contexts and a 4-position loss (below): more steps over the same
    # snippets at about the position-passes of two epochs over 8 positions, lower held-out KL on both models
    # (docs/defaults.md); "auto" lets the search try the chosen setting with 1 and 2 epochs.
    epochs: int | str = 4
    # Then the HARDEST_FRACTION of the trained words whose own-position loss is highest train this many more epochs
    # alone, from their rows (0: none): the words still furthest from their teacher gain most from more passes
    # (docs/defaults.md, "More passes for the hardest quarter"). auto: HARDEST_EPOCHS where the model runs in bf16,
    # none in fp32 on a CPU, as for --more-epochs (there they took a fifth of the 40-word job's time, which must stay
    # within half the plain prototype's: docs/defaults.md, "Extra passes only where a pass is cheap").
    hardest_epochs: int | str = "auto"
    # Then each variant (the start-of-text form, "word" after "(", ":" or a newline; casing variants) with corpus
    # hits of its own trains this many epochs alone on them, from its word's trained row moved by the subtoken-mean
    # offset (0: it keeps that row). auto: VARIANT_EPOCHS where the model runs in bf16, none in fp32 on a CPU
    # (docs/defaults.md, "Start-of-text variants trained on their own text").
    variant_epochs: int | str = "auto"
    # Every word then trains this many more epochs in the same run, at the constant rate after --epochs' schedule;
    # where the rows then make a tied model put over HUB_AFTER_RUN of its next-token probability on new tokens after
    # some word, the rows that raised it (send_back's rule) go back to theirs after the first --epochs
    # (docs/defaults.md, "Four more passes in the same run", "A word that predicts itself sends back its own row").
    # auto: MORE_EPOCHS where the model runs in bf16 (GPUs, bf16 CPUs), none in fp32 on a CPU, where a pass costs
    # 2-4x as much (docs/cpu-speed.md) and the job already takes about half the plain prototype's time; and no more
    # than keep epochs x target layer within MORE_LAYER_EPOCHS. Not with
    # --lr-schedule decay (the rate is zero by then), NTP objectives or several processes. A guarded tied model that
    # trains them trains token-distill+alpha-mass from the start (control/settings.py, `from_start`).
    more_epochs: int | str = "auto"
    batch_size: int = 16  # the paper's batch size
    snippets_per_token: int = 25  # the paper's budget: at most 25 snippets ...
    snippet_length: int = 50  # ... of at most 50 tokens per new token
    # Train on the first positions from the new token on (the paper: all; snippets end there, since later ones
    # cannot change them). auto: 4 for words, 8 with --tokenizer; None: every aligned position.
    loss_positions: int | str | None = "auto"
    # Tokens kept before the word in training snippets (None: the word centred in its window). Only positions from
    # the word on carry a loss, so the ~24 a centred window puts before it were paid for by every pass. auto:
    # LEFT_CONTEXT, more where the tokenizer reads the corpus at few characters a token (contexts.left_context).
    left_context: int | str | None = "auto"
    contexts: str = "retrieve"  # tokens without corpus hits fall back to generated contexts
    # Tokens with fewer corpus snippets than snippets_per_token: continue = the model samples new text after the
    # word in their own snippets, up to the budget (tokens without any: generated from the word); word = only
    # tokens with fewer than a quarter of the budget, topped up from the word alone (the paper's prompt).
    top_up: str = "continue"
    # Retrieval reads the whole corpus by default, so each token's snippets are a uniform sample of all its
    # occurrences. Either option ends the pass early (faster on big corpora) but samples only the part read.
    stop_when_full: bool = False  # stop once every token has snippets_per_token hits
    max_corpus_bytes: int | None = None  # read at most this many corpus bytes
    # Tokenizer swaps: take the new tokens from a target tokenizer, start from another method's rows, and give
    # short tokens (which distillation handles poorly) the subtoken mean (or their --init-from row) instead.
    new_tokens_from_tokenizer: str | None = None  # directory of the target tokenizer
    # Bring your own tokenizer (target_tokenizer.py): rows for the new ids of this extended tokenizer, kept as given;
    # new ids are those at or above the original tokenizer's size plus the ids listed in the new_ids file.
    target_tokenizer: str | None = None
    new_ids: str | None = None
    init_from: str | None = None  # safetensors file of start rows keyed by form (see swap.py)
    distill_min_chars: int = 0  # words with fewer characters are not trained; 0 trains all
    output_embeddings: str = "auto"  # untied models: zeros | mean | ntp; "auto" = mean. Tied models share rows.
    # added: AddedTokens, which transformers, vLLM and llama.cpp all honour; vocab / auto (vocab where the family
    # allows it): exact outside new words, but transformers-only (extend.py, docs/vocabulary-extension.md)
    tokenizer_mode: str = "added"
    add_variants: bool = True  # also add the start-of-text form ("word" without a leading space) as a token
    casing_variants: bool = False  # also add lower-case and capitalized forms of each word (rows copied)
    pad_to_multiple_of: int | None = None  # round a grown embedding matrix up to a multiple of this (64, 128)
    device: str = "auto"  # cuda if available, else cpu
    dtype: str = "auto"  # bf16 on CUDA and on CPUs with AMX/AVX512-BF16 (6x faster matmuls), else fp32
    seed: int = 0
    # torch: the references throughout (also the Hugging Face decoder layers, no fused layer kernels) | triton (the
    # embedding and loss kernels, CUDA or TRITON_INTERPRET=1) | auto (those kernels where they run)
    backend: str = "auto"
    # Student steps from the first new token on, attending to the prefix's keys/values (exact under causal
    # attention): on = the keys/values the teacher pass kept (when they fit in teacher.prefix_kv_budget), else a
    # no-grad prefix pass per step; fused = the teacher runs inside each step and lends its keys/values (epochs 1);
    # off = whole sequences (the reference); auto = fused at epochs 1, else on, off with backend torch.
    prefix_sharing: str = "auto"
    align_impl: str = "auto"  # cpp (pybind11 extension) | python (the spec)
    autotune_budget: float = 0.2  # share of the main run's time the layer/lr search may spend
    warmup_fraction: float = 0.5  # linear warm-up over the first half of the steps (the paper), then lr_schedule
    max_norm_quantile: float = 0.99  # tied models: clip new rows to this quantile of the vocabulary's norms
    overwrite: bool = False
    generate_temperature: float = 1.0  # sampling for generated contexts (the paper samples)
    log_every: int = 20
    # Large vocabularies: train the tokens in chunks, each with its own teacher cache (chunks.py); chunk_tokens
    # fixes the size, memory_budget (bytes of teacher cache) derives it. Neither: one chunk, all tokens.
    chunk_tokens: int | None = None
    memory_budget: int | None = None
    # Resumable runs (checkpoint.py): state kept in checkpoint_dir (default <out>.partial) every this many steps
    # (0: no checkpoints), and resume continues an interrupted run from there.
    checkpoint_every: int = 200
    checkpoint_dir: str | None = None
    resume: bool = False
    extra: dict = field(default_factory=dict)  # free-form notes copied into report.json

    def validate(self) -> DistillConfig:
        """Reject impossible values with a message that names the option."""
        choices = {"method": METHODS, "loss": LOSSES, "contexts": CONTEXT_SOURCES, "top_up": TOP_UPS,
                   "lr_schedule": LR_SCHEDULES, "optimizer": OPTIMIZERS, "output_embeddings": OUTPUT_POLICIES,
                   "tokenizer_mode": TOKENIZER_MODES,
                   "backend": ("auto", "torch", "triton"), "align_impl": ("auto", "cpp", "python"),
                   "prefix_sharing": ("auto", "off", "on", "fused"),
                   "dtype": DTYPES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserInputError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                     f"not {getattr(self, name)!r}")
        for name, least in (("batch_size", 1), ("snippets_per_token", 1), ("snippet_length", 4), ("seed", 0),
                            ("checkpoint_every", 0), ("distill_min_chars", 0), ("log_every", 0)):
            _whole(name, getattr(self, name), least)
        for name, least, words in (("epochs", 1, ("auto",)), ("hardest_epochs", 0, ("auto",)),
                                   ("more_epochs", 0, ("auto",)), ("variant_epochs", 0, ("auto",)),
                                   ("loss_positions", 1, (None, "auto")), ("left_context", 0, (None, "auto")),
                                   ("pad_to_multiple_of", 1, (None,)), ("chunk_tokens", 1, (None,)),
                                   ("target_layer", None, ("auto",))):
            if getattr(self, name) not in words:
                _whole(name, getattr(self, name), least, words)
        for name, value in (("lr", self.lr), ("generate_temperature", self.generate_temperature)):
            if value != "auto" and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                        and 0 < value < math.inf):
                raise UserInputError(f"--{name.replace('_', '-')} must be a positive number"
                                     f"{' or auto' if name == 'lr' else ''}, not {value!r}")
        if self.max_corpus_bytes is not None and self.max_corpus_bytes < 1:
            raise UserInputError("--max-corpus-bytes must be positive")
        if self.new_ids is not None and self.target_tokenizer is None:
            raise UserInputError("--new-ids needs --tokenizer (the ids are ids of that tokenizer)")
        if self.method == "ntp-all" and self.output_embeddings in ("zeros", "mean"):
            raise UserInputError(f"--method ntp-all learns the new output rows; --output-embeddings "
                                 f"{self.output_embeddings} would throw them away (leave it at auto or ntp)")
        if self.loss != "mse" and self.distill_loss is None:
            raise UserInputError(f"--loss {self.loss} is a distillation loss: --method {self.method} has none (the "
                                 "token-distill methods take it)")
        if self.init_from is not None and self.method == "random":
            raise UserInputError("--init-from has no effect with --method random")
        if self.memory_budget is not None and self.memory_budget < 1:
            raise UserInputError("--memory-budget must be positive")
        if self.chunk_tokens is not None and self.memory_budget is not None:
            raise UserInputError("give --chunk-tokens or --memory-budget, not both")
        for name in ("warmup_fraction", "autotune_budget", "max_norm_quantile"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserInputError(f"--{name.replace('_', '-')} must be between 0 and 1")
        return self

    @property
    def distill_loss(self) -> str | None:
        """The distillation loss this config trains (--loss), None for a method without one."""
        return self.loss if self.method.startswith("token-distill") else None

    def check_tied(self, tied: bool) -> None:
        """Refuse, once the model is loaded, the settings of its other kind: --output-embeddings on a tied model
        (its new output rows are the input rows learned) and alpha-mass on an untied one."""
        if tied and self.output_embeddings != "auto":
            raise UserInputError(f"--output-embeddings {self.output_embeddings}: the model ties its output rows to "
                                 "its input rows, so the new output rows are the learned input rows (untied models "
                                 "only; leave it at auto)")
        if not tied and self.method == "token-distill+alpha-mass":
            raise UserInputError("token-distill+alpha-mass trains the new rows' output side, which only a tied model "
                                 "reads from them (untied: --output-embeddings)")

    def run_more_epochs(self, layer: int | None = None) -> int:
        """The --more-epochs this config trains (in one process): none after a decaying rate, which is zero by then,
        or with NTP objectives, whose rows the hub check is not about; auto: by the device and dtype it runs in and,
        given the target `layer`, no more than keep epochs x layer within MORE_LAYER_EPOCHS."""
        if self.lr_schedule == "decay" or "ntp" in self.method:
            return 0
        more = self._where_cheap(self.more_epochs, MORE_EPOCHS)
        if self.more_epochs == "auto" and layer is not None and isinstance(self.epochs, int):
            more = min(more, max(0, MORE_LAYER_EPOCHS // layer - self.epochs))
        return more

    def run_hardest_epochs(self) -> int:
        """The --hardest-epochs this config trains (in one process, distillation without NTP); auto: by the device
        and dtype it runs in."""
        return self._where_cheap(self.hardest_epochs, HARDEST_EPOCHS)

    def run_variant_epochs(self) -> int:
        """The --variant-epochs this config trains (in one process, distillation without NTP); auto: by the device
        and dtype it runs in."""
        return self._where_cheap(self.variant_epochs, VARIANT_EPOCHS) if self.add_variants else 0

    def _where_cheap(self, value: int | str, default: int) -> int:
        """An extra-pass count as given, or for "auto" `default` where the model runs in bf16 (GPUs, bf16 CPUs) and
        0 in fp32 on a CPU, where a pass costs 2-4x as much."""
        if value != "auto":
            return int(value)
        device = pick_device(self.device)
        half = pick_dtype(self.dtype, device).itemsize == 2
        return default if device.type != "cpu" or half else 0

    def run_optimizer(self, target_tokenizer: bool = False) -> str:
        """--optimizer as the run uses it: auto resolves to whitened for token-distill methods with the MSE loss,
        else (and for `--tokenizer` runs, where every figure of docs/bring-your-own-tokenizer.md was measured with
        it) to the paper's AdamW."""
        if self.optimizer != "auto":
            return self.optimizer
        whitened = self.method.startswith("token-distill") and self.loss == "mse" and not target_tokenizer
        return "whitened" if whitened else "adamw"

    def run_loss_positions(self, target_tokenizer: bool = False) -> int | None:
        """--loss-positions as the run uses it: auto trains 4 positions from a word on (docs/defaults.md, "Four
        passes over four positions") and 8 from a `--tokenizer` run's own id on, where 4 left 0.54 of the bits-per-
        character gap on FOLDOC against 0.32 (docs/bring-your-own-tokenizer.md)."""
        if self.loss_positions != "auto":
            return self.loss_positions
        return TOKENIZER_LOSS_POSITIONS if target_tokenizer else LOSS_POSITIONS

    def replace(self, **changes) -> DistillConfig:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
