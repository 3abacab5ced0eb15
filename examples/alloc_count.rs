//! `extblk` with a counting allocator: the daemon exactly as shipped, except that every heap
//! allocation (`alloc`, `alloc_zeroed`, `realloc`) is counted and the total printed to stderr as
//! `allocations=N` when it exits. `scripts/instructions.sh` runs it twice with different request
//! counts; the difference over the difference of requests is the allocations per request.
//! Not part of the shipped binary: an example, built only by that script.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use clap::Parser;

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator, which upholds
// GlobalAlloc's contract; the counter has no effect on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is System's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `ptr` came from this allocator, that is from System, with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from System with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    extblk::fatal::install_panic_hook();
    let cli = extblk::cli::Cli::parse();
    let code = match extblk::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("extblk: {}", extblk::cli::error_chain(&e));
            1
        }
    };
    eprintln!("allocations={}", ALLOCATIONS.load(Ordering::Relaxed));
    std::process::exit(code);
}
