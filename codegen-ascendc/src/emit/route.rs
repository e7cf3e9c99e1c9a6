//! `MoeRoute`: the MoE dispatch, a stable counting sort of the (token,
//! group) slots by expert.
//!
//! The sort is sequential by nature, but per slot it needs only a few
//! scalar accesses to UB, which are cheap; scalar GM accesses (one data
//! cache miss each) are what made a one-block, one-access-per-slot version
//! slow. So `ids` and the weights stream through UB in DMA chunks and every
//! output is staged in UB and written with contiguous DMA.
//!
//! Blocks cannot synchronise, so each block counts all the ids itself and
//! then owns whole tiles: tile i is a range of `TILE` slots of `slotRow`
//! and the same range of rows of `rows`/`rowWeight`. In a stable counting
//! sort the row of slot s is `offsets[id[s]]` plus the number of earlier
//! slots with the same id, i.e. a running per-expert cursor, so a tile's
//! `slotRow` is one pass over its own slots (cursors started from the counts
//! before the tile), and its rows are one pass over all slots that follows
//! only the few experts whose rows meet the tile.

use super::vector::{tiles_fields, vector_kernel, vector_source};
use super::{r32, Ctx, DeviceKernels, Role, TExpr, TilingField};
use crate::target::{DevType, Target};
use anyhow::{bail, Result};

/// Slots (and rows) per tile: one tile is one block's unit of work. A
/// multiple of 16, so every tile's outputs start on a 64-byte GM line.
const TILE: u64 = 2048;
/// Ids (and weights) per DMA chunk; divides [`TILE`], so a tile starts on a
/// chunk boundary (where the counting pass takes its snapshot).
const CHUNK: u64 = 1024;

const ROUTE: &str = r#"
// Stable counting sort of the slots s = token * groups + g by expert:
// offsets[e]..offsets[e+1] are expert e's sorted rows; row r holds token
// rows[r] with weight rowWeight[r]; slotRow[s] is the row slot s went to.
// Tile i owns slots [i * tile, (i + 1) * tile) of slotRow and the same
// rows of rows/rowWeight; every block counts all the ids itself, block 0 writes
// offsets. Per slot only scalar UB accesses; GM moves by DMA.
class {{CLASS}} {
public:
    __aicore__ inline {{CLASS}}() {}
    __aicore__ inline void Init(GM_ADDR w, GM_ADDR ids, GM_ADDR offsets, GM_ADDR rows, GM_ADDR rowWeight, GM_ADDR slotRow, const {{TILING}}& t)
    {
        slots = t.slots;
        groups = t.groups;
        experts = t.experts;
        tile = t.tile;
        chunk = t.chunk;
{{RANGE}}
        wGm.SetGlobalBuffer((__gm__ float*)w, slots);
        idGm.SetGlobalBuffer((__gm__ int64_t*)ids, slots);
        offGm.SetGlobalBuffer((__gm__ int64_t*)offsets, experts + 1);
        rowsGm.SetGlobalBuffer((__gm__ int64_t*)rows, slots);
        rwGm.SetGlobalBuffer((__gm__ float*)rowWeight, slots);
        srGm.SetGlobalBuffer((__gm__ int64_t*)slotRow, slots);
        pipe.InitBuffer(idBuf, chunk * sizeof(int64_t));
        pipe.InitBuffer(wBuf, chunk * sizeof(float));
        pipe.InitBuffer(cntBuf, (experts + 1) * sizeof(int64_t));
        pipe.InitBuffer(curBuf, experts * sizeof(int64_t));
        pipe.InitBuffer(rowCurBuf, experts * sizeof(int64_t));
        pipe.InitBuffer(srBuf, tile * sizeof(int64_t));
        pipe.InitBuffer(rowsBuf, tile * sizeof(int64_t));
        pipe.InitBuffer(rwBuf, tile * sizeof(float));
        pipe.InitBuffer(tailBuf, 32);
        idL = idBuf.Get<int64_t>();
        cnt = cntBuf.Get<int64_t>();
        cur = curBuf.Get<int64_t>();
    }
    __aicore__ inline void Process()
    {
        const bool writesOffsets = GetBlockIdx() == 0;
        if (start >= end && !writesOffsets) return;
        Count(start < end ? start * tile : slots);
        if (writesOffsets) Store(offGm, 0, cnt, experts + 1);
        for (uint32_t i = start; i < end; i++) {
            const uint32_t b = i * tile, e = MinU(b + tile, slots);
            SlotRows(b, e);
            Rows(b, e);
        }
    }

private:
    template <HardEvent E>
    __aicore__ static inline void Sync()
    {
        event_t id = static_cast<event_t>(GetTPipePtr()->FetchEventID(E));
        SetFlag<E>(id);
        WaitFlag<E>(id);
    }

