"""Tools around the library: `tokdistill select` (select), `make demo` (demo), BPE merges continued on a corpus
for bring-your-own-tokenizer examples (extend_bpe) and the llama.cpp runtime check (runtimes, llama_ids.cpp)."""
