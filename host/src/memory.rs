//! The interpreter's linear memories: each starts as a copy-on-write mapping of an image, and
//! goes back to a pool after its call, reset to that image, for the next call of the same one.
//!
//! Why a pool: a fresh mapping costs a page fault for every page a call touches (about 3,600
//! for the pandas example, copying each page it writes) and unmapping it afterwards costs
//! again: half the time of a pandas call. A memory kept after its call has those pages
//! already. Before it is used again, every page the call wrote is put back to the image's
//! bytes and every page it grew is dropped, so the next call starts from exactly the image,
//! as a fresh mapping would, and sees nothing of the call before: no two calls share mutable
//! state, only the time it takes to set it up.
//!
//! Which pages were written comes from Linux's `PAGEMAP_SCAN` (6.7 and later): in a private
//! mapping of a file, a page the call wrote is the call's own anonymous page, while one it
//! only read is still the file's. Where the scan is not available, the memory drops all its
//! private pages instead (`MADV_DONTNEED` puts the file's pages back), which is as correct and
//! as slow as a fresh mapping.
//!
//! The scan walks every page of the image (10,000 to 16,000 for the examples: a tenth of a
//! trivial call's CPU time, 3% of a pandas call's), yet most calls make no page their own that
//! an earlier call had not: a page becomes the memory's own only through a page fault of the
//! thread writing it, and the calls of one bundle write the same pages. So a memory remembers
//! its own pages from its last scan, and when the thread that ran the call took no page fault
//! at all between taking the memory and giving it back (the kernel counts each thread's
//! faults), no page can have become its own since: the reset copies back the remembered pages
//! and skips the scan. Any fault, on that memory or elsewhere, means a scan.
//!
//! Wasmtime meets these memories through its `MemoryCreator` hook: the sandbox says which
//! image the next instance starts from ([`starting_from`]) and instantiates; the creator,
//! called on that thread during the instantiation, hands out a memory of that image.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

use rustix::mm::{MapFlags, MprotectFlags, ProtFlags};
use wasmtime::{LinearMemory, MemoryCreator, MemoryType};

/// An image a memory can start from: a file of exactly `len` bytes, mapped copy-on-write.
#[derive(Debug)]
pub struct Source {
    file: File,
    len: usize,
    /// The image's sha256: memories of equal images are interchangeable.
    key: String,
    /// A read-only shared mapping of the whole file, made at the first reset: copying pages
    /// back from it is a `memcpy` from the page cache, where reading the file would cost a
    /// system call per run of pages (about a thousand per pandas call).
    view: OnceLock<View>,
}

impl Source {
    pub fn new(file: File, len: usize, key: String) -> Source {
        Source {
            file,
            len,
            key,
            view: OnceLock::new(),
        }
    }

    /// The image's bytes.
    fn bytes(&self) -> std::io::Result<&[u8]> {
        let view = match self.view.get() {
            Some(view) => view,
            None => {
                let view = View::of(&self.file, self.len)?;
                self.view.get_or_init(|| view)
            }
        };
        // SAFETY: the view maps `len` readable bytes for as long as `self` (which owns it)
        // lives; the file is host's own cache file, which nothing writes once it is in place.
        Ok(unsafe { std::slice::from_raw_parts(view.base.cast_const(), view.len) })
    }
}

/// A read-only shared mapping of a file.
#[derive(Debug)]
struct View {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is read-only and lives until the view is dropped.
unsafe impl Send for View {}
unsafe impl Sync for View {}

impl View {
    fn of(file: &File, len: usize) -> std::io::Result<View> {
        if len == 0 {
            return Ok(View {
                base: std::ptr::NonNull::dangling().as_ptr(),
                len,
            });
        }
        // SAFETY: a new mapping at an address the kernel chooses touches no existing memory.
        let base = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ,
                MapFlags::SHARED,
                file,
                0,
            )
        }?;
        Ok(View {
            base: base.cast(),
            len,
        })
    }
}