    // Gating always yields valid ids; clamping keeps memory safe anyway.
    __aicore__ inline uint32_t Expert(uint32_t i)
    {
        int64_t e = idL.GetValue(i);
        if (e < 0) e = 0;
        if (e >= static_cast<int64_t>(experts)) e = experts - 1;
        return static_cast<uint32_t>(e);
    }

    // cnt = offsets (cnt[e + 1] counts expert e, then prefix sums) and
    // cur[e] = the row of expert e's first slot at or after `from` (a
    // multiple of the chunk, or `slots`).
    __aicore__ inline void Count(uint32_t from)
    {
        for (uint32_t e = 0; e <= experts; e++) cnt.SetValue(e, 0);
        for (uint32_t c0 = 0; c0 < slots; c0 += chunk) {
            if (c0 == from) Snapshot();
            const uint32_t n = MinU(chunk, slots - c0);
            Load(idL, idGm, c0, n);
            for (uint32_t i = 0; i < n; i++) {
                const uint32_t e = Expert(i) + 1;
                cnt.SetValue(e, cnt.GetValue(e) + 1);
            }
        }
        if (from >= slots) Snapshot();
        for (uint32_t e = 0; e < experts; e++) cnt.SetValue(e + 1, cnt.GetValue(e + 1) + cnt.GetValue(e));
        for (uint32_t e = 0; e < experts; e++) cur.SetValue(e, cur.GetValue(e) + cnt.GetValue(e));
    }
    __aicore__ inline void Snapshot()
    {
        for (uint32_t e = 0; e < experts; e++) cur.SetValue(e, cnt.GetValue(e + 1));
    }

    // slotRow[b, e): each slot takes its expert's next row.
    __aicore__ inline void SlotRows(uint32_t b, uint32_t e)
    {
        LocalTensor<int64_t> sr = srBuf.Get<int64_t>();
        for (uint32_t c0 = b; c0 < e; c0 += chunk) {
            const uint32_t n = MinU(chunk, e - c0);
            Load(idL, idGm, c0, n);
            for (uint32_t i = 0; i < n; i++) {
                const uint32_t x = Expert(i);
                const int64_t r = cur.GetValue(x);
                cur.SetValue(x, r + 1);
                sr.SetValue(c0 - b + i, r);
            }
        }
        Store(srGm, b, sr, e - b);
    }

