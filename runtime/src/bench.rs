//! Machine measurements for the benchmark: the memory roofline (streaming
//! read bandwidth), the fp32 FMA, BF16 and int8 dot-product peaks, the disk's
//! sequential write bandwidth, and the process's peak resident memory. Each is measured in the same run as the model timings it is
//! compared with.

use std::time::Instant;

/// Bytes per second of a streaming read of a `bytes`-long buffer by
/// `threads` threads, far larger than the caches: the best over every read
/// pattern tried (plain loads, and wide loads with software prefetch at
/// distances around the one the generated kernels use), each best of `reps`.
///
/// The roofline is the fastest the memory can be read, so it must not
/// understate what the kernels themselves reach: a plain summing loop,
/// which leaves the stream to the hardware prefetcher, measured ~0.8 of
/// what the decode GEMV kernels (which issue `prefetcht0` ahead of their
/// panel stream) read on the same machine, and made them look faster than
/// their roofline.
pub fn stream_read_bandwidth(bytes: usize, threads: usize, reps: usize) -> f64 {
    let threads = threads.max(1);
    let words = bytes / 8;
    // Non-zero contents so the pages are really backed.
    let buf: Vec<u64> = (0..words as u64).collect();
    // Each thread's part starts on a cache line of its own.
    let chunk = words.div_ceil(threads).next_multiple_of(8);
    let mut best = f64::MAX;
    let mut sink = 0u64;
    for pattern in ReadPattern::available() {
        for _ in 0..reps.max(1) {
            let t0 = Instant::now();
            let sums: Vec<u64> = std::thread::scope(|s| {
                let handles: Vec<_> = buf.chunks(chunk).map(|part| s.spawn(move || pattern.sum(part))).collect();
                handles.into_iter().map(|h| h.join().expect("reader thread")).collect()
            });
            best = best.min(t0.elapsed().as_secs_f64());
            sink = sink.wrapping_add(sums.iter().fold(0, |a, b| a.wrapping_add(*b)));
        }
    }
    std::hint::black_box(sink);
    (words * 8) as f64 / best
}

/// One way of reading a buffer once, summing it so the reads cannot be
/// optimised away.
#[derive(Clone, Copy, Debug, PartialEq)]
enum ReadPattern {
    /// Four scalar lanes, left to the hardware prefetcher.
    Plain,
    /// 256-bit loads, two cache lines per iteration, with `prefetcht0`
    /// this many bytes ahead (0: none).
    #[cfg(target_arch = "x86_64")]
    Wide { prefetch_bytes: usize },
}

impl ReadPattern {
    /// The patterns this CPU can run. The prefetch distances bracket the
    /// one the streaming GEMM kernels use (4 KiB); which is fastest varies
    /// between runs of the same machine.
    fn available() -> Vec<ReadPattern> {
        let mut v = vec![ReadPattern::Plain];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            for prefetch_bytes in [0, 1024, 4096, 8192, 16384] {
                v.push(ReadPattern::Wide { prefetch_bytes });
            }
        }
        v
    }

    fn sum(self, xs: &[u64]) -> u64 {
        match self {
            ReadPattern::Plain => sum_words(xs),
            // SAFETY: `available` offers `Wide` only when the CPU has AVX2.
            #[cfg(target_arch = "x86_64")]
            ReadPattern::Wide { prefetch_bytes } => unsafe { sum_words_avx2(xs, prefetch_bytes) },
        }
    }
}

/// Four independent lanes so the adds keep up with memory.
fn sum_words(xs: &[u64]) -> u64 {
    let mut acc = [0u64; 4];
    let mut it = xs.chunks_exact(4);
    for c in &mut it {
        for i in 0..4 {
            acc[i] = acc[i].wrapping_add(c[i]);
        }
    }
    let tail: u64 = it.remainder().iter().fold(0, |a, b| a.wrapping_add(*b));
    acc.iter().fold(tail, |a, b| a.wrapping_add(*b))
}

