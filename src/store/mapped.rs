//! Read-only maps of the segment files, for the reads of replays served
//! on a connection's task ([`Reads::Mapped`](super::Reads::Mapped)).
//!
//! Such a read takes its bytes from a map of the segment instead of
//! asking the kernel with `preadv2`: no system call, and no lookup in the
//! page cache for each page. Replays of 50 events from random positions,
//! from 8 clients, are answered about a fifth faster that way
//! (BENCHMARKS.md). A scan's cursor reads the bytes where they lie in the
//! map ([`Segments::view`](super::segments::Segments::view)), so that they
//! are copied once, into the answer; other reads copy them out.
//!
//! The catch: touching a mapped page that is not in memory waits for the
//! disk, on the thread that serves the connection and others besides. So
//! a read through a map takes only pages known to be in memory: `mincore`
//! tells the first time, and a bit for each page remembers it. (Asking
//! every time costs the whole gain.) Pages not in memory, pages past the
//! budget, and blocks read for the first time (a read that comes once
//! gains nothing from a map) are left to `preadv2`, which refuses to
//! wait.
//!
//! A page known once may still leave memory: the kernel's reclaim unmaps
//! cold pages. A read of it then waits for the disk after all, for that
//! one page (the maps read at random, so the kernel reads nothing ahead);
//! and were the disk to fail that read, the process would die of
//! `SIGBUS`. To keep this rare, [`Maps`] forgets every page it knows, and
//! unmaps them (they stay in the page cache), every [`RENEWAL`].
//!
//! A mapped page counts in the server's resident memory (as a file page,
//! which the kernel reclaims like the rest of the page cache). The kernel
//! maps, with a page read through a map, the pages around it that it
//! holds ([`FAULT_AROUND`]), so the budget counts those blocks whole: in
//! the LIMIT-50 bench, 96 MiB of pages known came with 238 MiB of file
//! pages resident. Past the budget, reads are left to `preadv2` until the
//! next renewal.

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

/// How long pages are known for: then they are asked about again.
pub(crate) const RENEWAL: Duration = Duration::from_secs(10);

/// What the maps of one store share: the budget of mapped memory, and
/// when the pages known are forgotten next.
#[derive(Debug)]
pub(crate) struct Maps {
    /// Pages that may be mapped at once; 0: no maps.
    budget: usize,
    /// Pages mapped (or about to be), over all maps: whole blocks of
    /// [`FAULT_AROUND`], as the kernel maps the pages it holds around one
    /// read through a map.
    mapped: AtomicUsize,
    since: Instant,
    /// When, in nanoseconds from `since`, the known pages are forgotten.
    renew_at: AtomicU64,
}

/// What the kernel maps around a page read through a map, of the pages
/// it holds (its `fault_around_bytes`, 64 KiB unless set otherwise).
const FAULT_AROUND: usize = 64 * 1024;

impl Maps {
    /// Maps that map at most `budget` bytes at once.
    pub fn new(budget: u64) -> Self {
        let pages = budget / page_size() as u64;
        Self {
            budget: usize::try_from(pages).unwrap_or(usize::MAX),
            mapped: AtomicUsize::new(0),
            since: Instant::now(),
            renew_at: AtomicU64::new(nanos(RENEWAL)),
        }
    }

