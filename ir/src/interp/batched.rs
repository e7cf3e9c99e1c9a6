//! Reference semantics of the ragged-batch ops: the paged KV write, paged
//! attention, and the MoE over a batch as init routing, grouped matmul and
//! finalize routing. Integer tensors arrive as i64 (the interpreter's
//! integer storage) whatever their IR dtype.

use super::attention;
use crate::batch::check_sequences;
use crate::tensor::{Tensor, TensorData};

type R<T> = Result<T, String>;

/// `cache[num_blocks, block_size, kv_heads, head_dim]` with row `t` of `new`
/// stored at slot `slots[t]`.
pub fn kv_cache_write(cache: &Tensor, new: &Tensor, slots: &Tensor) -> R<Tensor> {
    let n_slots = cache.shape[0] * cache.shape[1];
    let row = cache.shape[2] * cache.shape[3];
    let mut written = vec![false; n_slots];
    let mut targets = Vec::with_capacity(slots.numel());
    for (t, &slot) in slots.as_i64().iter().enumerate() {
        if slot < 0 || slot as usize >= n_slots {
            return Err(format!("token {t}: slot {slot} is outside the cache of {n_slots} slots"));
        }
        let slot = slot as usize;
        if std::mem::replace(&mut written[slot], true) {
            return Err(format!("token {t}: slot {slot} is written twice in one step"));
        }
        targets.push(slot);
    }
    // Float caches hold f32, int8 (C8) caches hold their integers as i64.
    fn store<T: Copy>(cache: &[T], new: &[T], targets: &[usize], row: usize) -> Vec<T> {
        let mut out = cache.to_vec();
        for (src, &slot) in new.chunks(row).zip(targets) {
            out[slot * row..(slot + 1) * row].copy_from_slice(src);
        }
        out
    }
    let shape = cache.shape.clone();
    match (&cache.data, &new.data) {
        (TensorData::F32(c), TensorData::F32(n)) => Ok(Tensor::f32(shape, store(c, n, &targets, row))),
        (TensorData::I64(c), TensorData::I64(n)) => Ok(Tensor::i64(shape, store(c, n, &targets, row))),
        _ => Err("kv_cache_write: new rows and cache differ in element kind".into()),
    }
}

/// The first `len` tokens of one sequence's paged cache as a contiguous
/// `[len, kv_heads, head_dim]` tensor, read through its block-table row.
pub fn gather_context(cache: &Tensor, blocks: &[i64], len: usize) -> Tensor {
    let (block_size, kv_heads, d) = (cache.shape[1], cache.shape[2], cache.shape[3]);
    let row = kv_heads * d;
    let c = cache.as_f32();
    let mut out = Vec::with_capacity(len * row);
    for p in 0..len {
        let slot = blocks[p / block_size] as usize * block_size + p % block_size;
        out.extend_from_slice(&c[slot * row..(slot + 1) * row]);
    }
    Tensor::f32(vec![len, kv_heads, d], out)
}

/// `(q, k_cache, v_cache, block_table, query_start_loc, context_lens)`:
/// each sequence's rows attend causally to its own context. Defined as the
/// contiguous attention op over the context read through the block table,
/// row `i` at position `context_len - q_len + i`, so the paged and the
/// per-sequence paths share one attention rule.
pub fn paged_attention(a: &[&Tensor], scale: f32) -> R<Tensor> {
    let (q, kc, vc, table, qsl, ctx) = (a[0], a[1], a[2], a[3], a[4], a[5]);
    let (tokens, heads, d) = (q.shape[0], q.shape[1], q.shape[2]);
    let (num_blocks, block_size) = (kc.shape[0], kc.shape[1]);
    let max_blocks = table.shape[1];
    let (table, qsl, ctx) = (table.as_i64(), qsl.as_i64(), ctx.as_i64());
    check_sequences(qsl, ctx, table, max_blocks, block_size, num_blocks, tokens).map_err(|e| e.to_string())?;
    let row = heads * d;
    let qv = q.as_f32();
    let mut out = Vec::with_capacity(tokens * row);
    for s in 0..ctx.len() {
        let (start, end) = (qsl[s] as usize, qsl[s + 1] as usize);
        let (len, q_len) = (ctx[s] as usize, end - start);
        let blocks = &table[s * max_blocks..(s + 1) * max_blocks];
        let k = gather_context(kc, blocks, len);
        let v = gather_context(vc, blocks, len);
        let q_s = Tensor::f32(vec![q_len, heads, d], qv[start * row..end * row].to_vec());
        let pos = Tensor::i64(vec![q_len], (0..q_len).map(|i| (len - q_len + i) as i64).collect());
        out.extend(attention(&q_s, &k, &v, &pos, scale).into_f32());
    }
    Ok(Tensor::f32(q.shape.clone(), out))
}

