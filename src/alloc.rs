//! The C allocator of a long-running daemon (glibc): at most two malloc arenas, and freed
//! heap given back to the kernel once a burst of work is over. Rust's allocations go through
//! malloc; after a node drains (hundreds of pods removed, a big pull done) glibc keeps the
//! freed pages unless asked (`malloc_trim`), so berthd's RSS would stay at its high-water
//! mark. A trim walks the free lists once (well under a millisecond for berthd's heap), on a
//! blocking thread, at most once per second and only after work that freed much.

use std::sync::OnceLock;
use std::time::Duration;

use tokio::sync::Notify;

/// How long the trimmer waits after the first request (later ones join it).
const COALESCE: Duration = Duration::from_secs(1);

fn wake() -> &'static Notify {
    static WAKE: OnceLock<Notify> = OnceLock::new();
    WAKE.get_or_init(Notify::new)
}

/// Caps glibc's malloc arenas at two. Call first thing in `main`, before any thread exists:
/// glibc's default (8 per CPU, one per thread that allocates while the others are busy)
/// keeps memory in every arena that a short-lived blocking or namespace thread touched;
/// berthd's allocations are small and its threads mostly wait, so contention on two arenas
/// costs nothing measurable.
pub fn limit_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator parameters; the caller runs before any thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Asks for a trim after the current burst of work (see the module's doc).
pub fn trim_soon() {
    wake().notify_one();
}

/// Starts the task that trims on [`trim_soon`]; needs a tokio runtime.
pub fn spawn_trimmer() {
    tokio::spawn(async {
        loop {
            wake().notified().await;
            tokio::time::sleep(COALESCE).await;
            let _ = tokio::task::spawn_blocking(trim).await;
        }
    });
}

/// Gives free heap back to the kernel; whether any was given back (always false where the C
/// library is not glibc).
fn trim() -> bool {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory to the kernel; it is thread safe.
    unsafe {
        libc::malloc_trim(0) == 1
    }
    #[cfg(not(target_env = "gnu"))]
    false
}

#[cfg(all(test, target_env = "gnu"))]
mod tests {
    use super::*;

    #[test]
    fn freed_heap_goes_back_to_the_kernel() {
        // 64 MiB in blocks small enough for the heap (not mmap), then freed.
        let blocks: Vec<Vec<u8>> = (0..16 * 1024).map(|i| vec![i as u8; 4096]).collect();
        drop(std::hint::black_box(blocks));
        assert!(
            trim(),
            "malloc_trim gave nothing back after 64 MiB were freed"
        );
    }
}
