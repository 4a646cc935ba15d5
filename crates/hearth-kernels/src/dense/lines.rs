//! The packed weights' storage: zeroed 64-byte lines in one allocation. From 2 MiB up it
//! is aligned to 2 MiB and the kernel is asked for transparent huge pages before the
//! first write (Linux `madvise`; the system default here is `madvise`, so without it
//! every weight sits in 4 KiB pages). A decode step streams every weight once, ~540 MB
//! for SmolLM2-135M in f32: 130k pages, each a TLB miss and a page walk in 4 KiB pages,
//! 270 in 2 MiB ones. Where the kernel gives no huge page the memory is the same as
//! before, in small pages.

use std::alloc::Layout;
use std::ptr::NonNull;

use super::Line;

/// Size and alignment of a huge page on x86-64 and most arm64 kernels.
const HUGE_PAGE: usize = 2 << 20;

pub(super) struct Lines {
    ptr: NonNull<Line>,
    len: usize,
    /// None when nothing was allocated (no lines).
    layout: Option<Layout>,
}

// SAFETY: `Lines` owns its allocation alone, like a `Vec<Line>`.
unsafe impl Send for Lines {}
unsafe impl Sync for Lines {}

impl Lines {
    /// `len` lines of zeros. Aborts like `Vec` when the allocation fails.
    pub(super) fn zeroed(len: usize) -> Self {
        let bytes = len
            .checked_mul(std::mem::size_of::<Line>())
            .expect("dense: packed weight size overflows");
        if bytes == 0 {
            return Self {
                ptr: NonNull::dangling(),
                len: 0,
                layout: None,
            };
        }
        let huge = bytes >= HUGE_PAGE;
        let align = if huge {
            HUGE_PAGE
        } else {
            std::mem::align_of::<Line>()
        };
        let layout = Layout::from_size_align(bytes, align).expect("dense: packed weight layout");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw.cast::<Line>()) else {
            std::alloc::handle_alloc_error(layout)
        };
        if huge {
            // Only the whole huge pages: a huge page is resident in full once touched, so
            // advising the partial last one would hold up to 2 MiB per tensor that no
            // weight uses (SmolLM2's 120 f32 matrices: 1.23x the file instead of 1.00x).
            advise_huge_pages(raw, bytes / HUGE_PAGE * HUGE_PAGE);
        }
        // SAFETY: `bytes` lie within the allocation; zero is a valid `Line`.
        unsafe { std::ptr::write_bytes(raw, 0, bytes) };
        Self {
            ptr,
            len,
            layout: Some(layout),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn as_slice(&self) -> &[Line] {
        // SAFETY: `len` initialised lines at `ptr` (dangling and 0 when empty).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub(super) fn as_mut_slice(&mut self) -> &mut [Line] {
        // SAFETY: as `as_slice`, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        if let Some(layout) = self.layout {
            // SAFETY: allocated in `zeroed` with this layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), layout) }
        }
    }
}

/// Asks for huge pages on `[ptr, ptr + len)` (2 MiB aligned, whole pages). Advice only:
/// a kernel without transparent huge pages, or one set to `never`, refuses and nothing
/// changes.
#[cfg(target_os = "linux")]
fn advise_huge_pages(ptr: *mut u8, len: usize) {
    // SAFETY: the range is one allocation of ours; MADV_HUGEPAGE changes no contents.
    unsafe {
        libc::madvise(ptr.cast(), len, libc::MADV_HUGEPAGE);
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_ptr: *mut u8, _len: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_large_buffers_are_zeroed_and_aligned() {
        for len in [
            0usize,
            1,
            3,
            HUGE_PAGE / 64 - 1,
            HUGE_PAGE / 64,
            HUGE_PAGE / 64 * 3 + 5,
        ] {
            let mut l = Lines::zeroed(len);
            assert_eq!(l.len(), len);
            assert!(l.as_slice().iter().all(|x| x.0 == [0; 64]), "len {len}");
            let addr = l.as_slice().as_ptr() as usize;
            let want = if len * 64 >= HUGE_PAGE { HUGE_PAGE } else { 64 };
            assert_eq!(addr % want, 0, "len {len}");
            if let Some(last) = l.as_mut_slice().last_mut() {
                last.0[63] = 7;
            }
            assert_eq!(
                l.as_slice().last().map(|x| x.0[63]),
                len.checked_sub(1).map(|_| 7)
            );
        }
    }
}