    /// Whether reads go through maps at all.
    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    /// Whether the known pages are to be forgotten now: `true` for one
    /// caller, who then calls [`Map::forget`] on every map and
    /// [`Maps::forgotten`].
    pub fn due(&self) -> bool {
        let now = nanos(self.since.elapsed());
        let at = self.renew_at.load(Ordering::Relaxed);
        now >= at
            && self
                .renew_at
                .compare_exchange(
                    at,
                    now + nanos(RENEWAL),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// Every map forgot its pages.
    pub fn forgotten(&self) {
        self.mapped.store(0, Ordering::Relaxed);
    }

    /// Bytes the maps may hold mapped.
    pub fn mapped_bytes(&self) -> u64 {
        (self.mapped.load(Ordering::Relaxed) * page_size()) as u64
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// What a map holds of some bytes ([`Map::bytes`]).
#[derive(Debug)]
pub(crate) enum Paged<'m> {
    /// The bytes, their pages in memory.
    InMemory(&'m [u8]),
    /// A page of them is not in memory: reading it would wait for the disk.
    NotInMemory,
    /// The map leaves the read to a system call.
    Left,
}

/// A read-only map of one segment file: the pages of it known to be in
/// memory, and the blocks it may hold mapped.
#[derive(Debug)]
pub(crate) struct Map {
    addr: NonNull<u8>,
    len: usize,
    known: Bits,
    /// A bit for each block of [`FAULT_AROUND`] bytes read since the
    /// last renewal.
    seen: Bits,
    /// A bit for each block of [`FAULT_AROUND`] bytes that may be mapped.
    mapped: Bits,
}

// SAFETY: the map is shared and read-only, owned by `Map` until it is
// dropped; reading it from several threads at once reads the same file
// bytes, which the segments never rewrite.
unsafe impl Send for Map {}
// SAFETY: as for `Send`: `&Map` only ever reads the mapped bytes.
unsafe impl Sync for Map {}

impl Map {
    /// Maps the first `len` bytes of `file` (more than it holds is fine:
    /// reads stay below what was written), or says why it cannot.
    pub fn new(file: &File, len: u64) -> Option<Self> {
        let page = page_size();
        let len = usize::try_from(len).ok()?.checked_next_multiple_of(page)?;
        if len == 0 {
            return None;
        }
        // SAFETY: a new mapping the kernel places, of a descriptor `file`
        // holds open; nothing else refers to that memory.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            // Once: past `vm.max_map_count`, every further segment fails.
            static WARNED: AtomicBool = AtomicBool::new(false);
            if WARNED.swap(true, Ordering::Relaxed) {
                debug!("cannot map a segment file: {e}");
            } else {
                warn!("cannot map a segment file, so replays read it with system calls (this is said once): {e}");
            }
            return None;
        }
        let map = Self {
            addr: NonNull::new(addr.cast())?,
            len,
            known: Bits::new(len / page),
            seen: Bits::new(len.div_ceil(block_size())),
            mapped: Bits::new(len.div_ceil(block_size())),
        };
        // The kernel reads nothing ahead of a page that was not in memory.
        map.advise(libc::MADV_RANDOM);
        Some(map)
    }

    /// Copies the bytes at `offset` into `into`, when the pages they lie
    /// in are in memory: `Some(false)` when one is not, `None` when the
    /// map leaves the read to the caller ([`Map::bytes`]).
    pub fn copy(&self, offset: u64, into: &mut [u8], maps: &Maps) -> Option<bool> {
        match self.bytes(offset, into.len(), maps) {
            Paged::InMemory(bytes) => {
                into.copy_from_slice(bytes);
                Some(true)
            }
            Paged::NotInMemory => Some(false),
            Paged::Left => None,
        }
    }

    /// The `len` bytes at `offset`, when the pages they lie in are in
    /// memory. The map leaves the read to the caller ([`Paged::Left`])
    /// past its end, past the budget of `maps`, or at the first read of a
    /// block since the last renewal. The caller makes sure the file holds
    /// those bytes.
    ///
    /// A block is mapped from its second read on: a read that comes once,
    /// as a seek into old history does, costs a system call either way,
    /// and mapped it would only take memory.
    pub fn bytes(&self, offset: u64, len: usize, maps: &Maps) -> Paged<'_> {
        let Some((start, end)) = usize::try_from(offset)
            .ok()
            .and_then(|start| Some((start, start.checked_add(len)?)))
            .filter(|(_, end)| *end <= self.len)
        else {
            return Paged::Left;
        };
        if start == end {
            return Paged::InMemory(&[]);
        }
        let (page, block) = (page_size(), block_size());
        let pages = start / page..end.div_ceil(page);
        if !self.known.all(pages.clone()) {
            let blocks = start / block..end.div_ceil(block);
            if self.seen.set(blocks.clone()) > 0 {
                return Paged::Left;
            }
            let more = self.mapped.unset(blocks.clone()) * (block / page);
            if maps.mapped.load(Ordering::Relaxed) + more > maps.budget {
                return Paged::Left;
            }
            match self.in_memory(pages.clone()) {
                None => return Paged::Left,
                Some(false) => return Paged::NotInMemory,
                Some(true) => {}
            }
            self.known.set(pages);
            let charged = self.mapped.set(blocks) * (block / page);
            maps.mapped.fetch_add(charged, Ordering::Relaxed);
        }
        // SAFETY: `start..end` lies inside the map, and in the file below
        // what was written (the caller's word), so every page of it has
        // bytes behind it, which the segments never rewrite; the map lives
        // as long as `self`, and nothing writes through it (read-only).
        Paged::InMemory(unsafe {
            std::slice::from_raw_parts(self.addr.as_ptr().add(start), end - start)
        })
    }

    /// Forgets the pages it knows, and unmaps them: they stay in the page
    /// cache, and the next read asks about them again.
    pub fn forget(&self) {
        self.known.clear();
        self.seen.clear();
        self.mapped.clear();
        self.advise(libc::MADV_DONTNEED);
    }

    /// Whether every page of `pages` is in the page cache; `None` when the
    /// kernel cannot say.
    fn in_memory(&self, pages: Range<usize>) -> Option<bool> {
        let page = page_size();
        let mut flags = [0u8; 64];
        let mut at = pages.start;
        while at < pages.end {
            let n = (pages.end - at).min(flags.len());
            // SAFETY: the `n` pages from page `at` lie inside the map, and
            // `flags` has room for a byte for each.
            let rc = unsafe {
                libc::mincore(
                    self.addr.as_ptr().add(at * page).cast(),
                    n * page,
                    flags.as_mut_ptr(),
                )
            };
            if rc != 0 {
                return None;
            }
            if flags[..n].iter().any(|f| f & 1 == 0) {
                return Some(false);
            }
            at += n;
        }
        Some(true)
    }

    fn advise(&self, advice: libc::c_int) {
        // SAFETY: advice about the whole of this map, which `self` owns;
        // neither advice given here changes what its bytes read as.
        unsafe { libc::madvise(self.addr.as_ptr().cast(), self.len, advice) };
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: the map `new` made, unmapped once, when no read can be
        // using it (they borrow the `Map`).
        unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len) };
    }
}