impl Drop for View {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: the mapping is this view's alone; no slice of it outlives the view.
            let _ = unsafe { rustix::mm::munmap(self.base.cast(), self.len) };
        }
    }
}

thread_local! {
    /// The image the next memory created on this thread starts from.
    static NEXT: RefCell<Option<Arc<Source>>> = const { RefCell::new(None) };
}

/// While alive, the next non-empty linear memory Wasmtime creates on this thread starts from
/// `source`.
pub(crate) fn starting_from(source: &Arc<Source>) -> Next {
    NEXT.with(|n| *n.borrow_mut() = Some(source.clone()));
    Next(())
}

/// See [`starting_from`].
pub(crate) struct Next(());

impl Next {
    /// Whether an instantiation took the image (a memory that did not would start empty).
    pub fn taken(&self) -> bool {
        NEXT.with(|n| n.borrow().is_none())
    }
}

impl Drop for Next {
    fn drop(&mut self) {
        NEXT.with(|n| n.borrow_mut().take());
    }
}

thread_local! {
    /// Whether memories whose calls end on this thread wait for [`settle`] to be reset.
    static DEFERRING: Cell<bool> = const { Cell::new(false) };
    /// The memory of this thread's last call, not reset yet, and the pool it goes back to.
    static UNSETTLED: RefCell<Option<(Arc<Pool>, Region)>> = const { RefCell::new(None) };
}

/// From now on, the memory of a call that ends on this thread is not reset as the call
/// ends but at the next [`settle`] on this thread (or when this thread starts its next
/// call): a server settles after it has sent the call's answer, so the client does not wait
/// for the reset (about a millisecond of a pandas call: copying back the pages it wrote).
/// A memory is only ever handed out reset; one left unsettled when the thread ends is
/// unmapped.
pub(crate) fn defer_resets() {
    DEFERRING.with(|d| d.set(true));
}

/// Resets the memory of this thread's last call, if [`defer_resets`] left one, and gives it
/// back to its pool.
pub(crate) fn settle() {
    if let Some((pool, region)) = UNSETTLED.with(|u| u.borrow_mut().take()) {
        pool.keep_reset(region);
    }
}

/// Memories kept after their calls, ready for the next call of the same image.
pub(crate) struct Pool {
    idle: Mutex<Vec<Region>>,
    /// Empty memories kept likewise (Wasmtime's heap for exception objects, one an instance):
    /// reserving and unmapping 4 GiB of address space for each call takes the process's
    /// memory map lock for writing, which stalls the page faults and scans of calls on other
    /// threads.
    empty: Mutex<Vec<Region>>,
    /// How many idle memories to keep: each holds the pages its calls wrote (about 9 MB for
    /// the pandas example).
    keep: usize,
    scan: Option<Scan>,
}