    // rows/rowWeight[b, e): one pass over the slots in order, following
    // only experts lo..hi (those whose rows meet [b, e)), until every row
    // of the tile is filled.
    __aicore__ inline void Rows(uint32_t b, uint32_t e)
    {
        uint32_t lo = 0;
        while (cnt.GetValue(lo + 1) <= b) lo++;
        uint32_t hi = lo;
        while (cnt.GetValue(hi + 1) < e) hi++;
        LocalTensor<int64_t> rc = rowCurBuf.Get<int64_t>();
        LocalTensor<int64_t> rowsL = rowsBuf.Get<int64_t>();
        LocalTensor<float> rwL = rwBuf.Get<float>();
        LocalTensor<float> wL = wBuf.Get<float>();
        for (uint32_t x = lo; x <= hi; x++) rc.SetValue(x, cnt.GetValue(x));
        uint32_t left = e - b;
        for (uint32_t c0 = 0; c0 < slots && left > 0; c0 += chunk) {
            const uint32_t n = MinU(chunk, slots - c0);
            Load(idL, idGm, c0, n);
            Load(wL, wGm, c0, n);
            for (uint32_t i = 0; i < n && left > 0; i++) {
                const uint32_t x = Expert(i);
                if (x < lo || x > hi) continue;
                const int64_t r = rc.GetValue(x);
                rc.SetValue(x, r + 1);
                if (r < static_cast<int64_t>(b) || r >= static_cast<int64_t>(e)) continue;
                rowsL.SetValue(static_cast<uint32_t>(r) - b, static_cast<int64_t>((c0 + i) / groups));
                rwL.SetValue(static_cast<uint32_t>(r) - b, wL.GetValue(i));
                left--;
            }
        }
        Store(rowsGm, b, rowsL, e - b);
        Store(rwGm, b, rwL, e - b);
    }

    // x[0, n) = g[off, off + n), ready for the scalar unit.
    template <typename U>
    __aicore__ inline void Load(const LocalTensor<U>& x, const GlobalTensor<U>& g, uint32_t off, uint32_t n)
    {
        // The scalar unit is done with x before the DMA overwrites it.
        Sync<HardEvent::S_MTE2>();
{{LOAD}}
    }

    // g[off, off + n) = y[0, n), which the scalar unit wrote; y may be
    // rewritten by the scalar unit afterwards.
    template <typename U>
    __aicore__ inline void Store(const GlobalTensor<U>& g, uint32_t off, const LocalTensor<U>& y, uint32_t n)
    {
        Sync<HardEvent::S_MTE3>();
{{STORE}}
        Sync<HardEvent::MTE3_S>();
    }

    TPipe pipe;
    TBuf<TPosition::VECCALC> idBuf, wBuf, cntBuf, curBuf, rowCurBuf, srBuf, rowsBuf, rwBuf, tailBuf;
    LocalTensor<int64_t> idL, cnt, cur;
    GlobalTensor<float> wGm, rwGm;
    GlobalTensor<int64_t> idGm, offGm, rowsGm, srGm;
    uint32_t slots = 0, groups = 0, experts = 0, tile = 0, chunk = 0, start = 0, end = 0;
};

extern "C" __global__ __aicore__ void {{ENTRY}}(GM_ADDR w, GM_ADDR ids, GM_ADDR offsets, GM_ADDR rows, GM_ADDR rowWeight, GM_ADDR slotRow, GM_ADDR workspace, GM_ADDR tiling)
{
    REGISTER_TILING_DEFAULT({{TILING}});
    GET_TILING_DATA(t, tiling);
    {{CLASS}} op;
    op.Init(w, ids, offsets, rows, rowWeight, slotRow, t);
    op.Process();
}
"#;

/// 910B: `DataCopyPad` moves a partial last block exactly.
const LOAD_910B: &str = "        if (n * sizeof(U) % 32 == 0) {
            DataCopy(x, g[off], n);
        } else {
            DataCopyExtParams p{1, static_cast<uint32_t>(n * sizeof(U)), 0, 0, 0};
            DataCopyPadExtParams<U> pad{false, 0, 0, static_cast<U>(0)};
            DataCopyPad(x, g[off], p, pad);
        }
        Sync<HardEvent::MTE2_S>();";
const STORE_910B: &str = "        if (n * sizeof(U) % 32 == 0) {
            DataCopy(g[off], y, n);
        } else {
            DataCopyExtParams p{1, static_cast<uint32_t>(n * sizeof(U)), 0, 0, 0};
            DataCopyPad(g[off], y, p);
        }";