/// Sums `xs` two 64-byte lines at a time with four 256-bit accumulators,
/// prefetching `prefetch_bytes` ahead (never past the end of `xs`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_words_avx2(xs: &[u64], prefetch_bytes: usize) -> u64 {
    use std::arch::x86_64::*;
    const WORDS_PER_STEP: usize = 16; // two cache lines
    let steps = xs.len() / WORDS_PER_STEP;
    let ahead = prefetch_bytes / 8;
    let p = xs.as_ptr();
    let mut acc = [_mm256_setzero_si256(); 4];
    for s in 0..steps {
        let at = s * WORDS_PER_STEP;
        if ahead > 0 && at + ahead + WORDS_PER_STEP <= xs.len() {
            // SAFETY: in bounds (checked above); a prefetch never faults.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(p.add(at + ahead) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(p.add(at + ahead + 8) as *const i8);
            }
        }
        for (i, a) in acc.iter_mut().enumerate() {
            // SAFETY: `at + 4 * i + 4 <= steps * WORDS_PER_STEP <= xs.len()`.
            let v = unsafe { _mm256_loadu_si256(p.add(at + 4 * i) as *const __m256i) };
            *a = _mm256_add_epi64(*a, v);
        }
    }
    let mut lanes = [0u64; 16];
    for (i, a) in acc.iter().enumerate() {
        // SAFETY: `lanes[4 * i..]` holds four u64s.
        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().add(4 * i) as *mut __m256i, *a) };
    }
    let tail = sum_words(&xs[steps * WORDS_PER_STEP..]);
    lanes.iter().fold(tail, |a, b| a.wrapping_add(*b))
}

/// Peak fp32 FLOP/s of `threads` threads doing independent FMAs (2 flops
/// each) on the widest vectors the host supports.
pub fn fma_peak_flops(threads: usize) -> f64 {
    peak_rate(threads, &|| fma_loop(PEAK_ITERS))
}

/// Iterations of each peak loop (10 independent instructions each): long
/// enough to hide the thread start-up, short enough to repeat.
const PEAK_ITERS: u64 = 20_000_000;
/// Repeats of each peak measurement; the best counts, since a shared
/// machine only ever slows a run down.
const PEAK_REPS: usize = 3;

/// Operations per second of `threads` threads each running `work` (which
/// returns the operations it performed), best of [`PEAK_REPS`].
fn peak_rate(threads: usize, work: &(dyn Fn() -> u64 + Sync)) -> f64 {
    let threads = threads.max(1);
    (0..PEAK_REPS)
        .map(|_| {
            let t0 = Instant::now();
            let ops: u64 = std::thread::scope(|s| {
                let hs: Vec<_> = (0..threads).map(|_| s.spawn(work)).collect();
                hs.into_iter().map(|h| h.join().expect("peak thread")).sum()
            });
            ops as f64 / t0.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

/// Returns the flops performed.
fn fma_loop(iters: u64) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            return unsafe { fma_avx2(iters) };
        }
    }
    let mut acc = [1.0f32; 8];
    for _ in 0..iters {
        for a in &mut acc {
            *a = a.mul_add(0.999_999, 1e-7);
        }
    }
    std::hint::black_box(acc);
    iters * 8 * 2
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_avx2(iters: u64) -> u64 {
    use std::arch::x86_64::*;
    // 10 independent accumulators cover the FMA latency x 2 pipes.
    let (m, c) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    let mut a = [_mm256_set1_ps(1.0); 10];
    for _ in 0..iters {
        for x in &mut a {
            *x = _mm256_fmadd_ps(*x, m, c);
        }
    }
    std::hint::black_box(a);
    iters * 10 * 8 * 2
}

/// Peak fp32 FLOP/s of `threads` threads doing independent AVX-512 BF16
/// dot products (`vdpbf16ps` on zmm: 16 lanes x 2 products x 2 flops), or
/// `None` when the CPU has no AVX-512 BF16.
pub fn bf16_dot_peak_flops(threads: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")) {
            return None;
        }
        // SAFETY: the features were just detected.
        Some(peak_rate(threads, &|| unsafe { dpbf16_loop(PEAK_ITERS) }))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = threads;
        None
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dpbf16_loop(iters: u64) -> u64 {
    use std::arch::x86_64::*;
    // 10 independent accumulators cover the latency x pipes.
    let (a, b) = (
        _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.5), _mm512_set1_ps(0.25)),
        _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3), _mm512_set1_ps(-1e-3)),
    );
    let mut acc = [_mm512_set1_ps(1.0); 10];
    for _ in 0..iters {
        for x in &mut acc {
            *x = _mm512_dpbf16_ps(*x, a, b);
        }
    }
    std::hint::black_box(acc);
    iters * 10 * 16 * 2 * 2
}

