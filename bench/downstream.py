"""`make test-downstream`: do the new tokens survive the runtimes users deploy? Writes a fresh output of each
tokenizer mode (SmolLM2-135M-Instruct, subtoken-mean rows: the tokenizer side is what is tested), then compares
token ids with transformers 5 on a fixed sentence set and a gcide.heldout.txt sample in:
  llama.cpp    convert_hf_to_gguf.py + libllama's llama_tokenize (tokdistill_fast.tools.runtimes builds both, cached)
  transformers 4.57, the converter's own pin (its venv): AutoTokenizer loads the output as written
  vLLM         its get_tokenizer and incremental detokenizer (bench/vllm_probe.py in a venv of its own)
Gemma-3-270M too when cached (`python -m tokdistill_fast.tools.demo prepare --gemma`: llama.cpp's SentencePiece path),
and runs a PEFT check (trainable_token_indices from new_embeddings.safetensors, tied and untied). One table.
Slow (the first run builds libllama: ~55 min wall on 2 shared, busy cores): not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from tokdistill_fast import cli
from tokdistill_fast.check import new_tokens_of
from tokdistill_fast.config import cache_dir
from tokdistill_fast.tools import runtimes

# Words SmolLM2 splits, from the license texts and NOTES.md, plus a multi-word expression (an added token
# in every mode: no pre-tokenizer keeps it whole), and frequent gcide words (`tokdistill select`) so that the
# corpus sample has paragraphs with new words, among them ones with an apostrophe, a hyphen or inside longer words;
# and words with Latin-1 letters, whose start-of-text forms SmolLM2's byte-level decoder cannot give back as added
# tokens (extend.extend_decodable leaves those forms out).
WORDS = ["sublicense", "licensor", "copyleft", "licensable", "palatable", "thyroidectomy", "indemnify",
         "spill the beans", "warrantor", "noninfringement", "Dryden", "one's", "Pertaining", "Naut", "contrivance",
         "fresh-water", "figuratively", "designating", "naïve", "Zürich", "Straße"]
VLLM = "vllm==0.33.0"  # the version checked; its wheel holds CUDA kernels but its tokenizer code runs on CPU
# vLLM imports these at module level of its tokenizer and detokenizer code (found by importing them, --no-deps).
VLLM_IMPORTS = ["transformers>=5.16.1,<5.21.0", "msgspec", "cbor2", "psutil", "pyzmq", "urllib3", "aiohttp",
                "requests", "openai-harmony", "openai", "pillow", "pybase64", "cachetools", "prometheus-client",
                "cloudpickle", "uvloop", "py-cpuinfo", "pyyaml", "regex", "sentencepiece"]


def distill_output(model: Path, words: list[str], out: Path, *extra: str) -> Path:
    words_file = out.with_suffix(".words.txt")
    words_file.write_text("\n".join(words) + "\n", encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    code = cli.main(["distill", "--model", str(model), "--new-tokens", str(words_file), "--method", "mean",
                     "--out", str(out), *extra])
    if code != 0:
        sys.exit(f"distill failed for {out}")
    return out


def vllm_python(root: Path) -> Path | None:
    """A venv with vLLM (no dependencies but the modules its tokenizer path imports); None when it cannot be made."""
    venv = root / "vllm-venv"
    if not (venv / "bin" / "python").exists():
        tmp = root / "vllm-venv.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True)
            pip = [str(tmp / "bin" / "python"), "-m", "pip", "install", "-q"]
            subprocess.run(pip + [runtimes.CONVERTER_TORCH, *VLLM_IMPORTS], check=True)
            subprocess.run(pip + ["--no-deps", VLLM], check=True)
        except subprocess.CalledProcessError as e:
            print(f"vLLM: cannot set up its venv ({e}); not compared", file=sys.stderr)
            return None
        tmp.rename(venv)
    return venv / "bin" / "python"


def compare_vllm(python: Path, out: Path, texts: list[tuple[str, str]]) -> tuple[runtimes.Agreement, ...]:
    """vLLM's ids against transformers', and its streamed detokenization against the text (both settings)."""
    plain = [x for _, x in texts]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "texts.json", Path(tmp) / "vllm.json"
        src.write_text(json.dumps(plain), encoding="utf-8")
        subprocess.run([str(python), str(Path(__file__).with_name("vllm_probe.py")), str(out), str(src), str(dst)],
                       check=True, capture_output=True)
        got = json.loads(dst.read_text(encoding="utf-8"))
    tok, want = runtimes.hf_ids(out, plain)
    trips = [tok.decode(ids) == x for ids, x in zip(want, plain)]  # where transformers itself round-trips
    ids = runtimes.agreement(texts, got["ids"], want, tok)
    detok = [runtimes.agreement(texts, [[int(d == x)] for d, x in zip(got["detok"][name], plain)],
                                [[1]] * len(plain), tok, trips) for name in ("default", "raw")]
    return (ids, *detok)


def transformers4(python: Path, out: Path, texts: list[tuple[str, str]]) -> runtimes.Agreement:
    """AutoTokenizer of transformers 4.57 (the converter's venv) on the output, against transformers 5's ids."""
    plain = [x for _, x in texts]
    code = ("import json, sys; from transformers import AutoTokenizer; t = AutoTokenizer.from_pretrained(sys.argv[1]);"
            "print(json.dumps([t(x, add_special_tokens=False)['input_ids'] for x in json.load(sys.stdin)]))")
    r = subprocess.run([str(python), "-c", code, str(out)], input=json.dumps(plain), capture_output=True, text=True)
    if r.returncode != 0:
        print(f"transformers 4.57 cannot load {out}: {r.stderr.strip().splitlines()[-1]}", file=sys.stderr)
        return runtimes.agreement(texts, [[-1]] * len(plain), [[]] * len(plain), None)
    tok, want = runtimes.hf_ids(out, plain)
    return runtimes.agreement(texts, json.loads(r.stdout), want, tok)


def tiny_untied(model: Path, path: Path) -> Path:
    """A 2-layer untied Llama with SmolLM2's tokenizer: the untied case for PEFT, in seconds."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def peft_check(out: Path) -> str:
    """PEFT picks the new rows up as trainable tokens: its model computes what the output computes before
    training, one step moves only the new rows (and the tie holds), merging gives back a plain model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = [t["id"] for t in new_tokens_of(out)]
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tied = model.config.tie_word_embeddings
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    batch = tok("The licensor may sublicense a palatable copyleft work.", return_tensors="pt")
    ref = model(**batch).logits.detach()
    peft = get_peft_model(model, LoraConfig(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": ids}))
    same_start = torch.allclose(peft(**batch).logits, ref, atol=1e-5)
    opt = torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=1.0)
    peft(**batch, labels=batch["input_ids"]).loss.backward()
    opt.step()
    merged = peft.merge_and_unload()
    w_in, w_out = merged.get_input_embeddings().weight, merged.get_output_embeddings().weight
    moved = (w_in != before_in).any(1).nonzero().flatten().tolist()
    others = torch.ones(len(w_in), dtype=torch.bool)
    others[ids] = False
    ok = same_start and moved and set(moved) <= set(ids) and torch.equal(w_in[others], before_in[others])
    ok = ok and (w_out.data_ptr() == w_in.data_ptr() if tied else torch.equal(w_out, before_out))
    return (f"{'ok' if ok else 'FAILED'}: {'tied' if tied else 'untied'}, {len(ids)} trainable tokens, start "
            f"{'equal' if same_start else 'DIFFERS'}, {len(moved)} rows moved, others bit-identical")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=cache_dir() / "smollm2-135m-instruct")
    p.add_argument("--corpus", type=Path, default=cache_dir() / "corpora" / "gcide.heldout.txt")
    p.add_argument("--work", type=Path, default=cache_dir() / "downstream")
    p.add_argument("--no-vllm", action="store_true")
    args = p.parse_args(argv)
    tools = runtimes.build()
    args.work.mkdir(parents=True, exist_ok=True)
    originals = {"default (added)": args.model, "vocab": args.model}
    outputs = {"default (added)": distill_output(args.model, WORDS, args.work / "added"),
               "vocab": distill_output(args.model, WORDS, args.work / "vocab", "--tokenizer-mode", "vocab")}
    gemma = cache_dir() / "gemma-3-270m"  # SentencePiece family: llama.cpp's SPM path (`demo prepare --gemma`)
    if gemma.is_dir():
        originals["Gemma-3 default (added)"] = gemma
        outputs["Gemma-3 default (added)"] = distill_output(gemma, WORDS, args.work / "gemma-added")
    vpy = None if args.no_vllm else vllm_python(cache_dir())
    rows: dict[str, runtimes.Agreement] = {}
    for name, out in outputs.items():
        words = sorted({t["word"] for t in new_tokens_of(out)})
        texts = runtimes.sentence_set(words) + runtimes.corpus_sample(args.corpus, words)
        rows[f"{name}, llama.cpp"] = runtimes.compare_llama(out, texts, originals[name])
        rows[f"{name}, transformers 4.57"] = transformers4(tools.python, out, texts)
        if vpy is not None:
            ids, detok, raw = compare_vllm(vpy, out, texts)
            rows[f"{name}, vLLM ids"], rows[f"{name}, vLLM detokenized"] = ids, detok
            rows[f"{name}, vLLM detokenized (raw added tokens)"] = raw
    print(runtimes.table(rows))
    for name, a in rows.items():
        for line in a.examples:
            print(f"  {name}: {line}")
    untied = distill_output(tiny_untied(args.model, args.work / "tiny-untied"), WORDS, args.work / "tiny-added")
    print(f"PEFT (SmolLM2 output): {peft_check(outputs['default (added)'])}")
    print(f"PEFT (tiny untied output): {peft_check(untied)}")
    return 0 if all(a.passed for k, a in rows.items() if "default" in k) else 1


if __name__ == "__main__":
    sys.exit(main())
