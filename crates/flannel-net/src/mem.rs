//! Giving freed heap memory back to the kernel.

/// Returns the free pages of every malloc arena to the kernel (glibc's
/// `malloc_trim(0)`). glibc only shrinks the heap from its top on its own, so a
/// burst of short-lived allocations (a 5000-lease listing, netlink dumps, a full
/// reconcile plan) stays in the process's RSS after it is freed. Cheap (a walk
/// over the free lists); call it after such a burst, not on every change. A no-op
/// with other C libraries.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and madvises glibc's own free chunks; it takes
    // no pointers from us and is safe to call at any time from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}