impl Pool {
    pub fn new() -> Arc<Pool> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Arc::new(Pool::with(2 * cores.max(2), Scan::new()))
    }

    fn with(keep: usize, scan: Option<Scan>) -> Pool {
        Pool {
            idle: Mutex::new(Vec::new()),
            empty: Mutex::new(Vec::new()),
            keep,
            scan,
        }
    }

    /// The creator to give Wasmtime's `Config::with_host_memory`.
    pub fn creator(self: &Arc<Pool>) -> Arc<dyn MemoryCreator> {
        Arc::new(Creator(self.clone()))
    }

    /// An idle memory of `source` with a reservation of `reserved` bytes, else a new one.
    fn take(&self, source: &Arc<Source>, reserved: usize) -> std::io::Result<Region> {
        settle();
        let found = {
            let mut idle = self.idle.lock().unwrap();
            idle.iter()
                .rposition(|r| {
                    r.reserved == reserved && r.image.as_ref().is_some_and(|i| i.key == source.key)
                })
                .map(|at| idle.remove(at))
        };
        let mut region = match found {
            Some(region) => region,
            None => Region::of_image(source, reserved)?,
        };
        // Without the scan there is nothing the count could save.
        region.lent = self.scan.as_ref().and_then(|_| Faults::now());
        Ok(region)
    }

    /// An empty memory kept with a reservation of `reserved` bytes, else a new one; its first
    /// `minimum` bytes writable.
    fn take_empty(&self, reserved: usize, minimum: usize) -> std::io::Result<Region> {
        let found = {
            let mut empty = self.empty.lock().unwrap();
            empty
                .iter()
                .rposition(|r| r.reserved == reserved)
                .map(|at| empty.remove(at))
        };
        let mut region = match found {
            Some(region) => region,
            None => Region::reserve(reserved)?,
        };
        region.make_writable(minimum)?;
        Ok(region)
    }

    /// Takes back an empty memory: zeroed and inaccessible again, kept (up to `keep`) or
    /// unmapped.
    fn put_back_empty(&self, mut region: Region) {
        if region.reset(None).is_err() {
            return;
        }
        let mut empty = self.empty.lock().unwrap();
        if empty.len() < self.keep {
            empty.push(region);
        }
    }

    /// Takes back a memory after its call: resets it now, or at this thread's next [`settle`]
    /// when it defers resets.
    fn put_back(self: &Arc<Self>, mut region: Region) {
        region.returned();
        if DEFERRING.with(Cell::get) {
            settle();
            UNSETTLED.with(|u| *u.borrow_mut() = Some((self.clone(), region)));
        } else {
            self.keep_reset(region);
        }
    }

    /// Resets a memory to its image and keeps it (unmapping the oldest idle one when the pool
    /// is full), or unmaps it if it cannot be reset, so that only reset memories are ever
    /// handed out.
    fn keep_reset(&self, mut region: Region) {
        if region.reset(self.scan.as_ref()).is_err() {
            return;
        }
        let oldest = {
            let mut idle = self.idle.lock().unwrap();
            idle.push(region);
            (idle.len() > self.keep).then(|| idle.remove(0))
        };
        // Unmapped outside the lock.
        drop(oldest);
    }
}

struct Creator(Arc<Pool>);

// SAFETY: every memory handed out is its own mapping of `reserved + guard` bytes, at least
// `minimum` of them readable and writable and the guard inaccessible; `grow_to` makes more
// writable in place, never moving the base; see `Region`.
unsafe impl MemoryCreator for Creator {
    fn new_memory(
        &self,
        _ty: MemoryType,
        minimum: usize,
        _maximum: Option<usize>,
        reserved_size_in_bytes: Option<usize>,
        guard_size_in_bytes: usize,
    ) -> Result<Box<dyn LinearMemory>, String> {
        let reserved = reserved_size_in_bytes
            .unwrap_or(4 << 30)
            .max(minimum)
            .next_multiple_of(PAGE)
            + guard_size_in_bytes;
        // Wasmtime's own heap for exception objects (minimum 0) is made in the same
        // instantiation; the image is for the interpreter's memory, which is never empty.
        let next = match minimum {
            0 => None,
            _ => NEXT.with(|n| n.borrow_mut().take()),
        };
        let region = match next {
            Some(source) => {
                if source.len < minimum {
                    return Err(format!(
                        "the image ({} bytes) is smaller than the memory's minimum ({minimum})",
                        source.len
                    ));
                }
                self.0.take(&source, reserved)
            }
            None => self.0.take_empty(reserved, minimum),
        }
        .map_err(|e| format!("failed to map a linear memory: {e}"))?;
        Ok(Box::new(Memory {
            size: minimum,
            capacity: reserved - guard_size_in_bytes,
            region: Some(region),
            pool: self.0.clone(),
        }))
    }
}

/// The linear memory Wasmtime uses.
struct Memory {
    size: usize,
    capacity: usize,
    /// Taken on drop, to go back to the pool.
    region: Option<Region>,
    pool: Arc<Pool>,
}

impl Memory {
    fn region(&self) -> &Region {
        self.region
            .as_ref()
            .expect("a memory in use has its region")
    }
}

