//! A counting global allocator for the memory tests: the heap bytes live in the test process and their high-water mark, leaving out threads marked as uncounted.
//!
//! A test binary declares it as its allocator
//! (`#[global_allocator] static ALLOC: alloc::Counting = alloc::Counting;`)
//! and holds one test only, so nothing else allocates meanwhile.

#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicIsize, Ordering};

/// Counts live heap bytes and their peak, outside uncounted threads.
pub struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

thread_local! {
    /// Set on a thread whose allocations are not the code under test's
    /// (a fake upstream that keeps every byte it is sent).
    static UNCOUNTED: Cell<bool> = const { Cell::new(false) };
}

/// Leave the allocations of the calling thread out from now on.
pub fn uncount_this_thread() {
    UNCOUNTED.with(|u| u.set(true));
}

fn counted() -> bool {
    !UNCOUNTED.try_with(Cell::get).unwrap_or(true)
}

fn grow(n: usize) {
    if counted() {
        let now = LIVE.fetch_add(n as isize, Ordering::Relaxed) + n as isize;
        PEAK.fetch_max(now, Ordering::Relaxed);
    }
}

fn shrink(n: usize) {
    if counted() {
        LIVE.fetch_sub(n as isize, Ordering::Relaxed);
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        shrink(layout.size());
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size > layout.size() {
                grow(new_size - layout.size());
            } else {
                shrink(layout.size() - new_size);
            }
        }
        p
    }
}

/// A point to measure the peak from: the bytes live now.
pub struct Mark(isize);

/// Start counting the peak from the bytes live now.
pub fn mark() -> Mark {
    let now = LIVE.load(Ordering::Relaxed);
    PEAK.store(now, Ordering::Relaxed);
    Mark(now)
}

impl Mark {
    /// The most bytes live at once since the mark, above what was live then
    /// (0 when the heap only shrank).
    pub fn peak(&self) -> usize {
        (PEAK.load(Ordering::Relaxed) - self.0).max(0) as usize
    }
}
