// Dumps every f32 tensor llama.cpp computes (its graph's eval callback) for a prompt in
// one batch, then one token per step, as llama-server runs them: OUT/<step>/NNNN-<name>.f32
// (raw little-endian f32, ggml order: ne0 fastest) and .shape ("ne0 ne1 ne2 ne3 OP").
// Built and run by scripts/llama-dump-tensors.sh; read by the llama_cpp_ops_report test.
#include "llama.h"
#include "ggml.h"
#include "ggml-backend.h"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
#include <sys/stat.h>
static std::string g_dir;
static bool cb(struct ggml_tensor * t, bool ask, void *) {
    if (ask) return true;
    if (t->type != GGML_TYPE_F32) return true;
    std::vector<float> buf(ggml_nelements(t));
    if (!ggml_is_contiguous(t)) return true;
    ggml_backend_tensor_get(t, buf.data(), 0, ggml_nbytes(t));
    std::string name = t->name; for (auto & c : name) if (c == '/' || c == ' ' || c=='(' || c==')') c = '_';
    static int g_n = 0; char num[16]; snprintf(num, sizeof num, "%04d-", g_n++);
    std::string p = g_dir + "/" + num + name;
    FILE * f = fopen((p + ".f32").c_str(), "wb"); fwrite(buf.data(), 4, buf.size(), f); fclose(f);
    f = fopen((p + ".shape").c_str(), "w"); fprintf(f, "%lld %lld %lld %lld %s\n", (long long)t->ne[0], (long long)t->ne[1], (long long)t->ne[2], (long long)t->ne[3], ggml_op_desc(t)); fclose(f);
    return true;
}
int main(int argc, char ** argv) {
    // dump MODEL OUT FA(0|1) NPROMPT tok... (first NPROMPT tokens are the prompt, the rest decoded one by one)
    if (argc < 6) { fprintf(stderr, "usage: %s FILE.gguf OUT FA N_PROMPT ID...\n", argv[0]); return 1; }
    // FA: 0 = `-fa off -ctk f32 -ctv f32`; 1 = flash attention on an f16 cache; auto = llama-server's defaults
    // (`-fa auto`, which a CPU build resolves to flash attention, f16 cache).
    const char * model_path = argv[1]; std::string out = argv[2]; std::string fa_arg = argv[3]; int np = atoi(argv[4]);
    const int fa = fa_arg == "auto" ? -1 : atoi(fa_arg.c_str());
    std::vector<llama_token> toks; for (int i = 5; i < argc; i++) toks.push_back(atoi(argv[i]));
    llama_backend_init();
    auto mp = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(model_path, mp);
    if (!model) { fprintf(stderr, "cannot load %s\n", model_path); return 1; }
    auto cp = llama_context_default_params();
    cp.n_ctx = 512; cp.n_threads = 2; cp.n_threads_batch = 2; cp.cb_eval = cb; cp.cb_eval_user_data = nullptr;
    cp.flash_attn_type = fa < 0 ? LLAMA_FLASH_ATTN_TYPE_AUTO : fa ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    if (fa == 0) { cp.type_k = GGML_TYPE_F32; cp.type_v = GGML_TYPE_F32; }
    llama_context * ctx = llama_init_from_model(model, cp);
    mkdir(out.c_str(), 0755);
    int pos = 0; int step = 0;
    auto run = [&](int n) {
        g_dir = out + "/" + std::to_string(step++); mkdir(g_dir.c_str(), 0755);
        llama_batch b = llama_batch_get_one(toks.data() + pos, n);
        if (llama_decode(ctx, b)) { fprintf(stderr, "decode failed\n"); exit(1); }
        pos += n;
    };
    run(np);
    while (pos < (int)toks.size()) run(1);
    llama_free(ctx); llama_model_free(model);
    return 0;
}
