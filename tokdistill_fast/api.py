"""distill(): the library's entry for one run, for new words (pipeline.py) or for the new ids of a given tokenizer
(target_tokenizer.py)."""

from __future__ import annotations

from pathlib import Path

from . import pipeline
from .config import DistillConfig, UserInputError
from .control import checkpoint, distributed, observed
from .modeling.models import left_as_given
from .results import DistillResult
from .target_tokenizer import distill_target


def distill(model, new_tokens=None, corpus=(), out: str | Path | None = None, config: DistillConfig | None = None,
            tokenizer=None, target_tokenizer=None) -> DistillResult:
    """Add `new_tokens` to the model's tokenizer and learn their input embeddings.

    model: a model directory (with its own tokenizer unless `tokenizer` is given), or an in-memory causal LM (then
    pass `tokenizer`). new_tokens: a word-list file (one per line, .jsonl or .json: tokens.read_word_list), or a
    list of strings (or None with config.new_tokens_from_tokenizer). corpus: text, JSONL or Parquet files,
    directories or globs. out: if given, the extended model is written there (save_pretrained layout plus
    new_embeddings.safetensors and report.json), and the run keeps checkpoints to resume from (checkpoint.py;
    SIGINT/SIGTERM then stop at a step boundary). Under torchrun, the processes share the training
    (distributed.py) and rank 0 writes `out`. target_tokenizer (or config.target_tokenizer): learn rows for the new
    ids of this given tokenizer instead of adding tokens (target_tokenizer.py; new_tokens must be None).
    """
    if config is not None and not isinstance(config, DistillConfig):
        raise TypeError(f"config must be a DistillConfig, not {type(config).__name__}: DistillConfig(**options)")
    cfg = (config or DistillConfig()).validate()
    corpus = [corpus] if isinstance(corpus, (str, Path)) else list(corpus)  # one path, not its characters
    target = target_tokenizer or cfg.target_tokenizer
    if target is not None and new_tokens is not None:
        raise UserInputError("give new_tokens or a target tokenizer, not both: a target tokenizer's new ids are the "
                             "tokens")
    if target is None and isinstance(new_tokens, str) and not Path(new_tokens).exists():
        raise UserInputError(f"new_tokens {new_tokens!r}: no such file; pass the words as a list ([{new_tokens!r}]) "
                             "or the path of a word-list file")
    if target is not None:
        with observed.recording(), checkpoint.holding_locks(), left_as_given(model):
            return distill_target(model, target, corpus, out, cfg, tokenizer)
    with distributed.setup(cfg.device) as ranks, observed.recording(), left_as_given(model):
        with checkpoint.stop_on_signals(active=out is not None and ranks.world == 1), checkpoint.holding_locks():
            return pipeline.distill_words(model, new_tokens, corpus, out, cfg, tokenizer, ranks)