// SAFETY: see `Creator`.
unsafe impl LinearMemory for Memory {
    fn byte_size(&self) -> usize {
        self.size
    }

    fn byte_capacity(&self) -> usize {
        self.capacity
    }

    fn grow_to(&mut self, new_size: usize) -> wasmtime::Result<()> {
        if new_size > self.capacity {
            return Err(wasmtime::format_err!(
                "the memory's reservation is exhausted"
            ));
        }
        self.region
            .as_mut()
            .expect("a memory in use has its region")
            .make_writable(new_size)
            .map_err(wasmtime::Error::new)?;
        self.size = new_size;
        Ok(())
    }

    fn as_ptr(&self) -> *mut u8 {
        self.region().base
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        match self.region.take() {
            Some(region) if region.image.is_some() => self.pool.put_back(region),
            Some(region) => self.pool.put_back_empty(region),
            None => {}
        }
    }
}

const PAGE: usize = 4096;

/// A reservation of address space for one linear memory (inaccessible but for its first
/// `writable` bytes), its first `image.len` bytes a private mapping of the image.
struct Region {
    base: *mut u8,
    reserved: usize,
    writable: usize,
    image: Option<Arc<Source>>,
    /// The pages of the image that are this memory's own (written by a call, then reset), as
    /// its last scan found them; None when not known.
    own: Option<Vec<Range<usize>>>,
    /// The faults of the thread it was lent to, counted when it was lent.
    lent: Option<Faults>,
    /// Whether that thread took no page fault between lending and giving back: then its own
    /// pages are still `own`.
    no_new_pages: bool,
}

// SAFETY: the region is plain memory owned by whoever holds the `Region`; the raw pointer is
// what makes it not `Send` by default.
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

