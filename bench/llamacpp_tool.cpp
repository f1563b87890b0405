// A small program over libllama for bench/bench_llamacpp.py (built by it against the llama.cpp it builds;
// not part of the package).
//
//     llamacpp-tool greedy MODEL.gguf N_NEW THREADS ID [ID ...]
//         {"tokens": [...]}: the N_NEW argmax tokens after the given prompt ids (one batch for the prompt,
//         then one token at a time, as our generate does; no BOS added, no sampler).
//     llamacpp-tool quantize IN.gguf OUT.gguf FTYPE [OUTPUT_TYPE]
//         llama_model_quantize, what llama-quantize calls (FTYPE: BF16, Q8_0 or Q4_0; OUTPUT_TYPE: the
//         head's type, as llama-quantize's --output-tensor-type: bf16, q8_0, f32).
//     llamacpp-tool bench MODEL.gguf THREADS N_PROMPT N_GEN
//         {"pp": tok/s, "tg": tok/s}: llama-bench's pp/tg tests (tools/llama-bench: test_prompt, test_gen)
//         with its defaults (n_batch 2048, n_ubatch 512, a warm-up run, one repetition, random ids).
//
// The quantize and bench modes stand in for llama-quantize and llama-bench where only libllama is built
// (bench_llamacpp.py --lib-only: those tools need llama.cpp's large `common` library).
#include "llama.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static void quiet(enum ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

static llama_model * load(const char * path) {
    llama_model * model = llama_model_load_from_file(path, llama_model_default_params());
    if (model == nullptr) {
        fprintf(stderr, "cannot load %s\n", path);
        exit(1);
    }
    return model;
}

static llama_context * context(llama_model * model, int n_ctx, int n_batch, int n_ubatch, int threads) {
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) n_ctx;
    cp.n_batch = (uint32_t) n_batch;
    cp.n_ubatch = (uint32_t) n_ubatch;
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (ctx == nullptr) {
        fprintf(stderr, "cannot create a context\n");
        exit(1);
    }
    return ctx;
}

static void decode(llama_context * ctx, llama_token * ids, int n) {
    if (llama_decode(ctx, llama_batch_get_one(ids, n)) != 0) {
        fprintf(stderr, "llama_decode failed\n");
        exit(1);
    }
}

static int greedy(int argc, char ** argv) {
    const int n_new = atoi(argv[3]);
    const int threads = atoi(argv[4]);
    std::vector<llama_token> prompt;
    for (int i = 5; i < argc; i++) {
        prompt.push_back((llama_token) atoi(argv[i]));
    }
    llama_model * model = load(argv[2]);
    const int n_ctx = (int) prompt.size() + n_new + 16;
    llama_context * ctx = context(model, n_ctx, n_ctx, n_ctx, threads);
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    decode(ctx, prompt.data(), (int) prompt.size());
    std::vector<llama_token> out;
    for (int i = 0; i < n_new; i++) {
        const float * logits = llama_get_logits_ith(ctx, -1);
        llama_token best = 0;
        for (int v = 1; v < n_vocab; v++) {
            if (logits[v] > logits[best]) {
                best = v;  // the first maximum, as torch.argmax
            }
        }
        out.push_back(best);
        if (i + 1 < n_new) {
            decode(ctx, &best, 1);
        }
    }
    printf("{\"tokens\": [");
    for (size_t i = 0; i < out.size(); i++) {
        printf(i ? ", %d" : "%d", out[i]);
    }
    printf("]}\n");
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}

static ggml_type type_named(const std::string & name) {
    if (name == "f32") return GGML_TYPE_F32;
    if (name == "bf16") return GGML_TYPE_BF16;
    if (name == "q8_0") return GGML_TYPE_Q8_0;
    if (name == "q4_0") return GGML_TYPE_Q4_0;
    fprintf(stderr, "unknown tensor type %s\n", name.c_str());
    exit(2);
}

static int quantize(int argc, char ** argv) {
    llama_model_quantize_params qp = llama_model_quantize_default_params();
    const std::string ftype = argv[4];
    if (ftype == "BF16") {
        qp.ftype = LLAMA_FTYPE_MOSTLY_BF16;
    } else if (ftype == "Q8_0") {
        qp.ftype = LLAMA_FTYPE_MOSTLY_Q8_0;
    } else if (ftype == "Q4_0") {
        qp.ftype = LLAMA_FTYPE_MOSTLY_Q4_0;
    } else {
        fprintf(stderr, "unknown ftype %s\n", ftype.c_str());
        return 2;
    }
    if (argc > 5) {
        qp.output_tensor_type = type_named(argv[5]);
    }
    return llama_model_quantize(argv[2], argv[3], &qp) == 0 ? 0 : 1;
}

static std::vector<llama_token> random_ids(int n, int n_vocab) {
    std::vector<llama_token> ids(n);
    for (auto & id : ids) {
        id = std::rand() % n_vocab;
    }
    return ids;
}

static double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

static int bench(char ** argv) {
    const int threads = atoi(argv[3]);
    const int n_prompt = atoi(argv[4]);
    const int n_gen = atoi(argv[5]);
    llama_model * model = load(argv[2]);
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    // pp: a context of n_prompt; warm-up prompt, then the timed one from an empty memory
    llama_context * ctx = context(model, n_prompt, 2048, 512, threads);
    auto ids = random_ids(n_prompt, n_vocab);
    decode(ctx, ids.data(), n_prompt);
    llama_memory_clear(llama_get_memory(ctx), false);
    ids = random_ids(n_prompt, n_vocab);
    auto t0 = std::chrono::steady_clock::now();
    decode(ctx, ids.data(), n_prompt);
    llama_synchronize(ctx);
    const double pp = n_prompt / seconds_since(t0);
    llama_free(ctx);
    // tg: a context of n_gen; one warm-up token, then n_gen single-token decodes from an empty memory
    ctx = context(model, n_gen, 2048, 512, threads);
    llama_token tok = std::rand() % n_vocab;
    decode(ctx, &tok, 1);
    llama_memory_clear(llama_get_memory(ctx), false);
    t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < n_gen; i++) {
        tok = std::rand() % n_vocab;
        decode(ctx, &tok, 1);
        llama_synchronize(ctx);
    }
    const double tg = n_gen / seconds_since(t0);
    printf("{\"pp\": %.3f, \"tg\": %.3f}\n", pp, tg);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}

int main(int argc, char ** argv) {
    const std::string mode = argc > 1 ? argv[1] : "";
    llama_log_set(quiet, nullptr);
    llama_backend_init();
    int rc = 2;
    if (mode == "greedy" && argc >= 6) {
        rc = greedy(argc, argv);
    } else if (mode == "quantize" && argc >= 5) {
        rc = quantize(argc, argv);
    } else if (mode == "bench" && argc == 6) {
        rc = bench(argv);
    } else {
        fprintf(stderr,
                "usage: %s greedy MODEL N_NEW THREADS ID...\n"
                "       %s quantize IN OUT BF16|Q8_0|Q4_0 [OUTPUT_TYPE]\n"
                "       %s bench MODEL THREADS N_PROMPT N_GEN\n",
                argv[0], argv[0], argv[0]);
    }
    llama_backend_free();
    return rc;
}
