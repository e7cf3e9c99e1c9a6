//! The ACL host program of a package (`host/panguc_host.cpp`) and the
//! declaration-only ACL headers (`host/stub/`) used to compile-check it here
//! with g++ (real ACL/aclnn signatures; no CANN on this machine).
//!
//! The program is a fixed C++ runtime plus generated tables: every buffer
//! (dtype, shape per dim linear in the run-time sizes `tokens`, `past`,
//! `seqs`, `max_blocks`, `num_blocks`, where its memory comes from), the
//! launches in program order (one step per device kernel), and one `switch`
//! case per op calling its generated two-stage aclnn API. A one-sequence
//! program runs prefill and decode of one prompt; a ragged-batch (paged)
//! program runs several prompts together, one step per call with the step
//! metadata of `panguc_ir::batch` as inputs and one paged cache per layer.

use crate::emit::{ArgRef, Env, TExpr};
use crate::program::AscendProgram;
use crate::project::buffer_kind_code;
use anyhow::{bail, Result};
use panguc_ir::kernel::BufferKind;
use panguc_ir::Dim;
use std::fmt::Write;
use std::path::Path;

/// The sizes a host `Lin` multiplies, in its field order.
fn env_of(z: [u64; 5]) -> Env {
    Env { tokens: z[0], past: z[1], core_num: 1, seqs: z[2], max_blocks: z[3], num_blocks: z[4] }
}