/// Peak int8 multiply-add rate of `threads` threads, in operations per
/// second (one int8 x int8 product and its addition count 2, like a FMA's
/// flops), and the instruction measured. With AVX-512 VNNI it is
/// `vpdpbusd` on zmm (64 products per instruction), what the int8 GEMMs of
/// the `avx512-bf16` tier use; otherwise AVX2 `vpmaddwd` on ymm after
/// widening to i16 (16 exact products per instruction), what the baseline
/// tier's int8 GEMMs use. `None` without AVX2.
pub fn int8_dot_peak_ops(threads: usize) -> Option<(f64, &'static str)> {
    #[cfg(target_arch = "x86_64")]
    {
        let (run, name): (unsafe fn(u64) -> u64, &'static str) =
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni") {
                (dpbusd_loop, "vpdpbusd")
            } else if is_x86_feature_detected!("avx2") {
                (pmaddwd_loop, "vpmaddwd")
            } else {
                return None;
            };
        // SAFETY: `run` needs only the features just detected.
        Some((peak_rate(threads, &|| unsafe { run(PEAK_ITERS) }), name))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = threads;
        None
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn dpbusd_loop(iters: u64) -> u64 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm512_set1_epi8(3), _mm512_set1_epi8(-2));
    // 10 independent accumulators cover the latency x pipes.
    let mut acc = [_mm512_setzero_si512(); 10];
    for _ in 0..iters {
        for x in &mut acc {
            *x = _mm512_dpbusd_epi32(*x, a, b);
        }
    }
    std::hint::black_box(acc);
    iters * 10 * 64 * 2
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn pmaddwd_loop(iters: u64) -> u64 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm256_set1_epi16(3), _mm256_set1_epi16(-2));
    let mut acc = [_mm256_setzero_si256(); 10];
    for _ in 0..iters {
        for x in &mut acc {
            *x = _mm256_add_epi32(*x, _mm256_madd_epi16(a, b));
        }
    }
    std::hint::black_box(acc);
    iters * 10 * 16 * 2
}

/// Sequential write bandwidth of the file system holding `dir`: `bytes`
/// written in 8 MB blocks to a temporary file and synced to the device
/// (bytes/s). The file is removed.
pub fn disk_write_bandwidth(dir: &std::path::Path, bytes: usize) -> std::io::Result<f64> {
    use std::io::Write;
    let path = dir.join(format!(".panguc-disk-bench-{}", std::process::id()));
    let block: Vec<u8> = (0..8 << 20).map(|i: usize| (i * 131 % 251) as u8).collect();
    let t0 = Instant::now();
    let result = (|| {
        let mut f = std::fs::File::create(&path)?;
        let mut left = bytes;
        while left > 0 {
            let n = left.min(block.len());
            f.write_all(&block[..n])?;
            left -= n;
        }
        f.sync_all()
    })();
    let seconds = t0.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    result?;
    Ok(bytes as f64 / seconds)
}

/// Reset the peak-resident-set counter (Linux `clear_refs` 5), so a later
/// [`peak_rss_bytes`] covers only what runs after this. False if the
/// kernel does not allow it.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The 1-minute load average (other processes compete for the cores).
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

/// Peak resident set size of this process (VmHWM), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measurements_are_positive() {
        assert!(stream_read_bandwidth(1 << 20, 2, 1) > 0.0);
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            assert!(int8_dot_peak_ops(1).is_some_and(|(ops, _)| ops > 0.0));
        }
        assert!(peak_rss_bytes().unwrap_or(1) > 0);
        assert_eq!(sum_words(&[1, 2, 3, 4, 5]), 15);
        let dir = tempfile::tempdir().unwrap();
        assert!(disk_write_bandwidth(dir.path(), 1 << 20).unwrap() > 0.0);
    }

    /// A pattern that skipped part of the buffer would report a bandwidth
    /// it never read: every pattern must sum every word, tails included.
    #[test]
    fn every_read_pattern_reads_every_word() {
        for len in [0usize, 5, 16, 17, 1000, 4099] {
            let xs: Vec<u64> = (1..=len as u64).map(|i| i * 0x9e37_79b9).collect();
            let want = xs.iter().fold(0u64, |a, b| a.wrapping_add(*b));
            for pattern in ReadPattern::available() {
                assert_eq!(pattern.sum(&xs), want, "{pattern:?} over {len} words");
            }
        }
    }
}
