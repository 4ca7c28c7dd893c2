//! Time the stages of mining an existing feature store, without Python in the way (a profiling aid
//! for `perf record`; performance claims come from `bench/index.py`, which runs the baselines too).
//!
//!     cargo run --release -p saecore --example mine_timing -- STORE [repeats]
//!
//! Environment: `SAECORE_NUM_THREADS` caps the threads, `PASS1_ONLY=1` times pass 1 alone, `K` sets
//! the top-k size (default 20).
#![allow(clippy::print_stdout)]

use std::sync::atomic::AtomicU64;
use std::time::Instant;

use saecore::mining::{mine, MineOptions};
use saecore::store::FeatureStore;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1) else {
        eprintln!("usage: mine_timing STORE [repeats]");
        std::process::exit(2);
    };
    let repeats: usize = args.get(2).map_or(3, |s| s.parse().expect("repeats must be an integer"));
    let k: usize = std::env::var("K").map_or(20, |s| s.parse().expect("K must be an integer"));
    let pass1_only = std::env::var("PASS1_ONLY").is_ok_and(|v| v == "1");
    let store = FeatureStore::open(std::path::Path::new(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    for _ in 0..repeats {
        let seconds = |run: &dyn Fn()| {
            let t = Instant::now();
            run();
            t.elapsed().as_secs_f64()
        };
        let mine_with = |second_pass: bool| {
            let options = MineOptions { k, second_pass, ..Default::default() };
            mine(&store, &options, &AtomicU64::new(0)).expect("mine");
        };
        let pass1 = seconds(&|| mine_with(false));
        if pass1_only {
            println!("pass1 {pass1:.3} s");
            continue;
        }
        let decode = seconds(&|| store.verify().expect("verify"));
        let both = seconds(&|| mine_with(true));
        println!("read+decode {decode:.3} s  pass1 {pass1:.3} s  both passes {both:.3} s");
    }
}
