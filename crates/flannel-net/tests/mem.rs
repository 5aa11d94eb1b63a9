//! glibc's mmap threshold stays where flanneld pins it. Its own test binary without
//! a harness: the tunable is process-wide, the allocations of other tests would blur
//! what `mmapped_bytes` sees, and a harness thread would allocate from another
//! arena than the main thread (where flanneld's control plane runs).

use flannel_net::mem;

/// Allocates and frees a block of `len` bytes; true if glibc gave it its own
/// mapping (seen in `mmapped_bytes` while it lived).
fn mapped_on_its_own(len: usize) -> bool {
    let before = mem::mmapped_bytes().expect("glibc");
    let block = std::hint::black_box(vec![1u8; len]);
    let during = mem::mmapped_bytes().expect("glibc");
    drop(block);
    during >= before + len
}

fn main() {
    freed_large_blocks_are_still_mapped_on_their_own();
    println!("test result: ok. 1 passed; 0 failed; 0 ignored (mem: freed_large_blocks_are_still_mapped_on_their_own)");
}

fn freed_large_blocks_are_still_mapped_on_their_own() {
    const MIB: usize = 1024 * 1024;
    // Pinned before any large block, as flanneld does first thing.
    assert!(mem::pin_mmap_threshold());
    // Unpinned, freeing this block would move glibc's threshold up to 1 MiB and
    // every smaller block after it would come from the heap (and its pages stay
    // there after it is freed).
    assert!(mapped_on_its_own(4 * MIB));
    // (A block just over the threshold may still be cut from the free top of the
    // heap, which glibc trims only beyond 128 KiB: hence twice the threshold.)
    for len in [MIB / 2, MIB, 2 * mem::MMAP_THRESHOLD, 2 * MIB] {
        assert!(
            mapped_on_its_own(len),
            "a {len}-byte block came from the heap with the threshold pinned"
        );
    }
    assert!(
        !mapped_on_its_own(mem::MMAP_THRESHOLD / 4),
        "small blocks stay on the heap"
    );
}