/// `(x[T, H], ids[T, k]) -> (expanded_x[T*k, H], expanded_row_idx[T*k], counts[E])`:
/// a stable counting sort of the pairs `p = t*k + j` by expert.
pub fn moe_init_routing(x: &Tensor, ids: &Tensor, experts: usize) -> R<Vec<Tensor>> {
    let (h, k) = (x.shape[1], ids.shape[1]);
    let ids = ids.as_i64();
    let mut counts = vec![0usize; experts];
    for (p, &e) in ids.iter().enumerate() {
        if e < 0 || e as usize >= experts {
            return Err(format!("row {} picks expert {e}, outside 0..{experts}", p / k.max(1)));
        }
        counts[e as usize] += 1;
    }
    // Start of each expert's block of expanded rows.
    let mut next: Vec<usize> = counts
        .iter()
        .scan(0, |acc, &c| {
            let start = *acc;
            *acc += c;
            Some(start)
        })
        .collect();
    let xv = x.as_f32();
    let mut expanded = vec![0.0f32; ids.len() * h];
    let mut dest = Vec::with_capacity(ids.len());
    for (p, &e) in ids.iter().enumerate() {
        let r = next[e as usize];
        next[e as usize] += 1;
        let t = p / k;
        expanded[r * h..(r + 1) * h].copy_from_slice(&xv[t * h..(t + 1) * h]);
        dest.push(r as i64);
    }
    Ok(vec![
        Tensor::f32(vec![ids.len(), h], expanded),
        Tensor::i64(vec![ids.len()], dest),
        Tensor::i64(vec![experts], counts.into_iter().map(|c| c as i64).collect()),
    ])
}

/// `(x[R, K], w[E, N, K], counts[E]) -> [R, N]`: each expert's contiguous
/// block of rows times that expert's weight, transposed.
pub fn grouped_matmul(x: &Tensor, w: &Tensor, counts: &Tensor) -> R<Tensor> {
    let (rows, kk) = (x.shape[0], x.shape[1]);
    let n = w.shape[1];
    let counts = counts.as_i64();
    if let Some(c) = counts.iter().find(|&&c| c < 0) {
        return Err(format!("expert count {c} is negative"));
    }
    let total: i64 = counts.iter().sum();
    if total != rows as i64 {
        return Err(format!("expert counts sum to {total} but there are {rows} rows"));
    }
    let (xv, wv) = (x.as_f32(), w.as_f32());
    let mut out = Vec::with_capacity(rows * n);
    let mut r = 0;
    for (e, &c) in counts.iter().enumerate() {
        let we = &wv[e * n * kk..(e + 1) * n * kk];
        for xrow in xv[r * kk..(r + c as usize) * kk].chunks(kk) {
            out.extend(we.chunks(kk).map(|wrow| xrow.iter().zip(wrow).map(|(a, b)| a * b).sum::<f32>()));
        }
        r += c as usize;
    }
    Ok(Tensor::f32(vec![rows, n], out))
}

/// `(expanded_y[T*k, H], weights[T, k], expanded_row_idx[T*k], skips...) -> [T, H]`.
pub fn moe_finalize_routing(a: &[&Tensor]) -> R<Tensor> {
    let (y, w, idx) = (a[0], a[1], a[2]);
    let (rows, h) = (y.shape[0], y.shape[1]);
    let (t, k) = (w.shape[0], w.shape[1]);
    let (yv, wv, idx) = (y.as_f32(), w.as_f32(), idx.as_i64());
    let mut out = vec![0.0f32; t * h];
    for (p, (&r, &wt)) in idx.iter().zip(wv).enumerate() {
        if r < 0 || r as usize >= rows {
            return Err(format!("expanded_row_idx {r} of pair {p} is outside 0..{rows}"));
        }
        let src = &yv[r as usize * h..(r as usize + 1) * h];
        for (o, v) in out[(p / k) * h..(p / k + 1) * h].iter_mut().zip(src) {
            *o += wt * v;
        }
    }
    for skip in &a[3..] {
        for (o, v) in out.iter_mut().zip(skip.as_f32()) {
            *o += v;
        }
    }
    Ok(Tensor::f32(vec![t, h], out))
}

/// `moe_grouped_ffn(x, weights, ids, w_gate_up[E, 2I, H], w_down[E, H, I],
/// shared_gate_up, shared_down, residual)`: the batched MoE block spelled
/// out as the named ops, so it means exactly what the chain means.
pub fn moe_grouped_ffn(a: &[&Tensor]) -> R<Tensor> {
    use crate::kernels as k;
    let (x, weights, ids, gate_up, down) = (a[0], a[1], a[2], a[3], a[4]);
    let (experts, i) = (gate_up.shape[0], gate_up.shape[1] / 2);
    let init = moe_init_routing(x, ids, experts)?;
    let (rows, row_idx, counts) = (&init[0], &init[1], &init[2]);
    let gate = grouped_matmul(rows, &k::slice(gate_up, 1, 0, i), counts)?;
    let up = grouped_matmul(rows, &k::slice(gate_up, 1, i, 2 * i), counts)?;
    let act = k::binary(&gate, &up, |g, u| k::silu(g) * u)?;
    let y = grouped_matmul(&act, down, counts)?;
    // The shared expert: silu(x sg^T) * (x su^T), then its down projection.
    let (shared_gate_up, shared_down) = (a[5], a[6]);
    let si = shared_gate_up.shape[0] / 2;
    let sgu = k::matmul(x, shared_gate_up, true)?;
    let last = sgu.shape.len() - 1;
    let shared_act = k::binary(&k::slice(&sgu, last, 0, si), &k::slice(&sgu, last, si, 2 * si), |g, u| k::silu(g) * u)?;
    let shared = k::matmul(&shared_act, shared_down, true)?;
    moe_finalize_routing(&[&y, weights, row_idx, &shared, a[7]])
}
