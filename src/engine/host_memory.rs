//! Host memory policy for CPU forward passes.
//!
//! Why: a CPU forward pass allocates a few intermediates proportional to its tokens, e.g. the
//! fused gate/up projection of 5 000 tokens × 3 072 columns in f32 = 61 MB. With glibc's defaults
//! every such block got fresh pages: blocks above 32 MB (its highest mmap threshold) are mapped
//! and unmapped per allocation, and the engine thread's own arena grows in 64 MB heaps that are
//! unmapped again as soon as they empty. So each large matmul first page-faulted its whole output
//! in: at 8 callers (passes of ~5 000 tokens) a `rerank bench` run took 1.5 M page faults against
//! 0.13 M at one caller (~2 500 tokens), and scored ~25 % fewer pairs/s (`bench/README.md`).
//! Serving every block from one heap that never shrinks lets each pass reuse the pages the
//! previous one freed; the process keeps its largest pass's memory, which it needs again at the
//! next busy moment anyway.

/// Makes glibc keep freed blocks of any size for reuse: one arena (the main heap, so no per-thread
/// heaps to unmap), no mmap for large blocks, no trimming. Call it before the process starts any
/// thread: threads that already allocated keep their own arenas. Returns whether the policy is in
/// effect (false on other C libraries, where it does nothing).
pub fn reuse_freed_pass_buffers() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes glibc's allocator parameters, valid at any time and from
        // any thread; blocks already allocated stay valid and are freed as before.
        unsafe {
            let one_arena = libc::mallopt(libc::M_ARENA_MAX, 1) == 1;
            let no_mmap = libc::mallopt(libc::M_MMAP_MAX, 0) == 1;
            // The largest value the parameter takes: the heap top is never given back.
            let no_trim = libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) == 1;
            one_arena && no_mmap && no_trim
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// The no-mmap part of the policy (the one-arena part acts only on threads that start after
    /// it, which a test harness's threads did not; `rerank bench` reports its effect as page
    /// faults, `bench/README.md`).
    #[test]
    fn large_blocks_come_from_the_heap_once_the_policy_is_set() {
        assert!(reuse_freed_pass_buffers());
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        let mapped = || unsafe { libc::mallinfo2() }.hblkhd;
        let before = mapped();
        // Above glibc's largest mmap threshold (32 MB), below a thread arena's heap (64 MB).
        let size = 40 << 20;
        let block = vec![1u8; size];
        let during = mapped();
        std::hint::black_box(&block);
        drop(block);
        assert!(
            during < before + size,
            "a 40 MB block was mmapped: {before} -> {during} bytes in mmapped blocks"
        );
    }
}
