//! Fallible allocation for every buffer whose size comes from input (a manifest field, a chunk's
//! header, an argument), so that a lie or a typo is an [`Error::OutOfMemory`] naming the size and
//! its source instead of an abort (`Vec::with_capacity` and `vec![x; n]` abort the whole process
//! when the allocator says no, and Python then exits with code 134 and no message).
//!
//! Two guards, both needed: a request above the machine's physical memory is refused outright
//! (with Linux overcommit such a request may "succeed" and the process is later OOM-killed while
//! the buffer is filled), and anything below it goes through `try_reserve_exact`, which turns an
//! allocator refusal (e.g. under `ulimit -v` / `prlimit --as`) into an error.

use std::sync::OnceLock;

use crate::error::{Error, Result};

/// Total physical memory in bytes (`MemTotal` of `/proc/meminfo`), or `None` where unknown; then
/// only the allocator's own refusal guards.
pub fn physical_memory() -> Option<u64> {
    static TOTAL: OnceLock<Option<u64>> = OnceLock::new();
    *TOTAL.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        kib.checked_mul(1024)
    })
}

/// `1234567` → `"1.2 MB (1234567 bytes)"`: short for a reader, exact for a bug report.
pub fn human_bytes(bytes: u128) -> String {
    const UNITS: [&str; 7] = ["bytes", "kB", "MB", "GB", "TB", "PB", "EB"];
    let mut x = bytes as f64;
    let mut unit = 0;
    while x >= 1000.0 && unit + 1 < UNITS.len() {
        x /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{x:.1} {} ({bytes} bytes)", UNITS[unit])
    }
}

fn refuse(bytes: u128, what: String, reason: String) -> Error {
    Error::OutOfMemory { bytes, what, reason }
}

/// Check that `bytes` could be allocated on this machine at all; `what` (built only on failure)
/// says what the memory is for and where its size came from.
pub fn check_bytes(bytes: u128, what: impl FnOnce() -> String) -> Result<()> {
    if bytes > isize::MAX as u128 {
        return Err(refuse(bytes, what(), "larger than the address space".into()));
    }
    match physical_memory() {
        Some(total) if bytes > u128::from(total) => Err(refuse(
            bytes,
            what(),
            format!("more than this machine's {} of memory", human_bytes(u128::from(total))),
        )),
        _ => Ok(()),
    }
}

/// Bytes taken by `n` elements of `T`, exact even where it overflows `usize`.
pub fn bytes_of<T>(n: u128) -> u128 {
    n.saturating_mul(std::mem::size_of::<T>() as u128)
}

/// Convert an element count from input (`u64`, `u128`) to `usize`, refusing what cannot exist.
pub fn elems<T>(n: impl Into<u128>, what: impl FnOnce() -> String) -> Result<usize> {
    let n = n.into();
    check_bytes(bytes_of::<T>(n), what)?;
    usize::try_from(n).map_err(|_| Error::Invalid("element count exceeds usize".into()))
}

/// Grow `v` so it can hold `len` elements without reallocating, or fail with a clear error.
pub fn try_reserve_total<T>(v: &mut Vec<T>, len: usize, what: impl FnOnce() -> String) -> Result<()> {
    if len <= v.capacity() {
        return Ok(());
    }
    let bytes = bytes_of::<T>(len as u128);
    let mut what = Some(what);
    let mut describe = || what.take().map_or_else(String::new, |f| f());
    check_bytes(bytes, &mut describe)?;
    v.try_reserve_exact(len - v.len())
        .map_err(|e| refuse(bytes, describe(), format!("the allocator refused ({e}); is a memory limit (ulimit -v) set?")))
}

/// `v` resized to exactly `len` elements (new ones are `fill`), allocating fallibly.
pub fn try_resize<T: Clone>(v: &mut Vec<T>, len: usize, fill: T, what: impl FnOnce() -> String) -> Result<()> {
    try_reserve_total(v, len, what)?;
    v.resize(len, fill);
    Ok(())
}

/// `vec![fill; len]`, but an error instead of an abort when it cannot be had.
pub fn try_vec<T: Clone>(len: usize, fill: T, what: impl FnOnce() -> String) -> Result<Vec<T>> {
    let mut v = Vec::new();
    try_resize(&mut v, len, fill, what)?;
    Ok(v)
}

/// `Vec::with_capacity(len)`, fallibly.
pub fn try_with_capacity<T>(len: usize, what: impl FnOnce() -> String) -> Result<Vec<T>> {
    let mut v = Vec::new();
    try_reserve_total(&mut v, len, what)?;
    Ok(v)
}

/// `a * b` elements as a `usize`, refusing overflow and sizes no machine here could hold.
pub fn product<T>(a: u128, b: u128, what: impl FnOnce() -> String) -> Result<usize> {
    elems::<T>(a.saturating_mul(b), what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_requests_are_errors_that_say_how_much_and_for_what() {
        let e = try_vec::<u64>(usize::MAX / 2, 0, || "the test's buffer".into()).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, Error::OutOfMemory { .. }), "{text}");
        assert!(text.contains("the test's buffer") && text.contains("bytes"), "{text}");
        let e = product::<u32>(u128::from(u64::MAX), 1 << 40, || "overflowing product".into()).unwrap_err();
        assert!(e.to_string().contains("overflowing product"), "{e}");
    }

    #[test]
    fn ordinary_requests_succeed_and_fill() {
        let v = try_vec(5, 7u8, || unreachable!()).unwrap();
        assert_eq!(v, vec![7; 5]);
        let mut w = vec![1u32, 2];
        try_resize(&mut w, 4, 9, || unreachable!()).unwrap();
        assert_eq!(w, vec![1, 2, 9, 9]);
        try_resize(&mut w, 1, 0, || unreachable!()).unwrap();
        assert_eq!(w, vec![1]);
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(12), "12 bytes");
        assert_eq!(human_bytes(34_359_738_368), "34.4 GB (34359738368 bytes)");
    }
}
