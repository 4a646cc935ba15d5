// The emulator's scheduler: runs a kernel launch on the calling OS thread, one block at
// a time, each thread of the block a coroutine with its own stack.
//
// Scheduling is deterministic and adversarial, so that a kernel's synchronisation bugs
// show on every run rather than by luck:
// - between two __syncthreads a block's warps run ONE AT A TIME, each until all its
//   threads wait at the barrier (or have exited), in an order set by the policy: in
//   order, reversed, or a seeded shuffle drawn afresh for every phase; blocks run in
//   the same kind of order;
// - within a warp, lanes run one at a time too (same policy) up to the next warp
//   collective, where they meet: a shuffle/vote completes only when every lane named
//   in its mask has reached it (lockstep), and a lane named there that is elsewhere (at
//   a barrier, exited, at another collective) is reported as divergence;
// - shared memory is filled with 0xFF bytes (NaN as floats) before each block, so a
//   read of shared data no thread has written yet - a missing barrier - poisons the
//   result in every order, and a write racing a read gives different results under
//   different orders (the tests compare them bit for bit);
// - the shared memory a block uses (dynamic + static) is held to the launch's limit;
// - a kernel's invalid memory access (SIGSEGV/SIGBUS while a launch runs on this
//   thread) fails the launch with the address, as the GPU's illegal-address error
//   would, instead of killing the process.
#include "cuda_emu.h"

#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <mutex>
#include <string>
#include <vector>

#if !defined(__x86_64__) || !defined(__linux__)
#error "the emulator's coroutines are written for x86-64 Linux (build.rs compiles it only there)"
#endif