/// `{c, t, p, s, m, n}`: the constant and the coefficients of `tokens`,
/// `past`, `seqs`, `max_blocks`, `num_blocks` of a linear formula.
fn lin(e: &TExpr) -> Result<String> {
    let c = e.eval(&env_of([0; 5]))?;
    let mut coef = vec![c];
    for i in 0..5 {
        let mut z = [0; 5];
        z[i] = 1;
        coef.push(e.eval(&env_of(z))? - c);
    }
    let probe = [3, 5, 7, 11, 13];
    let linear: u64 = c + probe.iter().zip(&coef[1..]).map(|(x, a)| x * a).sum::<u64>();
    if e.eval(&env_of(probe))? != linear {
        bail!("shape formula {} is not linear in the run-time sizes", e.to_cpp());
    }
    Ok(format!("{{{}}}", coef.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")))
}

fn lin_dim(d: &Dim) -> Result<String> {
    lin(&TExpr::from_dim(d)?)
}

/// Most tensor parameters of one device-kernel launch (the static W8A8
/// routed gate/up epilogue takes 11).
const MAX_ARGS: usize = 16;

const ZERO_LIN: &str = "{0, 0, 0, 0, 0, 0}";

const RUNTIME: &str = r#"
#define CHECK_ACL(x)                                                                       \
    do {                                                                                   \
        const auto panguc_rc = (x);                                                        \
        if (panguc_rc != 0) {                                                              \
            std::fprintf(stderr, "%s:%d: %s failed with %d\n", __FILE__, __LINE__, #x,     \
                         static_cast<int>(panguc_rc));                                     \
            std::exit(1);                                                                  \
        }                                                                                  \
    } while (0)

namespace {

// Run-time sizes of one call (a one-sequence program uses tokens and past,
// a ragged-batch program tokens, seqs, maxBlocks and numBlocks).
struct Sizes {
    int64_t tokens, past, seqs, maxBlocks, numBlocks;
};
// A dimension or element offset, linear in the sizes.
struct Lin {
    int64_t c, t, p, s, m, n;
    int64_t At(const Sizes& z) const
    {
        return c + t * z.tokens + p * z.past + s * z.seqs + m * z.maxBlocks + n * z.numBlocks;
    }
};
// One ragged step's metadata (see panguc_ir::batch), row-major.
struct StepMeta {
    std::vector<int64_t> positions, queryStartLoc, contextLens, blockTable, slotMapping;
    int64_t maxBlocks;
};
enum Kind { kInput = 0, kWeight = 1, kKvCache = 2, kSlot = 3, kView = 4, kTemp = 5 };
struct Buf {
    const char* name;
    aclDataType dtype;
    uint32_t esize;
    int rank;
    Lin dims[4];
    Kind kind;
    int ref;     // input index, weight index, cache index, slot, view base buffer
    Lin offset;  // views: element offset in the base buffer
};
struct Step {
    int op;
    int nargs;
    int args[kMaxArgs];
};

float HalfToFloat(uint16_t h)
{
    const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal: renormalise
            int e = -1;
            uint32_t m = man;
            do { e++; m <<= 1; } while ((m & 0x400u) == 0);
            bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (m & 0x3ffu) << 13;
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | man << 13;
    } else {
        bits = sign | (exp + 112) << 23 | man << 13;
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

float Bf16ToFloat(uint16_t h)
{
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

class Model {
public:
    // `max`: the largest sizes of any call (buffers are allocated for them).
    Model(const Sizes& max, int32_t device) : max_(max), device_(device) {}

    // `commDir`: where the ranks of a partitioned program exchange their
    // HCCL root info (unused on one device).
    void Init(const std::string& weightDir, const std::string& commDir)
    {
        CHECK_ACL(aclInit(nullptr));
        CHECK_ACL(aclrtSetDevice(device_));
        CHECK_ACL(aclrtCreateStream(&stream_));
#if PANGUC_PARTITIONED
        InitComms(commDir);
#else
        (void)commDir;
#endif
        ptrs_.assign(kNumBufs, nullptr);
        std::vector<size_t> slotBytes(kNumSlots, 0);
        for (int b = 0; b < kNumBufs; b++) {
            if (kBufs[b].kind == kSlot) slotBytes[kBufs[b].ref] = std::max(slotBytes[kBufs[b].ref], MaxBytes(b));
        }
        slots_.assign(kNumSlots, nullptr);
        for (int s = 0; s < kNumSlots; s++) slots_[s] = Alloc(slotBytes[s]);
        for (int b = 0; b < kNumBufs; b++) {
            const Buf& d = kBufs[b];
            switch (d.kind) {
                case kSlot: ptrs_[b] = slots_[d.ref]; break;
                case kView: ptrs_[b] = nullptr; break;  // resolved per call (offsets may depend on sizes)
                case kWeight: ptrs_[b] = LoadWeight(weightDir, b); break;
                default: ptrs_[b] = Alloc(MaxBytes(b)); break;
            }
        }
    }

    ~Model()
    {
#if PANGUC_PARTITIONED
        for (HcclComm c : comms_) {
            if (c != nullptr) HcclCommDestroy(c);
        }
#endif
        for (void* p : owned_) aclrtFree(p);
        if (workspace_ != nullptr) aclrtFree(workspace_);
        if (stream_ != nullptr) aclrtDestroyStream(stream_);
        aclrtResetDevice(device_);
        aclFinalize();
    }

    // Runs `ids` at positions past_..past_+n (one-sequence programs);
    // returns the next greedy token.
    int64_t Forward(const std::vector<int64_t>& ids)
    {
        const int64_t n = static_cast<int64_t>(ids.size());
        if (n > max_.tokens || past_ + n > max_.tokens + max_.past) {
            std::fprintf(stderr, "error: %lld tokens at position %lld exceed the limits (%lld tokens, %lld context)\n",
                         static_cast<long long>(n), static_cast<long long>(past_), static_cast<long long>(max_.tokens),
                         static_cast<long long>(max_.tokens + max_.past));
            std::exit(1);
        }
        z_ = Sizes{n, past_, 0, 0, 0};
        std::vector<int64_t> pos(ids.size());
        for (int64_t i = 0; i < n; i++) pos[i] = past_ + i;
        CopyInts(kInputs[0], ids);
        CopyInts(kInputs[1], pos);
        for (const Step& s : kSteps) Launch(s);
        const int64_t next = GreedyRows()[n - 1];
        past_ += n;
        return next;
    }

    // One ragged step (ragged-batch programs): every sequence's new tokens
    // flattened, with the step's metadata; returns each row's greedy token.
    std::vector<int64_t> RunStep(const std::vector<int64_t>& ids, const StepMeta& m)
    {
        const int64_t n = static_cast<int64_t>(ids.size());
        const int64_t seqs = static_cast<int64_t>(m.contextLens.size());
        if (n > max_.tokens || seqs > max_.seqs || m.maxBlocks > max_.maxBlocks) {
            std::fprintf(stderr, "error: a step of %lld tokens, %lld sequences and %lld blocks each exceeds the limits\n",
                         static_cast<long long>(n), static_cast<long long>(seqs), static_cast<long long>(m.maxBlocks));
            std::exit(1);
        }
        z_ = Sizes{n, 0, seqs, m.maxBlocks, max_.numBlocks};
        const std::vector<int64_t>* fields[] = {&ids, &m.positions, &m.queryStartLoc, &m.contextLens, &m.blockTable,
                                                &m.slotMapping};
        for (int i = 0; i < kNumInputs; i++) CopyInts(kInputs[i], *fields[i]);
        for (const Step& s : kSteps) Launch(s);
        return GreedyRows();
    }

private:
    size_t Bytes(int b, const Sizes& z) const
    {
        size_t n = kBufs[b].esize;
        for (int i = 0; i < kBufs[b].rank; i++) n *= static_cast<size_t>(kBufs[b].dims[i].At(z));
        return n;
    }
    size_t MaxBytes(int b) const { return Bytes(b, max_); }
    // Integers into input buffer `b` in its element width (i32 or i64).
    void CopyInts(int b, const std::vector<int64_t>& v)
    {
        const size_t es = kBufs[b].esize;
        std::vector<uint8_t> host(v.size() * es);
        for (size_t i = 0; i < v.size(); i++) {
            if (es == 4) {
                const int32_t x = static_cast<int32_t>(v[i]);
                std::memcpy(host.data() + i * 4, &x, 4);
            } else {
                std::memcpy(host.data() + i * 8, &v[i], 8);
            }
        }
        if (host.empty()) return;
        CHECK_ACL(aclrtMemcpy(Ptr(b), host.size(), host.data(), host.size(), ACL_MEMCPY_HOST_TO_DEVICE));
    }
    // Greedy token of every logits row of the last call (lowest index wins ties).
    std::vector<int64_t> GreedyRows()
    {
        CHECK_ACL(aclrtSynchronizeStream(stream_));
        const Buf& lg = kBufs[kLogits];
        const size_t bytes = Bytes(kLogits, z_);
        std::vector<uint8_t> host(bytes);
        CHECK_ACL(aclrtMemcpy(host.data(), bytes, Ptr(kLogits), bytes, ACL_MEMCPY_DEVICE_TO_HOST));
        const int64_t vocab = lg.dims[lg.rank - 1].At(z_);
        std::vector<int64_t> best(static_cast<size_t>(z_.tokens), 0);
        for (int64_t r = 0; r < z_.tokens; r++) {
            float bestV = 0.0f;
            for (int64_t v = 0; v < vocab; v++) {
                const size_t at = static_cast<size_t>(r * vocab + v);
                float x;
                if (lg.esize == 4) {
                    std::memcpy(&x, host.data() + at * 4, 4);
                } else {
                    uint16_t h;
                    std::memcpy(&h, host.data() + at * 2, 2);
                    x = lg.dtype == ACL_BF16 ? Bf16ToFloat(h) : HalfToFloat(h);
                }
                if (v == 0 || x > bestV) { best[r] = v; bestV = x; }
            }
        }
        return best;
    }
    void* Alloc(size_t bytes)
    {
        void* p = nullptr;
        CHECK_ACL(aclrtMalloc(&p, std::max<size_t>(bytes, 32), ACL_MEM_MALLOC_HUGE_FIRST));
        owned_.push_back(p);
        return p;
    }
    void* LoadWeight(const std::string& dir, int b)
    {
        const std::string path = dir + "/" + kWeightNames[kBufs[b].ref] + ".bin";
        std::ifstream f(path, std::ios::binary | std::ios::ate);
        if (!f) { std::fprintf(stderr, "error: cannot open weight file %s\n", path.c_str()); std::exit(1); }
        const size_t bytes = static_cast<size_t>(f.tellg());
        if (bytes != MaxBytes(b)) {
            std::fprintf(stderr, "error: %s has %zu bytes, expected %zu\n", path.c_str(), bytes, MaxBytes(b));
            std::exit(1);
        }
        std::vector<char> host(bytes);
        f.seekg(0);
        f.read(host.data(), static_cast<std::streamsize>(bytes));
        void* p = Alloc(bytes);
        CHECK_ACL(aclrtMemcpy(p, bytes, host.data(), bytes, ACL_MEMCPY_HOST_TO_DEVICE));
        return p;
    }
    void* Ptr(int b)
    {
        const Buf& d = kBufs[b];
        if (d.kind != kView) return ptrs_[b];
        const Buf& base = kBufs[d.ref];
        return static_cast<uint8_t*>(Ptr(d.ref)) + d.offset.At(z_) * base.esize;
    }
    aclTensor* Tensor(int b)
    {
        const Buf& d = kBufs[b];
        int64_t dims[4], strides[4];
        int64_t s = 1;
        for (int i = d.rank - 1; i >= 0; i--) {
            dims[i] = d.dims[i].At(z_);
            strides[i] = s;
            s *= dims[i];
        }
        return aclCreateTensor(dims, d.rank, d.dtype, strides, 0, ACL_FORMAT_ND, dims, d.rank, Ptr(b));
    }
    void* Workspace(uint64_t bytes)
    {
        if (bytes > workspaceBytes_) {
            if (workspace_ != nullptr) {
                // Kernels already queued on the stream may still use it.
                CHECK_ACL(aclrtSynchronizeStream(stream_));
                CHECK_ACL(aclrtFree(workspace_));
            }
            CHECK_ACL(aclrtMalloc(&workspace_, bytes, ACL_MEM_MALLOC_HUGE_FIRST));
            workspaceBytes_ = bytes;
        }
        return workspace_;
    }
    void Launch(const Step& s);
#if PANGUC_PARTITIONED
    void InitComms(const std::string& dir);
    void RunCollective(const Step& s);
    std::vector<HcclComm> comms_;
#endif

    Sizes max_;
    Sizes z_{0, 0, 0, 0, 0};  // sizes of the current call
    int64_t past_ = 0;
    int32_t device_;
    aclrtStream stream_ = nullptr;
    std::vector<void*> ptrs_, slots_, owned_;
    void* workspace_ = nullptr;
    uint64_t workspaceBytes_ = 0;
};
"#;

const MAIN: &str = r#"
int main(int argc, char** argv)
{
#if PANGUC_PARTITIONED
    // Every rank runs this program on its own device with the same prompt;
    // the ranks meet in COMM_DIR (a new empty directory they all see).
    const int fixed = 4;
    if (argc < fixed) {
        std::fprintf(stderr, "usage: %s WEIGHT_DIR PROMPT_IDS(comma separated) COMM_DIR [NEW_TOKENS] [MAX_CONTEXT] [DEVICE_ID]\n"
                     "(rank %d of %d; DEVICE_ID defaults to the rank)\n", argv[0], kRank, kDevices);
        return 2;
    }
    const std::string commDir = argv[3];
    const int32_t device = argc > fixed + 2 ? std::atoi(argv[fixed + 2]) : kRank;
#else
    const int fixed = 3;
    if (argc < fixed) {
        std::fprintf(stderr, "usage: %s WEIGHT_DIR PROMPT_IDS(comma separated; prompts separated by ';') [NEW_TOKENS] [MAX_CONTEXT]\n", argv[0]);
        return 2;
    }
    const std::string commDir;
    const int32_t device = 0;
#endif
    // Prompts: token ids separated by commas, prompts by semicolons.
    std::vector<std::vector<int64_t>> prompts(1);
    for (const char* p = argv[2]; *p != '\0';) {
        char* end = nullptr;
        prompts.back().push_back(std::strtoll(p, &end, 10));
        if (end == p) { std::fprintf(stderr, "error: bad prompt `%s`\n", argv[2]); return 2; }
        if (*end == ';') prompts.emplace_back();
        p = (*end == ',' || *end == ';') ? end + 1 : end;
    }
    const int newTokens = argc > fixed ? std::atoi(argv[fixed]) : 16;
    const int64_t maxCtx = argc > fixed + 1 ? std::atoll(argv[fixed + 1]) : 4096;
    // Every rank computes the full logits, so all pick the same tokens;
    // rank 0 prints them.
    const bool print = kRank == 0;
#if PANGUC_BATCHED
    // All prompts as one batch over one paged cache: sequence s owns the
    // blocks s*per .. (s+1)*per - 1 (per: the blocks of a full context).
    // Step 0 prefills every prompt, each later step decodes every sequence.
    const int64_t seqs = static_cast<int64_t>(prompts.size());
    const int64_t per = (maxCtx + kBlockSize - 1) / kBlockSize;
    int64_t promptTokens = 0;
    for (const auto& p : prompts) {
        if (p.empty()) { std::fprintf(stderr, "error: empty prompt in `%s`\n", argv[2]); return 2; }
        promptTokens += static_cast<int64_t>(p.size());
    }
    Model m(Sizes{std::max(promptTokens, seqs), 0, seqs, per, seqs * per}, device);
    m.Init(argv[1], commDir);
    std::vector<int64_t> past(prompts.size(), 0);
    std::vector<std::vector<int64_t>> next = prompts, out(prompts.size());
    for (int i = 0; i < newTokens; i++) {
        std::vector<int64_t> ids;
        StepMeta meta;
        meta.maxBlocks = per;
        meta.queryStartLoc.push_back(0);
        for (int64_t s = 0; s < seqs; s++) {
            if (past[s] + static_cast<int64_t>(next[s].size()) > maxCtx) {
                std::fprintf(stderr, "error: sequence %lld exceeds the context of %lld\n", static_cast<long long>(s),
                             static_cast<long long>(maxCtx));
                return 1;
            }
            for (int64_t t : next[s]) {
                const int64_t pos = past[s]++;
                ids.push_back(t);
                meta.positions.push_back(pos);
                meta.slotMapping.push_back((s * per + pos / kBlockSize) * kBlockSize + pos % kBlockSize);
            }
            meta.contextLens.push_back(past[s]);
            meta.queryStartLoc.push_back(static_cast<int64_t>(ids.size()));
            for (int64_t b = 0; b < per; b++) meta.blockTable.push_back(s * per + b);
        }
        const std::vector<int64_t> rows = m.RunStep(ids, meta);
        for (int64_t s = 0; s < seqs; s++) {
            const int64_t tok = rows[meta.queryStartLoc[s + 1] - 1];
            out[s].push_back(tok);
            next[s] = {tok};
        }
    }
    for (const auto& o : out) {
        for (size_t i = 0; print && i < o.size(); i++) std::printf(i == 0 ? "%lld" : ",%lld", static_cast<long long>(o[i]));
        if (print) std::printf("\n");
    }
#else
    if (prompts.size() != 1) {
        std::fprintf(stderr, "error: this program runs one sequence: give one prompt\n");
        return 2;
    }
    const std::vector<int64_t>& prompt = prompts[0];
    const int64_t maxTokens = std::max<int64_t>(static_cast<int64_t>(prompt.size()), 1);
    Model m(Sizes{maxTokens, maxCtx - maxTokens, 0, 0, 0}, device);
    m.Init(argv[1], commDir);
    int64_t next = m.Forward(prompt);  // prefill
    if (print) std::printf("%lld", static_cast<long long>(next));
    for (int i = 1; i < newTokens; i++) {
        next = m.Forward({next});  // decode over the KV cache
        if (print) std::printf(",%lld", static_cast<long long>(next));
    }
    if (print) std::printf("\n");
#endif
    return 0;
}
"#;

/// `host/panguc_host.cpp` and the stub headers.
pub fn host_files(ap: &AscendProgram) -> Result<Vec<(String, String)>> {
    let p = &ap.program;
    let mut out = vec![];
    let mut s = String::from(
        "// Generated by panguc: ACL host program. Loads the weights, runs prefill and\n\
         // greedy decode by launching the package's operators in program order through\n\
         // their aclnn APIs, and keeps the KV cache on the device.\n\
         #include <algorithm>\n#include <chrono>\n#include <cstdint>\n#include <cstdio>\n#include <cstdlib>\n#include <cstring>\n\
         #include <fstream>\n#include <string>\n#include <thread>\n#include <vector>\n\n#include \"acl/acl.h\"\n#include \"aclnn/acl_meta.h\"\n",
    );
    let mut ops: Vec<(String, usize)> = vec![];
    for dks in &ap.kernels {
        for dk in &dks.kernels {
            let _ = writeln!(s, "#include \"aclnn_{}.h\"", dk.entry);
            ops.push((dk.op_type.clone(), dk.params.len()));
        }
    }
    // Buffers: program buffers, then one per (kernel, temp).
    let mut bufs = String::new();
    let slots = p.slots.max(1);
    for b in &p.buffers {
        let idx = bufs.lines().count();
        let dt = ap.buffer_dtypes[idx];
        let dims: Vec<String> = b.shape.iter().map(lin_dim).collect::<Result<_>>()?;
        let (kind, r) = buffer_kind_code(&b.kind);
        let offset = match &b.kind {
            BufferKind::View { offset, .. } => lin_dim(offset)?,
            _ => ZERO_LIN.into(),
        };
        if b.shape.len() > 4 {
            bail!("buffer `{}` has rank {} (the host program supports up to 4)", b.name, b.shape.len());
        }
        let kinds = ["kInput", "kWeight", "kKvCache", "kSlot", "kView"];
        let _ = writeln!(
            bufs,
            "    {{\"{}\", {}, {}, {}, {{{}}}, {}, {r}, {offset}}},",
            b.name,
            dt.acl(),
            dt.size(),
            b.shape.len(),
            dims.join(", "),
            kinds[kind as usize]
        );
    }
    let mut temp_index = vec![];
    for dks in &ap.kernels {
        let mut ids = vec![];
        for t in &dks.temps {
            ids.push(bufs.lines().count());
            let dims: Vec<String> = t.shape.iter().map(lin).collect::<Result<_>>()?;
            let _ = writeln!(
                bufs,
                "    {{\"{}\", {}, {}, {}, {{{}}}, kTemp, 0, {ZERO_LIN}}},",
                t.name,
                t.dtype.acl(),
                t.dtype.size(),
                t.shape.len(),
                dims.join(", ")
            );
        }
        temp_index.push(ids);
    }
    let mut steps = String::new();
    let mut op_ids = vec![];
    let mut next = 0;
    for dks in &ap.kernels {
        op_ids.push((next..next + dks.kernels.len()).collect::<Vec<_>>());
        next += dks.kernels.len();
    }
    let num_ops = next;
    let comms = Comms::of(ap);
    let arg_buf = |l: &panguc_ir::kernel::Launch, a: &ArgRef| match a {
        ArgRef::Orig(i) => l.args[*i].0 as usize,
        ArgRef::Temp(j) => temp_index[l.kernel][*j],
    };
    for l in &p.launches {
        let dks = &ap.kernels[l.kernel];
        // A collective's host call sits between its packing kernels
        // (position `pre`, possibly after the last one).
        let device_steps = dks.kernels.iter().zip(&op_ids[l.kernel]).map(Some).chain([None]);
        for (di, step) in device_steps.enumerate() {
            if let Some(h) = dks.host.as_ref().filter(|h| h.pre == di) {
                let c = comms.coll_of(l.kernel)?;
                let (send, recv) = (arg_buf(l, &h.send), arg_buf(l, &h.recv));
                let _ = writeln!(steps, "    {{{}, 2, {{{send}, {recv}}}}},", num_ops + c);
            }
            let Some((dk, op)) = step else { continue };
            let args: Vec<String> = dk.params.iter().map(|pa| arg_buf(l, &pa.arg).to_string()).collect();
            if args.len() > MAX_ARGS {
                bail!("{}: {} parameters, more than the host program's {MAX_ARGS}", dk.entry, args.len());
            }
            let _ = writeln!(steps, "    {{{op}, {}, {{{}}}}},", args.len(), args.join(", "));
        }
    }
    // The runtime's types first, then the tables, then the model class.
    let (types, model) = RUNTIME.split_once("class Model {").expect("RUNTIME defines Model");
    if let Some((rank, devices)) = ap.rank {
        let _ = writeln!(s, "#include \"hccl/hccl.h\"\n#include \"hccl/hccl_types.h\"\n");
        let _ = writeln!(
            s,
            "// Rank {rank} of a program partitioned over {devices} devices.\n#define PANGUC_PARTITIONED 1"
        );
        let _ = writeln!(s, "constexpr int kRank = {rank};\nconstexpr int kDevices = {devices};");
    } else {
        s += "#define PANGUC_PARTITIONED 0\nconstexpr int kRank = 0;\nconstexpr int kDevices = 1;\n";
    }
    let _ = writeln!(s, "// Most tensor parameters of one kernel launch.\nconstexpr int kMaxArgs = {MAX_ARGS};");
    s += types;
    let weight_names: Vec<String> = p.weights.iter().map(|w| format!("    \"{}\",", w.name)).collect();
    let inputs: Vec<String> = p.inputs.iter().map(|b| b.0.to_string()).collect();
    if p.inputs.len() < 2 {
        bail!("the program takes {} entry inputs; the host program needs `ids` and `positions` first", p.inputs.len());
    }
    let _ = writeln!(
        s,
        "// Ragged-batch program over paged KV caches of {} tokens per block.\n#define PANGUC_BATCHED {}\n\
         constexpr int64_t kBlockSize = {};",
        p.kv_block_size().unwrap_or(0),
        u8::from(p.is_batched()),
        p.kv_block_size().unwrap_or(1)
    );
    let _ = write!(
        s,
        "\n// Generated tables.\nconst Buf kBufs[] = {{\n{bufs}}};\nconstexpr int kNumBufs = {};\nconstexpr int kNumSlots = {slots};\n\
         const Step kSteps[] = {{\n{steps}}};\nconst char* const kWeightNames[] = {{\n{}\n    \"\"}};\n\
         // Entry inputs: ids, positions (and a batched program's step metadata).\n\
         const int kInputs[] = {{{}}};\nconstexpr int kNumInputs = {};\nconstexpr int kLogits = {};\n\
         // Steps with op >= kNumOps are collectives (kColls[op - kNumOps]).\nconstexpr int kNumOps = {num_ops};\n{}\n",
        bufs.lines().count(),
        weight_names.join("\n"),
        inputs.join(", "),
        inputs.len(),
        p.outputs.first().map(|b| b.0).unwrap_or(0),
        comms.tables(ap)?,
    );
    s += "class Model {";
    s += model;
    s += "\nvoid Model::Launch(const Step& s)\n{\n";
    if ap.rank.is_some() {
        s += "    if (s.op >= kNumOps) {\n        RunCollective(s);\n        return;\n    }\n";
    }
    s += "    aclTensor* t[kMaxArgs] = {};\n    for (int i = 0; i < s.nargs; i++) t[i] = Tensor(s.args[i]);\n    uint64_t ws = 0;\n    aclOpExecutor* ex = nullptr;\n    switch (s.op) {\n";
    for (i, (op, n)) in ops.iter().enumerate() {
        let ts: Vec<String> = (0..*n).map(|j| format!("t[{j}]")).collect();
        let _ = writeln!(
            s,
            "        case {i}:\n            CHECK_ACL(aclnn{op}GetWorkspaceSize({}, &ws, &ex));\n            CHECK_ACL(aclnn{op}(Workspace(ws), ws, ex, stream_));\n            break;",
            ts.join(", ")
        );
    }
    s += "        default:\n            std::fprintf(stderr, \"error: unknown op %d\\n\", s.op);\n            std::exit(1);\n    }\n    for (int i = 0; i < s.nargs; i++) aclDestroyTensor(t[i]);\n}\n";
    if ap.rank.is_some() {
        s += HCCL_RUNTIME;
    }
    s += "}  // namespace\n";
    // `Model` and its helpers live in the anonymous namespace RUNTIME opens.
    s += MAIN;
    out.push(("host/panguc_host.cpp".into(), s));
    out.push(("host/stub/acl/acl.h".into(), ACL_STUB.into()));
    out.push(("host/stub/aclnn/acl_meta.h".into(), ACLNN_META_STUB.into()));
    if ap.rank.is_some() {
        out.push(("host/stub/hccl/hccl_types.h".into(), HCCL_TYPES_STUB.into()));
        out.push(("host/stub/hccl/hccl.h".into(), HCCL_STUB.into()));
    }
    for dks in &ap.kernels {
        for dk in &dks.kernels {
            let params: Vec<String> = dk.params.iter().map(|pa| format!("const aclTensor* {}", pa.name)).collect();
            let op = &dk.op_type;
            out.push((
                format!("host/stub/aclnn_{}.h", dk.entry),
                format!(
                    "// Stub of the header CANN's opbuild generates for `{op}` (declarations only).\n#pragma once\n#include \"aclnn/acl_meta.h\"\n\
                     extern \"C\" {{\naclnnStatus aclnn{op}GetWorkspaceSize({}, uint64_t* workspaceSize, aclOpExecutor** executor);\n\
                     aclnnStatus aclnn{op}(void* workspace, uint64_t workspaceSize, aclOpExecutor* executor, aclrtStream stream);\n}}\n",
                    params.join(", ")
                ),
            ));
        }
    }
    Ok(out)
}

/// Declarations of the ACL runtime functions the host program calls, with
/// the signatures and enum values of CANN's `acl/acl.h` (acl_base.h,
/// acl_rt.h).
const ACL_STUB: &str = r#"// Declaration-only stub of CANN's acl/acl.h for compile checks without CANN.
#pragma once
#include <cstddef>
#include <cstdint>

extern "C" {
typedef int aclError;
typedef void* aclrtStream;
typedef enum {
    ACL_DT_UNDEFINED = -1, ACL_FLOAT = 0, ACL_FLOAT16 = 1, ACL_INT8 = 2, ACL_INT32 = 3, ACL_UINT8 = 4,
    ACL_INT16 = 6, ACL_UINT16 = 7, ACL_UINT32 = 8, ACL_INT64 = 9, ACL_UINT64 = 10, ACL_DOUBLE = 11,
    ACL_BOOL = 12, ACL_STRING = 13, ACL_COMPLEX64 = 16, ACL_COMPLEX128 = 17, ACL_BF16 = 27
} aclDataType;
typedef enum { ACL_FORMAT_UNDEFINED = -1, ACL_FORMAT_NCHW = 0, ACL_FORMAT_NHWC = 1, ACL_FORMAT_ND = 2 } aclFormat;
typedef enum {
    ACL_MEM_MALLOC_HUGE_FIRST = 0, ACL_MEM_MALLOC_HUGE_ONLY = 1, ACL_MEM_MALLOC_NORMAL_ONLY = 2
} aclrtMemMallocPolicy;
typedef enum {
    ACL_MEMCPY_HOST_TO_HOST = 0, ACL_MEMCPY_HOST_TO_DEVICE = 1, ACL_MEMCPY_DEVICE_TO_HOST = 2,
    ACL_MEMCPY_DEVICE_TO_DEVICE = 3
} aclrtMemcpyKind;

aclError aclInit(const char* configPath);
aclError aclFinalize();
aclError aclrtSetDevice(int32_t deviceId);
aclError aclrtResetDevice(int32_t deviceId);
aclError aclrtCreateStream(aclrtStream* stream);
aclError aclrtDestroyStream(aclrtStream stream);
aclError aclrtSynchronizeStream(aclrtStream stream);
aclError aclrtMalloc(void** devPtr, size_t size, aclrtMemMallocPolicy policy);
aclError aclrtFree(void* devPtr);
aclError aclrtMemcpy(void* dst, size_t destMax, const void* src, size_t count, aclrtMemcpyKind kind);
}
"#;

const ACLNN_META_STUB: &str = r#"// Declaration-only stub of CANN's aclnn/acl_meta.h for compile checks without CANN.
#pragma once
#include "acl/acl.h"

extern "C" {
typedef int32_t aclnnStatus;
typedef struct aclTensor aclTensor;
typedef struct aclOpExecutor aclOpExecutor;
aclTensor* aclCreateTensor(const int64_t* viewDims, uint64_t viewDimsNum, aclDataType dataType, const int64_t* stride,
                           int64_t offset, aclFormat format, const int64_t* storageDims, uint64_t storageDimsNum,
                           void* tensorData);
aclnnStatus aclDestroyTensor(const aclTensor* tensor);
}
"#;

/// Compile-check the host program of an emitted project directory with
/// `g++ -fsyntax-only` against the stubs.
pub fn check_host_compiles(project_dir: &Path) -> Result<()> {
    let cxx = std::env::var("PANGUC_SIM_CXX").unwrap_or_else(|_| "g++".into());
    let out = std::process::Command::new(&cxx)
        .args(["-std=c++17", "-fsyntax-only", "-Wall", "-Werror", "-I"])
        .arg(project_dir.join("host/stub"))
        .arg(project_dir.join("host/panguc_host.cpp"))
        .output()?;
    if !out.status.success() {
        bail!("host program does not compile:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The communicators and collective sites of one rank's host program.
/// Communicators are ordered by their member lists, the same order on
/// every rank, so initialising them in table order cannot deadlock.
struct Comms {
    groups: Vec<Vec<usize>>,
    /// Per program kernel with a host collective: its row in `kColls`.
    colls: Vec<(usize, crate::emit::HostCollective)>,
}

impl Comms {
    fn of(ap: &AscendProgram) -> Comms {
        let mut groups: Vec<Vec<usize>> = vec![];
        let mut colls = vec![];
        for (ki, dks) in ap.kernels.iter().enumerate() {
            if let Some(h) = &dks.host {
                if !groups.contains(&h.group) {
                    groups.push(h.group.clone());
                }
                colls.push((ki, h.clone()));
            }
        }
        groups.sort();
        Comms { groups, colls }
    }

    fn coll_of(&self, kernel: usize) -> Result<usize> {
        match self.colls.iter().position(|(k, _)| *k == kernel) {
            Some(i) => Ok(i),
            None => bail!("kernel {kernel} is not a collective"),
        }
    }

    /// `kComms` / `kColls` (empty for a single-device program, which has no
    /// collectives).
    fn tables(&self, ap: &AscendProgram) -> Result<String> {
        let Some((rank, _)) = ap.rank else {
            if !self.colls.is_empty() {
                bail!("the program has collectives but no rank: emit it as one rank of a partitioned program");
            }
            return Ok(String::new());
        };
        let mut s = String::from("struct Comm {\n    const char* name;  // root-info file stem: the member ranks\n    uint32_t size, pos;\n};\n");
        s += "enum CollKind { kAllReduce = 0, kAllGather = 1, kReduceScatter = 2, kAllToAll = 3 };\n";
        s += "struct Coll {\n    CollKind kind;\n    int comm;\n    HcclDataType dtype;\n};\n";
        s += &format!("constexpr int kNumComms = {};\nconst Comm kComms[] = {{\n", self.groups.len().max(1));
        for g in &self.groups {
            let pos = g
                .iter()
                .position(|r| *r == rank)
                .ok_or_else(|| anyhow::anyhow!("rank {rank} is not a member of its collective group {g:?}"))?;
            let name: Vec<String> = g.iter().map(|r| r.to_string()).collect();
            let _ = writeln!(s, "    {{\"{}\", {}, {pos}}},", name.join("-"), g.len());
        }
        s += "};\nconst Coll kColls[] = {\n";
        for (ki, h) in &self.colls {
            use panguc_ir::op::CollectiveKind as K;
            let kind = match h.kind {
                K::AllReduce => "kAllReduce",
                K::AllGather => "kAllGather",
                K::ReduceScatter => "kReduceScatter",
                K::AllToAll => "kAllToAll",
            };
            let comm = self.groups.iter().position(|g| *g == h.group).expect("collected above");
            let dtype = match h.dtype {
                crate::target::DevType::F32 => "HCCL_DATA_TYPE_FP32",
                crate::target::DevType::F16 => "HCCL_DATA_TYPE_FP16",
                crate::target::DevType::BF16 => "HCCL_DATA_TYPE_BFP16",
                crate::target::DevType::I64 => "HCCL_DATA_TYPE_INT64",
                crate::target::DevType::I32 => "HCCL_DATA_TYPE_INT32",
                crate::target::DevType::I8 => "HCCL_DATA_TYPE_INT8",
            };
            let packing = if ap.kernels[*ki].kernels.is_empty() { "" } else { "  // with packing kernels" };
            let _ = writeln!(s, "    {{{kind}, {comm}, {dtype}}},{packing}");
        }
        s += "};\n";
        Ok(s)
    }
}

/// The partitioned host program's HCCL part: communicator set-up through
/// root-info files, and one collective step on the compute stream (after
/// the packing kernels, before the unpacking ones, in program order).
const HCCL_RUNTIME: &str = r#"
// Communicators in kComms order (the same order on every rank). The first
// member of each writes its root info to COMM_DIR (atomically, by rename);
// the others wait for the file, up to 10 minutes.
void Model::InitComms(const std::string& dir)
{
    comms_.assign(kNumComms, nullptr);
    for (int c = 0; c < kNumComms; c++) {
        const Comm& cm = kComms[c];
        const std::string path = dir + "/hccl_" + cm.name + ".rootinfo";
        HcclRootInfo info;
        if (cm.pos == 0) {
            CHECK_ACL(HcclGetRootInfo(&info));
            const std::string tmp = path + ".tmp" + std::to_string(kRank);
            std::ofstream f(tmp, std::ios::binary);
            f.write(reinterpret_cast<const char*>(&info), sizeof(info));
            f.close();
            if (!f || std::rename(tmp.c_str(), path.c_str()) != 0) {
                std::fprintf(stderr, "error: cannot write %s\n", path.c_str());
                std::exit(1);
            }
        } else {
            bool ready = false;
            for (int waited = 0; waited < 600000 && !ready; waited += 10) {
                std::ifstream f(path, std::ios::binary);
                ready = f && f.read(reinterpret_cast<char*>(&info), sizeof(info)).gcount() == sizeof(info);
                if (!ready) std::this_thread::sleep_for(std::chrono::milliseconds(10));
            }
            if (!ready) {
                std::fprintf(stderr, "error: rank %d: no root info at %s after 10 minutes\n", kRank, path.c_str());
                std::exit(1);
            }
        }
        CHECK_ACL(HcclCommInitRootInfo(cm.size, &info, cm.pos, &comms_[c]));
    }
}

// HCCL moves contiguous per-member blocks; the surrounding packing kernels
// have laid the data out that way. Counts are in elements.
void Model::RunCollective(const Step& s)
{
    const Coll& c = kColls[s.op - kNumOps];
    HcclComm comm = comms_[c.comm];
    void* send = Ptr(s.args[0]);
    void* recv = Ptr(s.args[1]);
    const uint64_t sent = Bytes(s.args[0], z_) / kBufs[s.args[0]].esize;
    const uint64_t members = kComms[c.comm].size;
    switch (c.kind) {
        case kAllReduce:
            CHECK_ACL(HcclAllReduce(send, recv, sent, c.dtype, HCCL_REDUCE_SUM, comm, stream_));
            break;
        case kAllGather:
            CHECK_ACL(HcclAllGather(send, recv, sent, c.dtype, comm, stream_));
            break;
        case kReduceScatter:
            CHECK_ACL(HcclReduceScatter(send, recv, sent / members, c.dtype, HCCL_REDUCE_SUM, comm, stream_));
            break;
        case kAllToAll: {
            std::vector<uint64_t> counts(members, sent / members), displs(members);
            for (uint64_t i = 0; i < members; i++) displs[i] = i * (sent / members);
            CHECK_ACL(HcclAlltoAllV(send, counts.data(), displs.data(), c.dtype, recv, counts.data(), displs.data(),
                                    c.dtype, comm, stream_));
            break;
        }
    }
}
"#;

/// Declarations of the HCCL types the host program uses, with the values of
/// CANN's `hccl/hccl_types.h`.
const HCCL_TYPES_STUB: &str = r#"// Declaration-only stub of CANN's hccl/hccl_types.h for compile checks without CANN.
#pragma once
#include <cstdint>

extern "C" {
typedef enum { HCCL_SUCCESS = 0, HCCL_E_PARA = 1, HCCL_E_PTR = 2, HCCL_E_MEMORY = 3, HCCL_E_INTERNAL = 4 } HcclResult;
typedef void* HcclComm;
typedef enum { HCCL_REDUCE_SUM = 0, HCCL_REDUCE_PROD = 1, HCCL_REDUCE_MAX = 2, HCCL_REDUCE_MIN = 3 } HcclReduceOp;
typedef enum {
    HCCL_DATA_TYPE_INT8 = 0, HCCL_DATA_TYPE_INT16 = 1, HCCL_DATA_TYPE_INT32 = 2, HCCL_DATA_TYPE_FP16 = 3,
    HCCL_DATA_TYPE_FP32 = 4, HCCL_DATA_TYPE_INT64 = 5, HCCL_DATA_TYPE_UINT64 = 6, HCCL_DATA_TYPE_BFP16 = 11
} HcclDataType;
const uint32_t HCCL_ROOT_INFO_BYTES = 4108;
typedef struct HcclRootInfoDef {
    char internal[HCCL_ROOT_INFO_BYTES];
} HcclRootInfo;
}
"#;

/// Declarations of the HCCL functions the host program calls (CANN's
/// `hccl/hccl.h` signatures).
const HCCL_STUB: &str = r#"// Declaration-only stub of CANN's hccl/hccl.h for compile checks without CANN.
#pragma once
#include "acl/acl.h"
#include "hccl/hccl_types.h"

extern "C" {
HcclResult HcclGetRootInfo(HcclRootInfo* rootInfo);
HcclResult HcclCommInitRootInfo(uint32_t nRanks, const HcclRootInfo* rootInfo, uint32_t rank, HcclComm* comm);
HcclResult HcclCommDestroy(HcclComm comm);
HcclResult HcclAllReduce(void* sendBuf, void* recvBuf, uint64_t count, HcclDataType dataType, HcclReduceOp op,
                         HcclComm comm, aclrtStream stream);
HcclResult HcclAllGather(void* sendBuf, void* recvBuf, uint64_t sendCount, HcclDataType dataType, HcclComm comm,
                         aclrtStream stream);
HcclResult HcclReduceScatter(void* sendBuf, void* recvBuf, uint64_t recvCount, HcclDataType dataType, HcclReduceOp op,
                             HcclComm comm, aclrtStream stream);
HcclResult HcclAlltoAllV(const void* sendBuf, const void* sendCounts, const void* sdispls, HcclDataType sendType,
                         const void* recvBuf, const void* recvCounts, const void* rdispls, HcclDataType recvType,
                         HcclComm comm, aclrtStream stream);
}
"#;
