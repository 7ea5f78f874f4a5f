//! The `lockstep` binary: parses the command line, runs the command, and turns its outcome
//! into an exit code (0 ok, 2 bad config, 1 any other failure).

use std::process::ExitCode;

use libmimalloc_sys as mi;

#[global_allocator]
static GLOBAL: Mimalloc = Mimalloc;

/// mimalloc as the global allocator: measurably cheaper than glibc malloc on the proxy's many
/// small per-request allocations (see BENCHMARKS.md). A block is asked for plainly when the
/// alignment wanted is one every mimalloc block of that size has (16 bytes from 16 bytes up,
/// as `malloc`'s contract): the aligned call, which the `mimalloc` crate makes for every
/// allocation, serves blocks over 1 KiB by over-allocating (callgrind: ~540 instructions for
/// the proxy's per-request exchange against ~150).
struct Mimalloc;

/// The alignment of every mimalloc block of at least this size (`MI_MAX_ALIGN_SIZE`).
const PLAIN_ALIGN: usize = 16;

/// Whether a plain mimalloc block of `size` bytes has the alignment `align`.
fn plain(align: usize, size: usize) -> bool {
    align <= PLAIN_ALIGN && align <= size
}

// SAFETY: every path hands the layout's size and alignment to mimalloc, which returns null or
// a block of at least that size and alignment (plain blocks: see `plain`), frees any of its
// blocks with `mi_free`, and reallocates keeping the contents up to the smaller size.
unsafe impl std::alloc::GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if plain(layout.align(), layout.size()) {
            unsafe { mi::mi_malloc(layout.size()).cast() }
        } else {
            unsafe { mi::mi_malloc_aligned(layout.size(), layout.align()).cast() }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if plain(layout.align(), layout.size()) {
            unsafe { mi::mi_zalloc(layout.size()).cast() }
        } else {
            unsafe { mi::mi_zalloc_aligned(layout.size(), layout.align()).cast() }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        unsafe { mi::mi_free(ptr.cast()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        if plain(layout.align(), new_size) {
            unsafe { mi::mi_realloc(ptr.cast(), new_size).cast() }
        } else {
            unsafe { mi::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast() }
        }
    }
}

use clap::Parser;
use lockstep::cli::Cli;
use lockstep::config::ConfigErrors;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match lockstep::commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(errors) = e.downcast_ref::<ConfigErrors>() {
                eprintln!("lockstep: the config has {} problem(s):", errors.0.len());
                eprintln!("{errors}");
                ExitCode::from(2)
            } else {
                eprintln!("lockstep: {e:#}");
                ExitCode::from(1)
            }
        }
    }
}