namespace hearth_emu {

thread_local const Builtins* current = nullptr;

namespace {

// Kernel frames are small (registers' worth of locals); a guard page sits below each.
constexpr size_t STACK_BYTES = 128 * 1024;

enum class St : uint8_t { Ready, Collective, Barrier, Exited };

struct Ctx {
    void* sp = nullptr;
};

// A coroutine switch saves what the SysV ABI says a call preserves (rbx, rbp, r12-r15,
// the SSE and x87 control words) and swaps stacks: no system call, unlike swapcontext.
extern "C" void hearth_emu_switch(void** save_sp, void* new_sp);
extern "C" void hearth_emu_start();
asm(R"(
    .text
    .globl hearth_emu_switch
    .hidden hearth_emu_switch
    .type hearth_emu_switch,@function
hearth_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size hearth_emu_switch,.-hearth_emu_switch
    .globl hearth_emu_start
    .hidden hearth_emu_start
    .type hearth_emu_start,@function
hearth_emu_start:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size hearth_emu_start,.-hearth_emu_start
)");

void ctx_switch(Ctx* from, Ctx* to) { hearth_emu_switch(&from->sp, to->sp); }

void ctx_make(Ctx* c, char* stack, size_t size, void (*fn)(void*), void* arg) {
    uint64_t* top = reinterpret_cast<uint64_t*>(
        (reinterpret_cast<uintptr_t>(stack) + size) & ~static_cast<uintptr_t>(15));
    top[-1] = reinterpret_cast<uint64_t>(&hearth_emu_start);  // ret
    top[-2] = 0;                                              // rbp
    top[-3] = 0;                                              // rbx
    top[-4] = reinterpret_cast<uint64_t>(arg);                // r12
    top[-5] = reinterpret_cast<uint64_t>(fn);                 // r13
    top[-6] = 0;                                              // r14
    top[-7] = 0;                                              // r15
    top[-8] = 0x1f80ull | (0x037full << 32);                  // mxcsr, x87 control word
    c->sp = &top[-8];
}

struct Lane {
    Ctx ctx;
    St st = St::Ready;
    Builtins b{};
    int op = 0, param = 0, width = 32;
    unsigned mask = 0;
    uint64_t value = 0, result = 0;
};

// Stacks for up to 1024 threads, kept per OS thread across launches.
struct Stacks {
    char* base = nullptr;
    size_t count = 0;
    size_t page = 4096;
    char* get(size_t i) { return base + i * (STACK_BYTES + page) + page; }
    bool reserve(size_t n) {
        if (n <= count) return true;
        if (base) munmap(base, count * (STACK_BYTES + page));
        page = (size_t)sysconf(_SC_PAGESIZE);
        void* p = mmap(nullptr, n * (STACK_BYTES + page), PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) {
            base = nullptr;
            count = 0;
            return false;
        }
        base = static_cast<char*>(p);
        count = n;
        for (size_t i = 0; i < n; ++i) mprotect(base + i * (STACK_BYTES + page), page, PROT_NONE);
        return true;
    }
    ~Stacks() {
        if (base) munmap(base, count * (STACK_BYTES + page));
    }
};

struct Block {
    Ctx sched;
    std::vector<Lane> lanes;
    int running = -1;
    void (*invoke)(void**) = nullptr;
    void** args = nullptr;
    std::vector<unsigned char> shared;
    size_t dynamic_bytes = 0, static_top = 0, limit = 0;
    std::vector<std::pair<const void*, size_t>> statics;
    std::string error;
};

thread_local Block* blk = nullptr;
thread_local Stacks stacks;

const char* const POLICY[] = {"in order", "reversed", "shuffled"};

// Invalid memory accesses inside a launch jump back to it; elsewhere the signal goes
// to the handler that was there before (Rust's stack-overflow report, or the default).
thread_local sigjmp_buf* fault_env = nullptr;
thread_local void* fault_addr = nullptr;
struct sigaction old_segv, old_bus;
std::once_flag fault_handler_installed;

void on_fault(int sig, siginfo_t* info, void*) {
    if (fault_env) {
        sigjmp_buf* env = fault_env;
        fault_env = nullptr;
        fault_addr = info->si_addr;
        siglongjmp(*env, sig);
    }
    // Returning re-runs the faulting instruction under the previous handler.
    sigaction(sig, sig == SIGSEGV ? &old_segv : &old_bus, nullptr);
}

void install_fault_handler() {
    std::call_once(fault_handler_installed, [] {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &old_segv);
        sigaction(SIGBUS, &sa, &old_bus);
    });
}

uint64_t splitmix(uint64_t& s) {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void order(std::vector<uint32_t>& out, uint32_t n, uint32_t policy, uint64_t seed, uint64_t salt) {
    out.resize(n);
    for (uint32_t i = 0; i < n; ++i) out[i] = policy == 1 ? n - 1 - i : i;
    if (policy == 2) {
        uint64_t s = seed ^ (salt * 0xd1b54a32d192ed03ull);
        for (uint32_t i = n; i > 1; --i) std::swap(out[i - 1], out[splitmix(s) % i]);
    }
}

void lane_main(void* arg) {
    Block* b = static_cast<Block*>(arg);
    Lane& l = b->lanes[b->running];
    b->invoke(b->args);
    l.st = St::Exited;
    ctx_switch(&l.ctx, &b->sched);
    __builtin_unreachable();
}

Lane& me() { return blk->lanes[blk->running]; }

void yield_to_scheduler() {
    Lane& l = me();
    ctx_switch(&l.ctx, &blk->sched);
}

void resume(Block& b, uint32_t i) {
    b.running = (int)i;
    current = &b.lanes[i].b;
    ctx_switch(&b.sched, &b.lanes[i].ctx);
}

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

// Completes the warp collectives its waiting lanes have reached; false (with
// b.error set) when lanes diverge.
bool complete_collectives(Block& b, uint32_t first, uint32_t n) {
    for (uint32_t i = 0; i < n; ++i) {
        Lane& l = b.lanes[first + i];
        if (l.st != St::Collective) continue;
        const unsigned mask = l.mask;
        if (!(mask >> i & 1)) {
            b.error = fmt("thread %u calls a warp collective whose mask 0x%08x leaves out its own lane %u",
                          first + i, mask, i);
            return false;
        }
        // Every lane the mask names must be waiting at the same collective.
        for (uint32_t j = 0; j < 32; ++j) {
            if (!(mask >> j & 1)) continue;
            if (j >= n) {
                b.error = fmt("a warp collective's mask 0x%08x names lane %u, which this block (%zu threads) lacks",
                              mask, j, b.lanes.size());
                return false;
            }
            Lane& o = b.lanes[first + j];
            const char* where = o.st == St::Barrier ? "waits at __syncthreads"
                                : o.st == St::Exited ? "has exited"
                                : (o.op != l.op || o.mask != l.mask || o.width != l.width)
                                    ? "waits at a different warp collective"
                                    : nullptr;
            if (where) {
                b.error = fmt("warp divergence: thread %u waits in a warp collective (op %d, mask 0x%08x) "
                              "that names thread %u, which %s",
                              first + i, l.op, mask, first + j, where);
                return false;
            }
        }
        const int w = l.width;
        if (w <= 0 || w > 32 || (w & (w - 1))) {
            b.error = fmt("warp shuffle width %d is not a power of two up to 32", w);
            return false;
        }
        uint64_t ballot = 0;
        for (uint32_t j = 0; j < 32; ++j)
            if (mask >> j & 1 && b.lanes[first + j].value) ballot |= 1ull << j;
        for (uint32_t j = 0; j < 32; ++j) {
            if (!(mask >> j & 1)) continue;
            Lane& o = b.lanes[first + j];
            const int base = (int)j & ~(w - 1);
            int src = (int)j;
            switch (o.op) {
            case SHFL_IDX: src = base + (o.param & (w - 1)); break;
            case SHFL_XOR: src = (int)j ^ o.param; if (src / w != (int)j / w) src = (int)j; break;
            case SHFL_DOWN: src = (int)j + o.param; if (src >= base + w) src = (int)j; break;
            case SHFL_UP: src = (int)j - o.param; if (src < base) src = (int)j; break;
            default: break;
            }
            if (src < 0 || src > 31 || !(mask >> src & 1)) {
                b.error = fmt("thread %u shuffles from lane %d, outside the mask 0x%08x", first + j, src, mask);
                return false;
            }
            switch (o.op) {
            case BALLOT: o.result = ballot; break;
            case ANY: o.result = ballot != 0; break;
            case ALL: o.result = ballot == (uint64_t)mask; break;
            case SYNCWARP: o.result = 0; break;
            default: o.result = b.lanes[first + src].value;
            }
        }
        for (uint32_t j = 0; j < 32; ++j)
            if (mask >> j & 1) b.lanes[first + j].st = St::Ready;
    }
    return true;
}

// Runs warp `w` until every one of its threads waits at a barrier or has exited.
bool run_warp(Block& b, uint32_t w, uint32_t policy, uint64_t seed, uint64_t salt) {
    const uint32_t first = w * 32;
    const uint32_t n = std::min<uint32_t>(32, (uint32_t)b.lanes.size() - first);
    std::vector<uint32_t> lanes;
    for (uint64_t round = 0;; ++round) {
        order(lanes, n, policy, seed, salt * 131 + round);
        bool ran = false;
        for (uint32_t i : lanes) {
            if (b.lanes[first + i].st != St::Ready) continue;
            ran = true;
            resume(b, first + i);
            if (!b.error.empty()) return false;
        }
        bool waiting = false;
        for (uint32_t i = 0; i < n; ++i) waiting |= b.lanes[first + i].st == St::Collective;
        if (!waiting) return true;
        if (!complete_collectives(b, first, n)) return false;
        (void)ran;
    }
}

}  // namespace

void* dynamic_shared() { return blk->shared.data(); }

void* static_shared(size_t bytes, size_t align, const void* key) {
    Block& b = *blk;
    for (auto& s : b.statics)
        if (s.first == key) return b.shared.data() + s.second;
    const size_t at = (b.static_top + align - 1) / align * align;
    if (at + bytes > b.limit)
        trap("static __shared__ memory plus the launch's dynamic shared memory exceed the "
             "block's shared-memory limit");
    memset(b.shared.data() + at, 0xff, bytes);
    b.statics.emplace_back(key, at);
    b.static_top = at + bytes;
    return b.shared.data() + at;
}

void syncthreads() {
    me().st = St::Barrier;
    yield_to_scheduler();
}

uint64_t warp_collective(int op, unsigned mask, uint64_t value, int param, int width) {
    Lane& l = me();
    l.st = St::Collective;
    l.op = op;
    l.mask = mask;
    l.value = value;
    l.param = param;
    l.width = width;
    yield_to_scheduler();
    return me().result;
}

void trap(const char* what) {
    Block& b = *blk;
    Lane& l = me();
    b.error = fmt("thread %u of block (%u,%u,%u): %s", (unsigned)b.running, l.b.block_idx.x,
                  l.b.block_idx.y, l.b.block_idx.z, what);
    l.st = St::Exited;
    ctx_switch(&l.ctx, &b.sched);
    __builtin_unreachable();
}

}  // namespace hearth_emu

