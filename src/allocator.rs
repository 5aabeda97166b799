//! The process's memory allocator: mimalloc, built without transparent huge pages and keeping
//! freed memory for reuse instead of returning it to the operating system.
//!
//! Every tensor operation on the CPU backends allocates its output, and one training step of a
//! 42M-parameter model allocates and frees buffers of megabytes thousands of times. With glibc's
//! malloc, buffers above its mmap threshold go straight back to the kernel and the next one is
//! a fresh mapping whose every page faults and is zeroed on first touch (a `[1024, 512] ×
//! [512, 1536]` product took 12.5 ms on two threads instead of 7.1 ms, and a quarter of an OPSA
//! step was the kernel zeroing pages). mimalloc reuses memory, but with its defaults it returns
//! freed memory to the kernel after 10 ms and asks for transparent huge pages, so the faults came
//! back as 2 MiB pages zeroed on every reuse (training pass 85 tokens/s instead of 127 with
//! glibc). Without huge pages (the crate's `no_thp` feature) and with a 1 s purge delay (mimalloc
//! waits ten times that for its arenas) it ran at 141; see docs/benchmarks.md.
//!
//! A delay is still too short for an on-policy loop: generation runs for seconds (minutes at
//! real sizes) between two training passes, so the training pass's buffers were returned during
//! generation and faulted in again in every pass (a tenth of the pass in the kernel; training
//! pass median 204 → 227 tokens/s, five alternating runs each, with memory never returned). So
//! freed memory is kept: the process stays at its peak resident size, which the memory plan
//! (`opsa train --plan`) has to budget for anyway.
//!
//! `MIMALLOC_PURGE_DELAY` in the environment (milliseconds; `-1`: never) overrides the delay.
//!
//! Included by the binary and by the benchmarks (`#[path]`); the libraries leave the choice of
//! allocator to whoever links them.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (mimalloc.h; 15 in both v2 and v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Call first thing in `main`: keep freed memory (never purge) unless the environment says
/// otherwise.
pub fn configure() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option; mimalloc reads it when it next purges.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
    }
}