impl Region {
    fn reserve(reserved: usize) -> std::io::Result<Region> {
        // SAFETY: a new anonymous mapping at an address the kernel chooses touches no existing
        // memory.
        let base = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                reserved,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }?;
        Ok(Region {
            base: base.cast(),
            reserved,
            writable: 0,
            image: None,
            own: None,
            lent: None,
            no_new_pages: false,
        })
    }

    /// A memory whose first bytes are a copy-on-write mapping of the image.
    fn of_image(source: &Arc<Source>, reserved: usize) -> std::io::Result<Region> {
        let mut region = Region::reserve(reserved)?;
        if source.len > 0 {
            // SAFETY: `base..base + len` lies inside the reservation just made, which nothing
            // else refers to; MAP_FIXED replaces those inaccessible pages with the image's,
            // private to this mapping, so writes never reach the file.
            unsafe {
                rustix::mm::mmap(
                    region.base.cast(),
                    source.len,
                    ProtFlags::READ | ProtFlags::WRITE,
                    MapFlags::PRIVATE | MapFlags::FIXED,
                    &source.file,
                    0,
                )
            }?;
        }
        region.writable = source.len;
        region.image = Some(source.clone());
        Ok(region)
    }

    /// Makes the first `size` bytes readable and writable (those past the image start zeroed).
    fn make_writable(&mut self, size: usize) -> std::io::Result<()> {
        let size = size.next_multiple_of(PAGE);
        if size <= self.writable {
            return Ok(());
        }
        // SAFETY: `writable..size` lies inside this region's reservation (the caller checked
        // the capacity), in pages only this region maps.
        unsafe {
            rustix::mm::mprotect(
                self.base.add(self.writable).cast(),
                size - self.writable,
                MprotectFlags::READ | MprotectFlags::WRITE,
            )
        }?;
        self.writable = size;
        Ok(())
    }

    /// Notes, as the memory comes back from its call (on the thread that ran it: a deferred
    /// reset runs after other work), whether that thread took any page fault since it was
    /// lent the memory.
    fn returned(&mut self) {
        self.no_new_pages = self
            .lent
            .take()
            .is_some_and(|lent| Faults::now() == Some(lent));
    }

    /// Puts the memory back to its image (or to empty): the pages grown past the image are
    /// dropped and made inaccessible again, and the pages written within it get the image's
    /// bytes back.
    fn reset(&mut self, scan: Option<&Scan>) -> std::io::Result<()> {
        let start = self.image.as_ref().map_or(0, |image| image.len);
        if self.writable > start {
            let grown = self.writable - start;
            // SAFETY: `start..writable` is this region's own anonymous memory, which no
            // instance uses any more; dropping its pages zeroes it, and it goes back to
            // inaccessible.
            unsafe {
                let at = self.base.add(start).cast();
                rustix::mm::madvise(at, grown, rustix::mm::Advice::LinuxDontNeed)?;
                rustix::mm::mprotect(at, grown, MprotectFlags::empty())?;
            }
            self.writable = start;
        }
        let Some(image) = self.image.clone() else {
            return Ok(());
        };
        let range = self.base as usize..self.base as usize + image.len;
        let known = match (std::mem::take(&mut self.no_new_pages), self.own.take()) {
            (true, Some(own)) => Some(own),
            _ => scan.and_then(|s| s.written(range.clone())),
        };
        match known {
            Some(written) => {
                let original = image.bytes()?;
                for pages in &written {
                    // SAFETY: the scan (this one, or the one `own` kept) reports ranges inside
                    // `range`, this region's mapping of the image, which no instance uses any
                    // more.
                    let bytes = unsafe {
                        std::slice::from_raw_parts_mut(pages.start as *mut u8, pages.len())
                    };
                    let at = pages.start - range.start;
                    // About two pages in five that a call wrote hold the image's bytes again
                    // (reference counts raised and lowered back): comparing first leaves them
                    // be, where copying would write them over (2-3% of an evaluation's time).
                    for (page, image) in bytes
                        .chunks_mut(PAGE)
                        .zip(original[at..at + pages.len()].chunks(PAGE))
                    {
                        if page != image {
                            page.copy_from_slice(image);
                        }
                    }
                }
                self.own = Some(written);
            }
            // SAFETY: as above; in a private file mapping, dropped pages read the file again.
            None => unsafe {
                rustix::mm::madvise(
                    self.base.cast(),
                    image.len,
                    rustix::mm::Advice::LinuxDontNeed,
                )?
            },
        }
        Ok(())
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the reservation is this region's alone, and nothing uses it any more.
        let _ = unsafe { rustix::mm::munmap(self.base.cast(), self.reserved) };
    }
}

/// The page faults a thread has taken so far, minor and major, as the kernel counts them for
/// that thread alone (`RUSAGE_THREAD`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Faults {
    thread: libc::pid_t,
    count: u64,
}

impl Faults {
    /// This thread's, or None if the kernel does not say.
    fn now() -> Option<Faults> {
        // SAFETY: `getrusage` only writes the `rusage` it is given; `gettid` reads nothing.
        let (thread, usage) = unsafe {
            let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
            if libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()) != 0 {
                return None;
            }
            (libc::gettid(), usage.assume_init())
        };
        Some(Faults {
            thread,
            count: (usage.ru_minflt as u64).wrapping_add(usage.ru_majflt as u64),
        })
    }
}

/// Linux's `PAGEMAP_SCAN` on `/proc/self/pagemap`: which pages of a range are private copies.
struct Scan {
    pagemap: File,
}

/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610;
const PAGE_IS_FILE: u64 = 1 << 2;
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;
const PAGE_IS_PFNZERO: u64 = 1 << 5;

#[repr(C)]
#[derive(Default)]
struct ScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

impl Scan {
    /// The scan, if this kernel has it.
    fn new() -> Option<Scan> {
        let scan = Scan {
            pagemap: File::open("/proc/self/pagemap").ok()?,
        };
        scan.written(0..0)?;
        Some(scan)
    }