using namespace hearth_emu;

extern "C" {

struct HearthEmuLaunch {
    uint32_t grid[3];
    uint32_t block[3];
    uint64_t dynamic_shared_bytes;
    uint64_t shared_limit_bytes;
    uint32_t policy;  // 0 in order, 1 reversed, 2 shuffled
    uint64_t seed;
};

const char* hearth_emu_kernel_name(const KernelEntry* k) { return k->name; }
const char* hearth_emu_kernel_signature(const KernelEntry* k) { return k->signature(); }

// Runs the launch to completion; 0, or 1 with a message in `err`.
int hearth_emu_launch(const KernelEntry* k, const HearthEmuLaunch* d, void** args, char* err,
                      size_t err_len) {
    auto fail = [&](const std::string& m) {
        snprintf(err, err_len, "%s", m.c_str());
        return 1;
    };
    if (blk) return fail("a kernel launched from inside an emulated kernel");
    const uint64_t threads = (uint64_t)d->block[0] * d->block[1] * d->block[2];
    if (threads == 0 || threads > 1024) return fail(fmt("%llu threads per block", (unsigned long long)threads));
    if (d->policy > 2) return fail("unknown schedule");
    if (d->dynamic_shared_bytes > d->shared_limit_bytes)
        return fail(fmt("%llu bytes of dynamic shared memory over the limit of %llu",
                        (unsigned long long)d->dynamic_shared_bytes,
                        (unsigned long long)d->shared_limit_bytes));
    if (!stacks.reserve(threads)) return fail("could not map the emulated threads' stacks");
    Block b;
    b.invoke = k->invoke;
    b.args = args;
    b.limit = d->shared_limit_bytes;
    b.dynamic_bytes = d->dynamic_shared_bytes;
    b.shared.resize(b.limit + 16);
    b.lanes.resize(threads);
    const uint64_t nblocks = (uint64_t)d->grid[0] * d->grid[1] * d->grid[2];
    const uint32_t nwarps = (uint32_t)((threads + 31) / 32);
    std::vector<uint32_t> block_order, warp_order;
    // Blocks in the policy's order, over the linear block index.
    std::vector<uint64_t> blocks(nblocks);
    {
        std::vector<uint32_t> o;
        if (nblocks > 0xffffffffull) return fail("grid too large for the emulator");
        order(o, (uint32_t)nblocks, d->policy, d->seed, 0x5eed);
        for (uint64_t i = 0; i < nblocks; ++i) blocks[i] = o[i];
    }
    blk = &b;
    install_fault_handler();
    sigjmp_buf env;
    // The block being run, for the message after a fault (volatile: read after the jump).
    static thread_local volatile uint64_t running_block;
    int rc = 0;
    if (const int sig = sigsetjmp(env, 1)) {
        const uint64_t lin = running_block;
        rc = fail(fmt("invalid memory access at %p (signal %d) in block (%llu,%llu,%llu), schedule %s",
                      fault_addr, sig, (unsigned long long)(lin % d->grid[0]),
                      (unsigned long long)(lin / d->grid[0] % d->grid[1]),
                      (unsigned long long)(lin / ((uint64_t)d->grid[0] * d->grid[1])), POLICY[d->policy]));
        blk = nullptr;
        current = nullptr;
        return rc;
    }
    fault_env = &env;
    for (uint64_t lin : blocks) {
        running_block = lin;
        const uint3 bi{(unsigned)(lin % d->grid[0]), (unsigned)(lin / d->grid[0] % d->grid[1]),
                       (unsigned)(lin / ((uint64_t)d->grid[0] * d->grid[1]))};
        memset(b.shared.data(), 0xff, std::max(b.static_top, b.dynamic_bytes));
        b.statics.clear();
        b.static_top = b.dynamic_bytes;
        for (uint32_t t = 0; t < threads; ++t) {
            Lane& l = b.lanes[t];
            l = Lane{};
            l.b.thread_idx = uint3{t % d->block[0], t / d->block[0] % d->block[1],
                                   t / (d->block[0] * d->block[1])};
            l.b.block_idx = bi;
            l.b.block_dim = dim3{d->block[0], d->block[1], d->block[2]};
            l.b.grid_dim = dim3{d->grid[0], d->grid[1], d->grid[2]};
            ctx_make(&l.ctx, stacks.get(t), STACK_BYTES, lane_main, &b);
        }
        for (uint64_t phase = 0;; ++phase) {
            order(warp_order, nwarps, d->policy, d->seed, lin * 1000003 + phase);
            for (uint32_t w : warp_order)
                if (!run_warp(b, w, d->policy, d->seed, (lin * 1000003 + phase) * 64 + w)) break;
            if (!b.error.empty()) break;
            bool live = false;
            for (auto& l : b.lanes)
                if (l.st == St::Barrier) {
                    l.st = St::Ready;
                    live = true;
                }
            if (!live) break;
        }
        if (!b.error.empty()) {
            rc = fail(fmt("%s (block (%u,%u,%u), schedule %s)", b.error.c_str(), bi.x, bi.y, bi.z,
                          POLICY[d->policy]));
            break;
        }
    }
    fault_env = nullptr;
    blk = nullptr;
    current = nullptr;
    return rc;
}

}  // extern "C"
