//! rexec's allocator in the static musl build (`cargo rexec-musl`), shared by `rexec` and
//! `rexec-full`: musl's malloc maps every block above 128 KiB, and its groups of mid-sized
//! blocks, and unmaps them when freed, so streaming output (a 256 KiB read buffer per chunk)
//! paid an mmap, 64 page faults and an munmap per chunk; [`Cached`] keeps freed blocks from
//! 4 KiB to 16 MiB for reuse, and small blocks come from a start-up arena. glibc builds keep
//! glibc's allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

/// Start-up arena: small blocks are carved from this zeroed static buffer by a bump pointer
/// and never reused (freeing one is a no-op). rexec's start (argument parsing, the
/// environment, the request) made ~30 small allocations that musl's malloc served with 19
/// `mmap` and 13 `munmap` calls; from the arena they cost nothing but the first touch of
/// each page. Once it is used up, small blocks go to musl as before.
const ARENA: usize = 256 * 1024;

#[repr(C, align(4096))]
struct Arena(UnsafeCell<[u8; ARENA]>);

// SAFETY: the buffer is only handed out in disjoint pieces (one compare-exchange on
// `ARENA_NEXT` per piece), never read or written here.
unsafe impl Sync for Arena {}

static ARENA_BUF: Arena = Arena(UnsafeCell::new([0; ARENA]));
static ARENA_NEXT: AtomicUsize = AtomicUsize::new(0);

fn arena_base() -> usize {
    ARENA_BUF.0.get() as usize
}

/// True if `p` was handed out by the arena.
fn in_arena(p: *mut u8) -> bool {
    let a = p as usize;
    a >= arena_base() && a < arena_base() + ARENA
}

/// A fresh (still zeroed) piece of the arena, or null when it does not fit.
fn arena_alloc(layout: Layout) -> *mut u8 {
    let base = arena_base();
    let mut cur = ARENA_NEXT.load(Ordering::Relaxed);
    loop {
        // Alignment is a power of two ≤ the buffer's 4096 (checked by the caller).
        let start = (base + cur + layout.align() - 1) & !(layout.align() - 1);
        let Some(end) = (start - base).checked_add(layout.size().max(1)) else {
            return null_mut();
        };
        if end > ARENA {
            return null_mut();
        }
        match ARENA_NEXT.compare_exchange_weak(cur, end, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => return start as *mut u8,
            Err(c) => cur = c,
        }
    }
}

/// Blocks from 4 KiB (2^12) up to 16 MiB (2^24) are rounded up to a power of two and
/// cached; smaller and larger ones go straight to musl. From 4 KiB, not 64: musl's malloc
/// also maps and unmaps its groups of mid-sized blocks (20–60 KiB) as they fill and empty,
/// ~3 600 `mmap`/`munmap` pairs per GiB of streamed output; cached from 4 KiB, 320
/// (docs/BENCHMARKS.md, exec).
const MIN_SHIFT: u32 = 12;
const MAX_SHIFT: u32 = 24;
const CLASSES: usize = (MAX_SHIFT - MIN_SHIFT + 1) as usize;
/// Freed blocks kept per size class. Only blocks that were live together are ever cached, so
/// the cache never holds more than the process's own peak use of a class; 16 rather than 4
/// because frames in flight keep more than 4 read buffers alive at once while streaming.
const SLOTS: usize = 16;
/// musl's malloc alignment; blocks with a stricter alignment are not cached.
const MAX_ALIGN: usize = 16;

static FREE: [[AtomicPtr<u8>; SLOTS]; CLASSES] =
    [const { [const { AtomicPtr::new(null_mut()) }; SLOTS] }; CLASSES];

/// Size class of a layout, if cached.
fn class(layout: Layout) -> Option<(usize, usize)> {
    let size = layout.size();
    if layout.align() > MAX_ALIGN || !((1 << MIN_SHIFT)..=(1 << MAX_SHIFT)).contains(&size) {
        return None;
    }
    let shift = size.next_power_of_two().trailing_zeros();
    Some(((shift - MIN_SHIFT) as usize, 1 << shift))
}

/// The system allocator with a small lock-free cache of freed big blocks.
pub struct Cached;

// SAFETY: every block handed out comes from `System` with a size ≥ the request (its class
// size) and alignment ≤ MAX_ALIGN, which musl's malloc guarantees, or is a disjoint piece
// of the arena (aligned as asked, never handed out twice, never passed to `System`); a
// cached block is taken by exactly one `swap`, so no block is handed out twice; `dealloc`
// gives a block back with the class size it was allocated with.
unsafe impl GlobalAlloc for Cached {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some((c, size)) = class(layout) else {
            if layout.align() <= 4096 {
                let p = arena_alloc(layout);
                if !p.is_null() {
                    return p;
                }
            }
            // SAFETY: forwarding the caller's valid layout.
            return unsafe { System.alloc(layout) };
        };
        for slot in &FREE[c] {
            let p = slot.swap(null_mut(), Ordering::Acquire);
            if !p.is_null() {
                return p;
            }
        }
        // SAFETY: `size` ≥ layout.size() and a power of two ≥ the alignment: a valid layout.
        unsafe { System.alloc(Layout::from_size_align_unchecked(size, layout.align())) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if in_arena(ptr) {
            return;
        }
        let Some((c, size)) = class(layout) else {
            // SAFETY: `ptr` came from `System.alloc(layout)` above.
            return unsafe { System.dealloc(ptr, layout) };
        };
        for slot in &FREE[c] {
            if slot
                .compare_exchange(null_mut(), ptr, Ordering::Release, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
        }
        // SAFETY: `ptr` was allocated by System with the class size (see `alloc`).
        unsafe { System.dealloc(ptr, Layout::from_size_align_unchecked(size, layout.align())) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if class(layout).is_none() {
            if layout.align() <= 4096 {
                // Arena pieces are never reused: still zero.
                let p = arena_alloc(layout);
                if !p.is_null() {
                    return p;
                }
            }
            // SAFETY: forwarding the caller's valid layout (calloc: fresh pages need no memset).
            return unsafe { System.alloc_zeroed(layout) };
        }
        // SAFETY: as `alloc`; the block (possibly reused) is zeroed over the requested size.
        unsafe {
            let p = self.alloc(layout);
            if !p.is_null() {
                std::ptr::write_bytes(p, 0, layout.size());
            }
            p
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size` with `layout.align()` is a valid layout.
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if in_arena(ptr) {
            if new_size <= layout.size() {
                return ptr;
            }
            // SAFETY: a fresh block for `new`, the old contents copied; the arena piece
            // is simply left behind.
            unsafe {
                let p = self.alloc(new);
                if !p.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, p, layout.size());
                }
                return p;
            }
        }
        match (class(layout), class(new)) {
            // SAFETY: neither block is cached: musl's realloc (in place where it can).
            (None, None) => unsafe { System.realloc(ptr, layout, new_size) },
            // Within one class the block already has room.
            (Some((a, _)), Some((b, _))) if a == b => ptr,
            _ => {
                // SAFETY: a fresh block for `new`, the overlap copied, the old one freed
                // with its own layout (GlobalAlloc's default realloc, done here).
                unsafe {
                    let p = self.alloc(new);
                    if !p.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    p
                }
            }
        }
    }
}