/// A bit for each of a number of things, set and read from any thread.
#[derive(Debug)]
struct Bits(Box<[AtomicU64]>);

impl Bits {
    fn new(len: usize) -> Self {
        Self((0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }

    fn all(&self, range: Range<usize>) -> bool {
        range.into_iter().all(|i| self.is_set(i))
    }

    /// How many of `range` are not set.
    fn unset(&self, range: Range<usize>) -> usize {
        range.filter(|i| !self.is_set(*i)).count()
    }

    /// Sets `range`; says how many were not set before.
    fn set(&self, range: Range<usize>) -> usize {
        range
            .filter(|i| {
                let bit = 1 << (i % 64);
                self.0[i / 64].fetch_or(bit, Ordering::Relaxed) & bit == 0
            })
            .count()
    }

    fn clear(&self) {
        for word in self.0.iter() {
            word.store(0, Ordering::Relaxed);
        }
    }

    fn is_set(&self, i: usize) -> bool {
        self.0[i / 64].load(Ordering::Relaxed) & (1 << (i % 64)) != 0
    }
}

fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: a plain query of a constant of the system.
        let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(size)
            .ok()
            .filter(|s| *s > 0)
            .unwrap_or(4096)
    })
}

/// The blocks the budget counts in: [`FAULT_AROUND`], or a page if larger.
fn block_size() -> usize {
    FAULT_AROUND.max(page_size())
}