    /// The pages of `range` (page-aligned addresses) that are no longer the file's or the
    /// zero page: present or swapped out, they are private copies something wrote. `None` if
    /// the scan failed.
    fn written(&self, range: Range<usize>) -> Option<Vec<Range<usize>>> {
        use std::os::fd::AsRawFd;
        let mut found = Vec::new();
        let mut regions = vec![PageRegion::default(); 512];
        let mut start = range.start as u64;
        loop {
            let mut arg = ScanArg {
                size: std::mem::size_of::<ScanArg>() as u64,
                start,
                end: range.end as u64,
                vec: regions.as_mut_ptr() as u64,
                vec_len: regions.len() as u64,
                // Pages that are neither the file's nor the zero page...
                category_inverted: PAGE_IS_FILE | PAGE_IS_PFNZERO,
                category_mask: PAGE_IS_FILE | PAGE_IS_PFNZERO,
                // ...and exist, in memory or in swap.
                category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                ..ScanArg::default()
            };
            // SAFETY: `arg` is a valid `pm_scan_arg` whose `vec` points at `vec_len` writable
            // `page_region`s; the kernel reads the page tables of `start..end` only.
            let n = unsafe { libc::ioctl(self.pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
            if n < 0 {
                return None;
            }
            found.extend(
                regions[..n as usize]
                    .iter()
                    .map(|r| r.start as usize..r.end as usize),
            );
            if arg.walk_end >= range.end as u64 {
                return Some(found);
            }
            // A scan that stopped short without progress is no answer: the caller drops every
            // private page instead of trusting a partial list.
            if arg.walk_end <= start {
                return None;
            }
            start = arg.walk_end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// An image of `pages` pages, page `i` filled with the byte `i + 1`, every third a hole.
    fn image(pages: usize) -> Arc<Source> {
        let mut file = tempfile::tempfile().unwrap();
        for i in 0..pages {
            let byte = if i % 3 == 2 { 0 } else { i as u8 + 1 };
            file.write_all(&[byte; PAGE]).unwrap();
        }
        Arc::new(Source::new(file, pages * PAGE, "test".into()))
    }

    fn bytes(region: &Region, len: usize) -> &[u8] {
        // SAFETY: the test reads within the region's writable bytes.
        unsafe { std::slice::from_raw_parts(region.base, len) }
    }

    fn check_reset(scan: Option<Scan>) {
        let source = image(64);
        let expected = bytes(&Region::of_image(&source, 1 << 30).unwrap(), 64 * PAGE).to_vec();
        let pool = Arc::new(Pool::with(1, scan));
        let mut region = pool.take(&source, 1 << 30).unwrap();
        // A call reads some pages, writes others (within the image, in holes, across a page
        // boundary) and grows the memory.
        let seen: u64 = bytes(&region, 64 * PAGE)
            .iter()
            .map(|&b| u64::from(b))
            .sum();
        assert!(seen > 0);
        region.make_writable(80 * PAGE).unwrap();
        // SAFETY: within the region's writable bytes.
        unsafe {
            region.base.add(5 * PAGE + 17).write(0xee);
            region.base.add(2 * PAGE).write(0xee);
            std::ptr::write_bytes(region.base.add(40 * PAGE - 8), 0xee, 16);
            std::ptr::write_bytes(region.base.add(70 * PAGE), 0xee, 3 * PAGE);
        }
        let base = region.base;
        pool.put_back(region);

        let region = pool.take(&source, 1 << 30).unwrap();
        assert_eq!(region.base, base, "the same memory is used again");
        assert_eq!(region.writable, 64 * PAGE, "the growth is undone");
        assert!(
            bytes(&region, 64 * PAGE) == expected,
            "the image's bytes are back"
        );
        let mut again = region;
        again.make_writable(80 * PAGE).unwrap();
        assert!(
            bytes(&again, 80 * PAGE)[64 * PAGE..]
                .iter()
                .all(|&b| b == 0)
        );
    }

    /// The page scan, or None after saying on the test output itself (not the captured
    /// output libtest hides for passing tests) that the test could not check it here.
    fn scan_or_say_skipped(test: &str) -> Option<Scan> {
        let scan = Scan::new();
        if scan.is_none() {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "\nSKIPPED {test}: this kernel has no PAGEMAP_SCAN (Linux 6.7+); \
                 memories are reset without it, as the test without the scan checks"
            );
        }
        scan
    }

    #[test]
    fn a_memory_goes_back_to_its_image_with_the_page_scan() {
        if let Some(scan) =
            scan_or_say_skipped("a_memory_goes_back_to_its_image_with_the_page_scan")
        {
            check_reset(Some(scan));
        }
    }

    #[test]
    fn a_memory_goes_back_to_its_image_without_the_page_scan() {
        check_reset(None);
    }

    #[test]
    fn the_scan_finds_exactly_the_written_pages() {
        let Some(scan) = scan_or_say_skipped("the_scan_finds_exactly_the_written_pages") else {
            return;
        };
        let source = image(32);
        let region = Region::of_image(&source, 1 << 30).unwrap();
        let base = region.base as usize;
        let _ = bytes(&region, 32 * PAGE)
            .iter()
            .map(|&b| u64::from(b))
            .sum::<u64>();
        // SAFETY: within the region's writable bytes.
        unsafe {
            region.base.add(3 * PAGE).write(1);
            region.base.add(4 * PAGE + 9).write(1);
            region.base.add(20 * PAGE).write(1);
        }
        let written = scan.written(base..base + 32 * PAGE).unwrap();
        let pages: Vec<Range<usize>> = written
            .iter()
            .map(|r| (r.start - base) / PAGE..(r.end - base) / PAGE)
            .collect();
        assert_eq!(pages, [3..5, 20..21]);

        // More separate runs of written pages than one scan call reports (512).
        let source = image(1200);
        let region = Region::of_image(&source, 1 << 30).unwrap();
        let base = region.base as usize;
        for page in (0..1200).step_by(2) {
            // SAFETY: within the region's writable bytes.
            unsafe { region.base.add(page * PAGE).write(7) };
        }
        let written = scan.written(base..base + 1200 * PAGE).unwrap();
        assert_eq!(written.len(), 600);
        assert!(
            written
                .iter()
                .enumerate()
                .all(|(i, r)| r.start == base + 2 * i * PAGE && r.len() == PAGE)
        );
    }

    /// A call that wrote only pages its memory already had as its own took no page fault: its
    /// reset copies those pages back without a scan. A call that made a page its own took a
    /// fault, and its reset scans.
    #[test]
    fn a_call_that_took_no_page_fault_is_reset_from_the_pages_remembered() {
        let Some(scan) = scan_or_say_skipped(
            "a_call_that_took_no_page_fault_is_reset_from_the_pages_remembered",
        ) else {
            return;
        };
        let source = image(32);
        let expected = bytes(&Region::of_image(&source, 1 << 30).unwrap(), 32 * PAGE).to_vec();
        let pool = Pool::with(1, Some(scan));
        let write = |region: &Region, page: usize| {
            // SAFETY: within the region's writable bytes.
            unsafe { region.base.add(page * PAGE + 100).write(0xee) }
        };
        let page_range = |region: &Region, page: usize| {
            let at = region.base as usize + page * PAGE;
            at..at + PAGE
        };

        // First call: page 5 becomes the memory's own (a fault), so the reset scans.
        let mut region = pool.take(&source, 1 << 30).unwrap();
        write(&region, 5);
        region.returned();
        assert!(
            !region.no_new_pages,
            "writing page 5 the first time is a fault"
        );
        region.reset(pool.scan.as_ref()).unwrap();
        assert_eq!(region.own, Some(vec![page_range(&region, 5)]));
        pool.idle.lock().unwrap().push(region);

        // Second call: page 5 again, already its own: no fault, and the reset needs no scan
        // (given none, it still restores page 5 and keeps what it knows).
        let mut region = pool.take(&source, 1 << 30).unwrap();
        write(&region, 5);
        region.returned();
        assert!(region.no_new_pages, "page 5 was already the memory's own");
        region.reset(None).unwrap();
        assert!(bytes(&region, 32 * PAGE) == expected, "page 5 is back");
        assert_eq!(region.own, Some(vec![page_range(&region, 5)]));
        pool.idle.lock().unwrap().push(region);

        // Third call: page 9 too, new: a fault, so a scan, which finds both.
        let mut region = pool.take(&source, 1 << 30).unwrap();
        write(&region, 5);
        write(&region, 9);
        region.returned();
        assert!(!region.no_new_pages, "page 9 is new: a fault");
        region.reset(pool.scan.as_ref()).unwrap();
        assert!(
            bytes(&region, 32 * PAGE) == expected,
            "pages 5 and 9 are back"
        );
        assert_eq!(
            region.own,
            Some(vec![page_range(&region, 5), page_range(&region, 9)])
        );

        // A memory given back on another thread than the one it was lent to is scanned.
        pool.idle.lock().unwrap().push(region);
        let mut region = pool.take(&source, 1 << 30).unwrap();
        let region = std::thread::scope(|s| {
            s.spawn(move || {
                region.returned();
                region
            })
            .join()
            .unwrap()
        });
        assert!(!region.no_new_pages, "another thread's faults say nothing");
    }

    #[test]
    fn a_deferred_reset_waits_for_settle_or_the_next_take_on_its_thread() {
        let source = image(8);
        let expected = bytes(&Region::of_image(&source, 1 << 30).unwrap(), 8 * PAGE).to_vec();
        let pool = Arc::new(Pool::with(2, Scan::new()));
        std::thread::spawn(move || {
            defer_resets();
            let write = |region: &Region| {
                // SAFETY: within the region's writable bytes.
                unsafe { region.base.add(3 * PAGE).write(0xee) }
            };
            let region = pool.take(&source, 1 << 30).unwrap();
            write(&region);
            let base = region.base;
            pool.put_back(region);
            assert!(
                pool.idle.lock().unwrap().is_empty(),
                "not back before it is reset"
            );
            settle();
            assert_eq!(pool.idle.lock().unwrap().len(), 1);

            // The next take settles what the last call left, and hands it out reset.
            let region = pool.take(&source, 1 << 30).unwrap();
            assert_eq!(region.base, base);
            write(&region);
            pool.put_back(region);
            let region = pool.take(&source, 1 << 30).unwrap();
            assert_eq!(region.base, base, "the same memory, settled by the take");
            assert!(
                bytes(&region, 8 * PAGE) == expected,
                "the image's bytes are back"
            );
        })
        .join()
        .unwrap();
    }

    #[test]
    fn an_empty_memory_comes_back_zeroed_and_no_larger() {
        let pool = Pool::with(1, None);
        let region = pool.take_empty(1 << 30, 2 * PAGE).unwrap();
        // SAFETY: within the region's writable bytes.
        unsafe { std::ptr::write_bytes(region.base, 0xee, 2 * PAGE) };
        let base = region.base;
        pool.put_back_empty(region);

        let region = pool.take_empty(1 << 30, PAGE).unwrap();
        assert_eq!(region.base, base, "the same reservation is used again");
        assert_eq!(
            region.writable, PAGE,
            "only what the new memory asks is writable"
        );
        assert!(bytes(&region, PAGE).iter().all(|&b| b == 0));
        let other = pool.take_empty(1 << 29, 0).unwrap();
        assert_ne!(
            other.base, base,
            "a reservation of another size is a new one"
        );
    }

    #[test]
    fn a_pool_keeps_at_most_its_share_of_memories() {
        let source = image(4);
        let pool = Arc::new(Pool::with(2, None));
        let taken: Vec<Region> = (0..3)
            .map(|_| pool.take(&source, 1 << 30).unwrap())
            .collect();
        for region in taken {
            pool.put_back(region);
        }
        assert_eq!(pool.idle.lock().unwrap().len(), 2);
    }
}
