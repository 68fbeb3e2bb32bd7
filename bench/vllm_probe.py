"""Run inside a venv with vLLM (bench/downstream.py makes one): tokenize texts with vLLM's own tokenizer loader and
stream their ids back through vLLM's incremental detokenizer, as a serving engine would.

usage: python vllm_probe.py MODEL_DIR TEXTS_JSON OUT_JSON
Writes {"ids": [[...]], "detok": {setting: [text, ...]}}: "default" is SamplingParams(); "raw" keeps special
tokens without spaces between added tokens (the one path where vLLM treats added tokens apart).
"""

import json
import sys
from types import SimpleNamespace

from vllm.sampling_params import SamplingParams
from vllm.tokenizers import get_tokenizer
from vllm.v1.engine.detokenizer import IncrementalDetokenizer


def main() -> None:
    model, texts_file, out_file = sys.argv[1:4]
    texts = json.loads(open(texts_file, encoding="utf-8").read())
    tok = get_tokenizer(model)
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    settings = {"default": SamplingParams(),
                "raw": SamplingParams(skip_special_tokens=False, spaces_between_special_tokens=False)}
    detok = {}
    for name, params in settings.items():
        detok[name] = []
        for i, seq in enumerate(ids):
            request = SimpleNamespace(request_id=str(i), prompt_token_ids=[], sampling_params=params)
            d = IncrementalDetokenizer.from_new_request(tok, request)
            d.update(seq, stop_terminated=False)
            detok[name].append(d.get_next_output_text(finished=True, delta=False))
    with open(out_file, "w", encoding="utf-8") as f:
        json.dump({"ids": ids, "detok": detok, "tokenizer": type(tok).__name__}, f)


if __name__ == "__main__":
    main()
