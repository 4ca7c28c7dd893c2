//! The thread pool shared by every multithreaded kernel, capped by `SAECORE_NUM_THREADS`.

use std::sync::OnceLock;

/// Run `f` inside saecore's rayon pool. The pool size comes from `SAECORE_NUM_THREADS` when set
/// (so a user can leave cores to PyTorch or to DataLoader workers), else from the machine.
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    let pool = POOL.get_or_init(|| {
        let threads = std::env::var("SAECORE_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("saecore-{i}"))
            .build()
            .expect("building the saecore thread pool")
    });
    pool.install(f)
}

/// Number of threads saecore's pool runs with.
pub fn num_threads() -> usize {
    install(rayon::current_num_threads)
}