/// 310P (no `DataCopyPad`): whole blocks by DMA; a partial last block of a
/// load (only at the end of an input) is read element by element.
const LOAD_310P: &str = "        constexpr uint32_t per = 32 / sizeof(U);
        const uint32_t body = n / per * per;
        if (body > 0) DataCopy(x, g[off], body);
        Sync<HardEvent::MTE2_S>();
        for (uint32_t i = body; i < n; i++) x.SetValue(i, g.GetValue(off + i));";
/// A partial last block of a store is written as the store's last whole
/// block, rolled back over bytes this core just wrote with the same values,
/// so GM is written by DMA only (scalar stores go through the data cache and
/// are written back per 64-byte line, overwriting another core's bytes).
/// Only a store shorter than one block is written element by element: that
/// is the last tile (tiles start on 64-byte lines, so no other core writes
/// its lines) or a whole output.
const STORE_310P: &str = "        constexpr uint32_t per = 32 / sizeof(U);
        const uint32_t body = n / per * per;
        if (body > 0) DataCopy(g[off], y, body);
        if (body < n && n >= per) {
            LocalTensor<U> last = tailBuf.Get<U>();
            for (uint32_t i = 0; i < per; i++) last.SetValue(i, y.GetValue(n - per + i));
            Sync<HardEvent::S_MTE3>();
            DataCopy(g[off + n - per], last, per);
        } else {
            for (uint32_t i = body; i < n; i++) g.SetValue(off + i, y.GetValue(i));
        }";

/// `MoeRoute (weights[T, G] f32, ids[T, G] i64, offsets_out[E+1] i64,
/// rows_out[T*G] i64, row_weight_out[T*G] f32, slot_row_out[T*G] i64)`.
pub(crate) fn route(ctx: &Ctx) -> Result<DeviceKernels> {
    let g = ctx.cdim(0, 1, "groups")?;
    let e = ctx.cdim(2, 0, "experts + 1")?.saturating_sub(1);
    if e == 0 {
        bail!("{}: no experts", ctx.k.name);
    }
    let want = [DevType::F32, DevType::I64, DevType::I64, DevType::I64, DevType::F32, DevType::I64];
    for (i, w) in want.iter().enumerate() {
        if ctx.dt[i] != *w {
            bail!("{}: routing argument {i} must be {w} on the device, found {}", ctx.k.name, ctx.dt[i]);
        }
    }
    let slots = ctx.dim(3, 0)?;
    let entry = ctx.entry("");
    let (load, store) = match ctx.target() {
        Target::Ascend910B => (LOAD_910B, STORE_910B),
        Target::Ascend310P => (LOAD_310P, STORE_310P),
    };
    let src = vector_source(
        &entry,
        "MoE dispatch: stable counting sort of the slots by expert.",
        ROUTE,
        &[("LOAD", load.into()), ("STORE", store.into())],
    );
    let tiles = slots.clone().ceil_div(TExpr::c(TILE));
    let mut fields = tiles_fields(&tiles);
    fields.extend([
        TilingField::u32("slots", slots),
        TilingField::u32("groups", TExpr::c(g)),
        TilingField::u32("experts", TExpr::c(e)),
        TilingField::u32("tile", TExpr::c(TILE)),
        TilingField::u32("chunk", TExpr::c(CHUNK)),
    ]);
    let ub =
        r32(CHUNK * 8) + r32(CHUNK * 4) + r32((e + 1) * 8) + 2 * r32(e * 8) + 2 * r32(TILE * 8) + r32(TILE * 4) + 32;
    let mut dk = vector_kernel(entry, src, fields, &tiles, ub);
    dk.params = vec![
        ctx.param("w", 0, Role::Input),
        ctx.param("ids", 1, Role::Input),
        ctx.param("offsets", 2, Role::Output),
        ctx.param("rows", 3, Role::Output),
        ctx.param("rowWeight", 4, Role::Output),
        ctx.param("slotRow", 5, Role::Output),
    ];
    Ok(DeviceKernels { kernels: vec![dk], temps: vec![], host: None })
}
