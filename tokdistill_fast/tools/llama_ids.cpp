// Token ids and detokenized text of many texts from one GGUF vocabulary, through libllama's own llama_tokenize
// and llama_detokenize: what llama-tokenize prints (no BOS, special tokens parsed, as its defaults), without
// starting a process per text and without the `common` library llama-tokenize links (52 more files to build).
//
// usage: llama_ids MODEL.gguf < texts   (texts separated by NUL bytes)
// prints one line per text: the ids separated by spaces, a tab, then the detokenized text as hex bytes.
#include "llama.h"

#include <cstdio>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

static void quiet(ggml_log_level, const char *, void *) {}

int main(int argc, char ** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s MODEL.gguf < NUL-separated texts\n", argv[0]);
        return 2;
    }
    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model_params params = llama_model_default_params();
    params.vocab_only = true;
    llama_model * model = llama_model_load_from_file(argv[1], params);
    if (model == nullptr) {
        std::fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    std::string all((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
    size_t start = 0;
    while (start <= all.size()) {
        size_t end = all.find('\0', start);
        if (end == std::string::npos) end = all.size();
        const std::string text = all.substr(start, end - start);
        std::vector<llama_token> ids(text.size() + 8);  // a token covers at least one byte (+ room for specials)
        const int n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), ids.data(), (int32_t) ids.size(),
                                     /*add_special*/ false, /*parse_special*/ true);
        if (n < 0) {
            std::fprintf(stderr, "llama_tokenize failed on text %zu\n", start);
            return 1;
        }
        std::string back(4 * text.size() + 16, '\0');
        const int m = llama_detokenize(vocab, ids.data(), n, back.data(), (int32_t) back.size(),
                                       /*remove_special*/ false, /*unparse_special*/ true);
        back.resize(m < 0 ? 0 : m);
        for (int i = 0; i < n; ++i) std::printf(i ? " %d" : "%d", ids[i]);
        std::printf("\t");
        for (unsigned char c : back) std::printf("%02x", c);
        std::printf("\n");
        if (end == all.size()) break;
        start = end + 1;
    }
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
