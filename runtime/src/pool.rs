//! The worker pool that runs kernel tiles.
//!
//! A decode step is ~100 short launches, so waking sleeping threads for
//! each one (futex round trips, scheduler latency) would cost as much as
//! the kernels. Here the calling thread works too, idle workers spin for a
//! short while before parking, and tiles are claimed in chunks from an
//! atomic counter, so a worker that the OS preempts does not hold up the
//! others. Which thread runs a tile never changes its result: each tile is
//! computed by the same code from the same inputs.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// `f(worker, begin, end)` over a tile range; worker 0 is the caller.
type TileFn<'a> = dyn Fn(usize, i64, i64) + Sync + 'a;

/// Busy-wait iterations before a waiting thread starts yielding its core:
/// a few microseconds, enough for the next launch of a step.
const SPIN: u32 = 2_000;
/// Yields before an idle worker parks (on a loaded machine a yield gives
/// the core to another runnable thread, e.g. a preempted worker).
const YIELDS: u32 = 200;

/// One `run`: its tile function and counters. A worker that arrives after
/// every chunk was claimed finds `next` exhausted and never calls `f`, so
/// `f` only has to outlive the claimed chunks, which `run` waits for.
struct Job {
    f: *const TileFn<'static>,
    tiles: i64,
    chunk: i64,
    next: AtomicI64,
    done: AtomicI64,
}

// SAFETY: `f` is Sync and only called for claimed chunks while `run` waits.
unsafe impl Send for Job {}
unsafe impl Sync for Job {}

impl Job {
    /// Claim and run chunks until none is left.
    fn work(&self, w: usize) {
        loop {
            let lo = self.next.fetch_add(self.chunk, Ordering::Relaxed);
            if lo >= self.tiles {
                return;
            }
            let hi = (lo + self.chunk).min(self.tiles);
            // SAFETY: a claimed chunk runs before `run` returns (see Job).
            unsafe { (*self.f)(w, lo, hi) };
            self.done.fetch_add(hi - lo, Ordering::Release);
        }
    }
}

struct Shared {
    /// Incremented once per job; workers look for work when it changes.
    epoch: AtomicU64,
    job: Mutex<Option<Arc<Job>>>,
    shutdown: AtomicBool,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

pub struct WorkerPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    threads: usize,
    /// One job at a time (engines of a batch may share a pool).
    submit: Mutex<()>,
}

impl std::fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPool").field("threads", &self.threads).finish()
    }
}

impl WorkerPool {
    /// A pool of `threads` threads in total (the caller plus `threads - 1`
    /// workers).
    pub fn new(threads: usize) -> std::io::Result<WorkerPool> {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: Mutex::new(None),
            shutdown: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut workers = vec![];
        for w in 1..threads {
            let s = shared.clone();
            workers.push(std::thread::Builder::new().name(format!("panguc-worker-{w}")).spawn(move || worker(&s, w))?);
        }
        Ok(WorkerPool { shared, workers, threads, submit: Mutex::new(()) })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Run `f` over `0..tiles` on every thread; returns when all tiles ran.
    pub fn run(&self, tiles: i64, f: &TileFn<'_>) {
        if tiles <= 0 {
            return;
        }
        if self.threads == 1 || tiles == 1 {
            f(0, 0, tiles);
            return;
        }
        let _one_job = self.submit.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // About four chunks per thread: balance without much contention.
        let chunk = (tiles / (4 * self.threads as i64)).max(1);
        let f: *const TileFn<'_> = f;
        // SAFETY: the lifetime is erased; see `Job` for why `f` outlives
        // every call made through it.
        let f = unsafe { std::mem::transmute::<*const TileFn<'_>, *const TileFn<'static>>(f) };
        let job = Arc::new(Job { f, tiles, chunk, next: AtomicI64::new(0), done: AtomicI64::new(0) });
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(job.clone());
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        job.work(0);
        let mut spins = 0u32;
        while job.done.load(Ordering::Acquire) != tiles {
            // A worker still holds a chunk; if it was preempted, give it
            // the core rather than spinning on it.
            if spins < SPIN {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

fn worker(s: &Shared, w: usize) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0u32;
        loop {
            if s.shutdown.load(Ordering::Acquire) {
                return;
            }
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            if spins < SPIN + YIELDS {
                spins += 1;
                if spins < SPIN {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
                continue;
            }
            // Park until the next job (or shutdown).
            let g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            let g = s
                .wake
                .wait_while(g, |_| s.epoch.load(Ordering::SeqCst) == seen && !s.shutdown.load(Ordering::SeqCst))
                .unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_sub(1, Ordering::SeqCst);
            drop(g);
            spins = 0;
        }
        let job = s.job.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(job) = job {
            job.work(w);
        }
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tile_runs_exactly_once() {
        for threads in [1, 2, 3] {
            let pool = WorkerPool::new(threads).unwrap();
            for tiles in [1i64, 7, 100, 1000] {
                let hits: Vec<AtomicI64> = (0..tiles).map(|_| AtomicI64::new(0)).collect();
                pool.run(tiles, &|_, lo, hi| {
                    for t in lo..hi {
                        hits[t as usize].fetch_add(1, Ordering::Relaxed);
                    }
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "threads {threads}, tiles {tiles}");
            }
        }
    }

    #[test]
    fn workers_park_and_wake() {
        let pool = WorkerPool::new(2).unwrap();
        let sum = AtomicI64::new(0);
        pool.run(10, &|_, lo, hi| {
            sum.fetch_add(hi - lo, Ordering::Relaxed);
        });
        // Long enough for the worker to park.
        std::thread::sleep(std::time::Duration::from_millis(50));
        pool.run(10, &|_, lo, hi| {
            sum.fetch_add(hi - lo, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 20);
    }
}
