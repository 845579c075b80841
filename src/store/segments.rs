//! Append-only segment files that hold the bytes of event chunks, and
//! the redo of each commit.
//!
//! sled keeps, for each chunk, where its bytes lie ([`Loc`]); the bytes
//! themselves are appended to the newest segment file and read back with
//! positioned reads. A chunk is written once and never copied again:
//! sled's leaves hold 16-byte locations instead of the chunks, so inserting
//! into them stays cheap, and reads come from the operating system's page
//! cache rather than from a cache in the server's own memory.
//!
//! A commit is appended as one [`Frame`]: a head, its chunks, then the
//! writes it makes to sled's index. One sync of the segments makes the
//! commit durable ([`Segments::sync`]); sled writes its index to disk on
//! its own time, and at the next open the frames past the last one sled
//! kept are applied again ([`Segments::redo_from`]). So a location sled
//! keeps always points at bytes that were kept, and a commit answered
//! before a crash is whole after it. Bytes appended by a commit that never
//! landed are unreferenced after a crash: harmless, removed with their
//! segment. Retention removes a segment once sled no longer references it
//! ([`Segments::retire`]), after the next sync of sled.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use tracing::{error, info};

#[cfg(target_os = "linux")]
use super::mapped::{Map, Maps, Paged};
use super::{Reads, Result, StoreError};

/// A segment is closed once it holds this many bytes.
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// The directory, inside the store's, that holds the segments.
const DIR: &str = "segments";
/// What a frame starts with.
const FRAME_MAGIC: [u8; 4] = *b"EnCf";
/// A frame's head: the magic, the length of its body, how much of the
/// body is chunks (the writes follow), and the CRC-32 of the two lengths
/// and the body.
const FRAME_HEAD: u64 = 16;

/// Where a chunk's bytes lie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Loc {
    pub segment: u32,
    pub offset: u64,
    pub len: u32,
}

impl Loc {
    /// `segment: u32 BE, offset: u64 BE, len: u32 BE`.
    pub fn encode(self) -> [u8; 16] {
        let mut out = [0; 16];
        out[..4].copy_from_slice(&self.segment.to_be_bytes());
        out[4..12].copy_from_slice(&self.offset.to_be_bytes());
        out[12..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// The location at the start of `value` (the store may keep more
    /// after it).
    pub fn decode(value: &[u8]) -> Result<Self> {
        let bytes: &[u8; 16] = value
            .get(..16)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| StoreError::Damaged("a chunk location is under 16 bytes".into()))?;
        let (segment, rest) = bytes.split_at(4);
        let (offset, len) = rest.split_at(8);
        Ok(Self {
            segment: u32::from_be_bytes(segment.try_into().expect("4 bytes")),
            offset: u64::from_be_bytes(offset.try_into().expect("8 bytes")),
            len: u32::from_be_bytes(len.try_into().expect("4 bytes")),
        })
    }

    /// The chunk's bytes from `skip` to `end`.
    pub fn part(self, skip: u32, end: u32) -> Self {
        let end = end.min(self.len);
        let skip = skip.min(end);
        Self {
            segment: self.segment,
            offset: self.offset + u64::from(skip),
            len: end - skip,
        }
    }
}

/// The segment files of one store.
#[derive(Debug)]
pub(crate) struct Segments {
    dir: PathBuf,
    files: RwLock<BTreeMap<u32, Arc<Segment>>>,
    writing: Mutex<Writing>,
    /// What the maps of the segments share ([`Reads::Mapped`]).
    #[cfg(target_os = "linux")]
    maps: Maps,
    /// Positioned reads made (with or without reading ahead), for the
    /// tests.
    #[cfg(test)]
    reads: AtomicU64,
}

/// One segment file.
#[derive(Debug)]
struct Segment {
    file: File,
    /// The bytes before this offset were written in full: a read ahead
    /// takes nothing past it, so it never copies a chunk half-written.
    /// (After a crash cut a file short of what the store references,
    /// appends resume past the hole; reads of the hole give zeros,
    /// ahead or not.)
    written: AtomicU64,
    /// Its map, made by the first read through one; `None` when maps are
    /// off or the file could not be mapped. Unmapped when the last read
    /// holding the segment lets go of it, so retention removes no bytes
    /// from under a read.
    #[cfg(target_os = "linux")]
    map: std::sync::OnceLock<Option<Map>>,
}

impl Segment {
    fn new(file: File, written: u64) -> Arc<Self> {
        Arc::new(Self {
            file,
            written: AtomicU64::new(written),
            #[cfg(target_os = "linux")]
            map: std::sync::OnceLock::new(),
        })
    }
}

/// The segment being appended to, and what waits for the next sync.
#[derive(Debug)]
struct Writing {
    segment: u32,
    file: Arc<Segment>,
    len: u64,
    /// Appended to since the last sync.
    dirty: bool,
    /// Closed segments not yet synced.
    closed: Vec<Arc<Segment>>,
    /// Segments no longer referenced once sled's next sync lands.
    retired: Vec<u32>,
}

/// A buffer that reads land in, kept from one read to the next: a read
/// zeroes only what the buffer grows by, where a `Vec` sized for each
/// read zeroes all of it first (2.5% of a replay's samples, 2% of a
/// LIMIT-50 replay's with the allocation).
#[derive(Debug, Default)]
pub struct ReadBuf {
    bytes: Vec<u8>,
    /// How many of `bytes` the last read filled.
    filled: usize,
}

impl ReadBuf {
    /// The first `len` bytes, to be filled in full.
    fn room(&mut self, len: usize) -> &mut [u8] {
        if self.bytes.len() < len {
            self.bytes.resize(len, 0);
        }
        self.filled = len;
        &mut self.bytes[..len]
    }

    /// Holds nothing (and keeps its memory).
    pub fn clear(&mut self) {
        self.filled = 0;
    }

    /// Holds a copy of `bytes`.
    pub fn copy_from(&mut self, bytes: &[u8]) {
        self.room(bytes.len()).copy_from_slice(bytes);
    }

    /// The memory it keeps.
    pub fn capacity(&self) -> usize {
        self.bytes.capacity()
    }

    /// The filled bytes.
    pub fn into_filled(mut self) -> Vec<u8> {
        self.bytes.truncate(self.filled);
        self.bytes
    }
}

impl From<Vec<u8>> for ReadBuf {
    fn from(bytes: Vec<u8>) -> Self {
        let filled = bytes.len();
        Self { bytes, filled }
    }
}

impl std::ops::Deref for ReadBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes[..self.filled]
    }
}

/// Bytes of a segment in its map, read where they lie instead of copied
/// ([`Segments::view`]). They hold the segment, so its map, and with it
/// the bytes, outlive them even if retention removes the segment.
pub struct MappedBytes {
    /// Owns the map `bytes` points into.
    #[cfg(target_os = "linux")]
    _segment: Arc<Segment>,
    bytes: std::ptr::NonNull<[u8]>,
}

impl std::ops::Deref for MappedBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `bytes` lies in the map of `_segment`, which this holds,
        // below what the segment had written in full: the map is unmapped
        // only when the segment is dropped, and those bytes never change.
        unsafe { self.bytes.as_ref() }
    }
}

/// What a segment's map gave for a chunk ([`Segments::view`]).
pub enum View {
    /// Its bytes, in memory.
    Mapped(MappedBytes),
    /// A page of them is not in memory.
    Uncached,
    /// No map serves them: read them with a system call.
    Unmapped,
}

fn io_error(what: &str, path: &Path, e: &std::io::Error) -> StoreError {
    StoreError::Backend(format!("{what} {}: {e}", path.display()))
}

/// A commit's frame being appended ([`Segments::begin`]).
#[derive(Debug)]
pub(crate) struct Frame {
    segment: u32,
    file: Arc<Segment>,
    path: PathBuf,
    /// Where the head goes.
    start: u64,
    /// Where the next bytes go.
    at: u64,
    /// Of the body so far.
    crc: crc32fast::Hasher,
}

impl Frame {
    /// Adds a chunk's bytes, and says where they lie.
    pub fn put(&mut self, chunk: &[u8]) -> Result<Loc> {
        let len = u32::try_from(chunk.len())
            .map_err(|_| StoreError::Backend("a chunk over 4 GiB".into()))?;
        let loc = Loc {
            segment: self.segment,
            offset: self.at,
            len,
        };
        self.write(chunk)?;
        Ok(loc)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.file
            .file
            .write_all_at(bytes, self.at)
            .map_err(|e| io_error("cannot write to", &self.path, &e))?;
        self.crc.update(bytes);
        self.at += bytes.len() as u64;
        Ok(())
    }
}

/// Reads the body of the frame at `at` of a file of `len` bytes into
/// `body`, and says where the frame ends and how many bytes of the body
/// are chunks. `None` when no whole frame is there: a wrong head, a body
/// past the end, a CRC that does not match.
fn read_frame(file: &File, at: u64, len: u64, body: &mut Vec<u8>) -> Option<(u64, usize)> {
    let mut head = [0; FRAME_HEAD as usize];
    file.read_exact_at(&mut head, at).ok()?;
    if head[..4] != FRAME_MAGIC {
        return None;
    }
    let body_len = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
    let chunks = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(head[12..].try_into().expect("4 bytes"));
    let end = at + FRAME_HEAD + u64::from(body_len);
    if chunks > body_len || end > len {
        return None;
    }
    body.clear();
    body.resize(body_len as usize, 0);
    file.read_exact_at(body, at + FRAME_HEAD).ok()?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(body);
    hasher.update(&head[4..12]);
    (hasher.finalize() == crc).then_some((end, chunks as usize))
}

impl Segments {
    /// Opens the segments under `store_dir`, creating the first if none.
    pub fn open(store_dir: &Path) -> Result<Self> {
        let dir = store_dir.join(DIR);
        fs::create_dir_all(&dir).map_err(|e| io_error("cannot create", &dir, &e))?;
        let mut files = BTreeMap::new();
        let listing = fs::read_dir(&dir).map_err(|e| io_error("cannot list", &dir, &e))?;
        for entry in listing {
            let path = entry.map_err(|e| io_error("cannot list", &dir, &e))?.path();
            let Some(segment) = segment_of(&path) else {
                continue;
            };
            let file = open_file(&path, false)?;
            let len = file
                .metadata()
                .map_err(|e| io_error("cannot read", &path, &e))?
                .len();
            files.insert(segment, Segment::new(file, len));
        }
        let (segment, file) = match files.last_key_value() {
            Some((segment, file)) => (*segment, Arc::clone(file)),
            None => {
                let file = Segment::new(create(&dir, 1)?, 0);
                files.insert(1, Arc::clone(&file));
                (1, file)
            }
        };
        let len = file.written.load(Ordering::Acquire);
        Ok(Self {
            dir,
            #[cfg(test)]
            reads: AtomicU64::new(0),
            files: RwLock::new(files),
            #[cfg(target_os = "linux")]
            maps: Maps::new(0),
            writing: Mutex::new(Writing {
                segment,
                file,
                len,
                dirty: false,
                closed: Vec::new(),
                retired: Vec::new(),
            }),
        })
    }

    /// Brings the files in line with what sled references (`referenced`:
    /// segment -> end of its referenced bytes) after an open. A segment
    /// nothing references is removed: retired before a crash, or written
    /// by a commit that never landed. New bytes never go over referenced
    /// ones, even if the file lost its tail.
    pub fn reconcile(&self, referenced: &BTreeMap<u32, u64>) -> Result<()> {
        let mut w = self.writing();
        let unreferenced: Vec<u32> = self
            .files
            .read()
            .expect("segment lock is never poisoned")
            .keys()
            .copied()
            .filter(|s| *s != w.segment && !referenced.contains_key(s))
            .collect();
        w.retired.extend(unreferenced);
        if let Some(&end) = referenced.get(&w.segment) {
            if end > w.len {
                error!(
                    segment = w.segment,
                    kept = w.len,
                    referenced = end,
                    "a segment file is shorter than what the store references; the events in the missing part cannot be read"
                );
                w.len = end;
            }
        }
        for segment in referenced.keys() {
            if !self
                .files
                .read()
                .expect("segment lock is never poisoned")
                .contains_key(segment)
            {
                error!(segment, "a segment file the store references is missing");
            }
        }
        drop(w);
        self.remove_retired()
    }

    /// Lets reads through maps ([`Reads::Mapped`]) hold up to `budget`
    /// bytes mapped at once; 0 (as opened): no maps.
    pub fn map_reads(&mut self, budget: u64) {
        #[cfg(target_os = "linux")]
        {
            self.maps = Maps::new(budget);
        }
        #[cfg(not(target_os = "linux"))]
        let _ = budget;
    }

    /// Bytes the maps may hold mapped: whole blocks around the pages read
    /// through them.
    pub fn mapped_bytes(&self) -> u64 {
        #[cfg(target_os = "linux")]
        return self.maps.mapped_bytes();
        #[cfg(not(target_os = "linux"))]
        0
    }

    fn writing(&self) -> MutexGuard<'_, Writing> {
        self.writing.lock().expect("segment lock is never poisoned")
    }

    /// Appends `bytes` outside any frame (the conversion of an older
    /// store); durable after the next [`Segments::sync`].
    pub fn append(&self, bytes: &[u8]) -> Result<Loc> {
        let len = u32::try_from(bytes.len())
            .map_err(|_| StoreError::Backend("a chunk over 4 GiB".into()))?;
        let mut w = self.writing();
        self.make_room(&mut w, u64::from(len))?;
        let loc = Loc {
            segment: w.segment,
            offset: w.len,
            len,
        };
        w.file
            .file
            .write_all_at(bytes, w.len)
            .map_err(|e| io_error("cannot write to", &self.path(w.segment), &e))?;
        w.len += u64::from(len);
        w.file.written.store(w.len, Ordering::Release);
        w.dirty = true;
        Ok(loc)
    }

    /// Starts a new segment if `len` more bytes would take the current one
    /// past [`SEGMENT_BYTES`] (and it holds any).
    fn make_room(&self, w: &mut Writing, len: u64) -> Result<()> {
        if w.len == 0 || w.len + len <= SEGMENT_BYTES {
            return Ok(());
        }
        let segment = w.segment + 1;
        let file = Segment::new(create(&self.dir, segment)?, 0);
        self.files
            .write()
            .expect("segment lock is never poisoned")
            .insert(segment, Arc::clone(&file));
        let old = std::mem::replace(&mut w.file, file);
        if w.dirty {
            w.closed.push(old);
        }
        w.segment = segment;
        w.len = 0;
        Ok(())
    }

    /// Starts the frame of a commit whose chunks hold `chunk_bytes`; the
    /// chunks go in with [`Frame::put`], and [`Segments::finish`] ends it.
    pub fn begin(&self, chunk_bytes: u64) -> Result<Frame> {
        let mut w = self.writing();
        self.make_room(&mut w, FRAME_HEAD + chunk_bytes)?;
        Ok(Frame {
            segment: w.segment,
            file: Arc::clone(&w.file),
            path: self.path(w.segment),
            start: w.len,
            at: w.len + FRAME_HEAD,
            crc: crc32fast::Hasher::new(),
        })
    }

    /// Ends `frame` with `writes`, the commit's writes to sled's index,
    /// and says where the frame ends; durable after the next
    /// [`Segments::sync`]. A frame that holds nothing is not written.
    pub fn finish(&self, mut frame: Frame, writes: &[u8]) -> Result<(u32, u64)> {
        let mut w = self.writing();
        if (w.segment, w.len) != (frame.segment, frame.start) {
            return Err(StoreError::Backend(format!(
                "a commit frame at {}:{} was begun while another was open",
                frame.segment, frame.start
            )));
        }
        let chunks = frame.at - frame.start - FRAME_HEAD;
        if chunks == 0 && writes.is_empty() {
            return Ok((w.segment, w.len));
        }
        frame.write(writes)?;
        let too_big = || StoreError::Backend("a commit over 4 GiB".into());
        let body = u32::try_from(frame.at - frame.start - FRAME_HEAD).map_err(|_| too_big())?;
        let chunks = u32::try_from(chunks).map_err(|_| too_big())?;
        let mut head = [0; FRAME_HEAD as usize];
        head[..4].copy_from_slice(&FRAME_MAGIC);
        head[4..8].copy_from_slice(&body.to_le_bytes());
        head[8..12].copy_from_slice(&chunks.to_le_bytes());
        frame.crc.update(&head[4..12]);
        head[12..].copy_from_slice(&frame.crc.finalize().to_le_bytes());
        frame
            .file
            .file
            .write_all_at(&head, frame.start)
            .map_err(|e| io_error("cannot write to", &frame.path, &e))?;
        w.len = frame.at;
        w.file.written.store(w.len, Ordering::Release);
        w.dirty = true;
        Ok((w.segment, w.len))
    }

    /// Where the next frame starts, or the segment before it when the
    /// current one is full: where a redo after the next open would begin.
    pub fn end(&self) -> (u32, u64) {
        let w = self.writing();
        (w.segment, w.len)
    }

    /// Calls `redo` with the writes of each whole frame from `segment` at
    /// `offset` on, in order, and where the frame ends; says how many
    /// frames there were. The frames end at the end of the last segment,
    /// or at a frame a crash cut short (it never landed: its commit was
    /// not answered).
    pub fn redo_from(
        &self,
        segment: u32,
        offset: u64,
        mut redo: impl FnMut(&[u8], (u32, u64)) -> Result<()>,
    ) -> Result<u64> {
        let files: Vec<(u32, Arc<Segment>)> = self
            .files
            .read()
            .expect("segment lock is never poisoned")
            .range(segment..)
            .map(|(s, f)| (*s, Arc::clone(f)))
            .collect();
        let mut frames = 0;
        let mut body = Vec::new();
        for (i, (s, file)) in files.iter().enumerate() {
            let (s, len) = (*s, file.written.load(Ordering::Acquire));
            let mut at = if s == segment { offset } else { 0 };
            while at < len {
                let Some((end, chunks)) = read_frame(&file.file, at, len, &mut body) else {
                    let after = &files[i + 1..];
                    if after
                        .iter()
                        .any(|(_, f)| f.written.load(Ordering::Acquire) > 0)
                    {
                        // Only the last commit can be cut short.
                        error!(
                            segment = s,
                            offset = at,
                            "a commit frame in the segments is damaged; the commits after it are not applied again, and those the index had not written to disk are lost"
                        );
                    } else {
                        // Not a warning: nothing answered is lost.
                        info!(
                            segment = s,
                            offset = at,
                            "the segments end in a commit a crash cut short; it was never answered, and is left out"
                        );
                    }
                    return Ok(frames);
                };
                redo(&body[chunks..], (s, end))?;
                frames += 1;
                at = end;
            }
        }
        Ok(frames)
    }

    /// Makes every appended byte durable.
    pub fn sync(&self) -> Result<()> {
        let mut w = self.writing();
        while let Some(segment) = w.closed.first() {
            segment
                .file
                .sync_data()
                .map_err(|e| io_error("cannot sync", &self.dir, &e))?;
            w.closed.remove(0);
        }
        if w.dirty {
            w.file
                .file
                .sync_data()
                .map_err(|e| io_error("cannot sync", &self.path(w.segment), &e))?;
            w.dirty = false;
        }
        Ok(())
    }

    /// The segment being appended to: never retired.
    pub fn current(&self) -> u32 {
        self.writing().segment
    }

    /// Marks `segment` for removal once sled has synced the change that
    /// stopped referencing it ([`Segments::remove_retired`]).
    pub fn retire(&self, segment: u32) {
        self.writing().retired.push(segment);
    }

    /// Removes the retired segments: call after sled's sync.
    pub fn remove_retired(&self) -> Result<()> {
        let retired = std::mem::take(&mut self.writing().retired);
        for segment in retired {
            self.files
                .write()
                .expect("segment lock is never poisoned")
                .remove(&segment);
            let path = self.path(segment);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error("cannot remove", &path, &e)),
            }
        }
        Ok(())
    }

    /// Reads the chunk at `loc` into `buf` (replacing what it held).
    pub fn read(&self, loc: Loc, buf: &mut Vec<u8>) -> Result<()> {
        self.read_with(loc, buf, Reads::Waiting)
    }

    /// [`Segments::read`], with [`Reads::Cached`] failing with
    /// [`StoreError::Uncached`] where the read would wait for the disk.
    pub fn read_with(&self, loc: Loc, buf: &mut Vec<u8>, reads: Reads) -> Result<()> {
        let mut into = ReadBuf::from(std::mem::take(buf));
        let read = self.read_ahead(loc, 0, &mut into, reads);
        *buf = into.into_filled();
        read
    }

    /// Reads the chunk at `loc` into `buf` (replacing what it held),
    /// followed by up to `ahead` more bytes of the segment, as far as it
    /// was written in full: the chunks after one are often there. With
    /// [`Reads::Cached`], fails with [`StoreError::Uncached`] when part of
    /// those bytes is not in the page cache.
    pub fn read_ahead(&self, loc: Loc, ahead: u32, buf: &mut ReadBuf, reads: Reads) -> Result<()> {
        let segment = self.segment(loc.segment)?;
        #[cfg(test)]
        self.reads.fetch_add(1, Ordering::Relaxed);
        let written = segment.written.load(Ordering::Acquire);
        let end = loc.offset + u64::from(loc.len);
        let more = u32::try_from(written.saturating_sub(end)).unwrap_or(u32::MAX);
        let len = loc.len.saturating_add(ahead.min(more));
        let into = buf.room(len as usize);
        let read = match reads {
            Reads::Waiting => segment.file.read_exact_at(into, loc.offset).map(|()| true),
            Reads::Cached => read_cached(&segment.file, into, loc.offset),
            Reads::Mapped => self.read_mapped(&segment, into, loc.offset, written),
        };
        match read {
            Ok(true) => Ok(()),
            Ok(false) => {
                buf.clear();
                Err(StoreError::Uncached)
            }
            Err(e) => {
                buf.clear();
                Err(StoreError::Damaged(format!(
                    "segment {} has no {len} bytes at {}: {e}",
                    loc.segment, loc.offset
                )))
            }
        }
    }

    /// The bytes at `loc` where they lie in the segment's map, when they
    /// are in memory ([`Reads::Mapped`] without the copy). With
    /// [`View::Unmapped`], a read of them is left to the caller, with
    /// [`Reads::Cached`]: the map already counted this one.
    pub fn view(&self, loc: Loc) -> Result<View> {
        #[cfg(target_os = "linux")]
        if self.maps.enabled() {
            let segment = self.segment(loc.segment)?;
            let written = segment.written.load(Ordering::Acquire);
            if loc.offset + u64::from(loc.len) > written {
                return Ok(View::Unmapped);
            }
            if self.maps.due() {
                self.forget_mapped();
            }
            let map = segment
                .map
                .get_or_init(|| Map::new(&segment.file, written.max(SEGMENT_BYTES)));
            let bytes = match map
                .as_ref()
                .map(|map| map.bytes(loc.offset, loc.len as usize, &self.maps))
            {
                Some(Paged::InMemory(bytes)) => std::ptr::NonNull::from(bytes),
                Some(Paged::NotInMemory) => return Ok(View::Uncached),
                Some(Paged::Left) | None => return Ok(View::Unmapped),
            };
            return Ok(View::Mapped(MappedBytes {
                _segment: segment,
                bytes,
            }));
        }
        let _ = loc;
        Ok(View::Unmapped)
    }

    /// A [`Reads::Mapped`] read of `into.len()` bytes at `offset`:
    /// through the segment's map where it can serve it, else as
    /// [`Reads::Cached`].
    fn read_mapped(
        &self,
        segment: &Segment,
        into: &mut [u8],
        offset: u64,
        written: u64,
    ) -> std::io::Result<bool> {
        #[cfg(target_os = "linux")]
        if self.maps.enabled() {
            if self.maps.due() {
                self.forget_mapped();
            }
            let map = segment
                .map
                .get_or_init(|| Map::new(&segment.file, written.max(SEGMENT_BYTES)));
            // Only bytes written in full are read through the map: the
            // file holds them, where a page past its end would kill the
            // process with SIGBUS.
            let within = offset
                .checked_add(into.len() as u64)
                .is_some_and(|end| end <= written);
            if let Some(copied) = map
                .as_ref()
                .filter(|_| within)
                .and_then(|map| map.copy(offset, into, &self.maps))
            {
                return Ok(copied);
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = written;
        read_cached(&segment.file, into, offset)
    }

    /// Has every map forget the pages it knows ([`Map::forget`]).
    #[cfg(target_os = "linux")]
    fn forget_mapped(&self) {
        let files = self.files.read().expect("segment lock is never poisoned");
        for map in files.values().filter_map(|s| s.map.get()?.as_ref()) {
            map.forget();
        }
        self.maps.forgotten();
    }

    /// Positioned reads made so far.
    #[cfg(test)]
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    fn segment(&self, segment: u32) -> Result<Arc<Segment>> {
        self.files
            .read()
            .expect("segment lock is never poisoned")
            .get(&segment)
            .cloned()
            .ok_or_else(|| StoreError::Damaged(format!("segment {segment} is missing")))
    }

    fn path(&self, segment: u32) -> PathBuf {
        self.dir.join(file_name(segment))
    }
}

/// Fills `buf` from `offset` of `file` with what the page cache holds:
/// `false` as soon as a read would wait for the disk. Without a way to ask
/// that (`RWF_NOWAIT` is Linux's, and some file systems refuse it), it
/// reads and waits.
#[cfg(target_os = "linux")]
fn read_cached(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;

    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        let iov = libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        };
        let at = offset + done as u64;
        let at = libc::off_t::try_from(at).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        // SAFETY: the one iovec points at `rest`, which is borrowed
        // mutably, so nothing else reads or writes it during the call; the
        // kernel writes at most `rest.len()` bytes there.
        let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, at, libc::RWF_NOWAIT) };
        match usize::try_from(n) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            // Short when the page cache holds only the first part: the
            // next read says whether the rest would wait.
            Ok(n) => done += n,
            Err(_) => {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => return Ok(false),
                    Some(libc::EINTR) => {}
                    Some(libc::EOPNOTSUPP | libc::ENOSYS) => {
                        return file
                            .read_exact_at(rest, offset + done as u64)
                            .map(|()| true)
                    }
                    _ => return Err(e),
                }
            }
        }
    }
    Ok(true)
}

#[cfg(not(target_os = "linux"))]
fn read_cached(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<bool> {
    file.read_exact_at(buf, offset).map(|()| true)
}

fn file_name(segment: u32) -> String {
    format!("{segment:010}.seg")
}

fn segment_of(path: &Path) -> Option<u32> {
    let name = path.file_name()?.to_str()?;
    name.strip_suffix(".seg")?.parse().ok()
}

fn open_file(path: &Path, create: bool) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(create)
        .open(path)
        .map_err(|e| io_error("cannot open", path, &e))
}

/// Creates segment `segment` and makes its directory entry durable.
fn create(dir: &Path, segment: u32) -> Result<File> {
    let file = open_file(&dir.join(file_name(segment)), true)?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("cannot sync", dir, &e))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_read_back_across_segments_and_reopen() -> Result<()> {
        let dir = tempfile::tempdir().expect("temp dir");
        let chunk = |i: u8| vec![i; 20 * 1024 * 1024];
        let locs = {
            let segments = Segments::open(dir.path())?;
            let locs: Vec<Loc> = (0..5)
                .map(|i| segments.append(&chunk(i)))
                .collect::<Result<_>>()?;
            segments.sync()?;
            locs
        };
        assert!(locs.iter().any(|l| l.segment > 1), "{locs:?}");
        let segments = Segments::open(dir.path())?;
        let mut buf = Vec::new();
        for (i, loc) in (0u8..).zip(&locs) {
            assert_eq!(Loc::decode(&loc.encode())?, *loc);
            segments.read(*loc, &mut buf)?;
            assert!(buf == chunk(i), "chunk {i}");
        }
        // Appends continue after what is there.
        let next = segments.append(b"more")?;
        assert_eq!(next.segment, segments.current());
        assert!(locs
            .iter()
            .all(|l| (l.segment, l.offset) < (next.segment, next.offset)));
        Ok(())
    }

    /// Asks the kernel to drop `dir`'s segment files from the page cache,
    /// as its reclaim does with a log left untouched.
    #[cfg(target_os = "linux")]
    fn page_out(dir: &Path) {
        use std::os::fd::AsRawFd;
        for entry in fs::read_dir(dir.join(DIR)).expect("segments listed") {
            let file = File::open(entry.expect("segment listed").path()).expect("segment opened");
            // SAFETY: a plain system call on a descriptor `file` holds open.
            let rc =
                unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            assert_eq!(rc, 0, "posix_fadvise");
        }
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn cached_reads_refuse_what_the_page_cache_dropped() -> Result<()> {
        let dir = tempfile::tempdir().expect("temp dir");
        let segments = Segments::open(dir.path())?;
        let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        let loc = segments.append(&chunk)?;
        segments.sync()?;
        let mut buf = ReadBuf::default();
        segments.read_ahead(loc, 0, &mut buf, Reads::Cached)?;
        assert!(*buf == chunk[..], "written and synced, still in memory");
        // The kernel may keep a page another CPU still holds a reference
        // to; it lets go soon after.
        let mut refused = Ok(());
        for _ in 0..20 {
            page_out(dir.path());
            refused = segments.read_ahead(loc, 0, &mut buf, Reads::Cached);
            if refused.is_err() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(matches!(refused, Err(StoreError::Uncached)), "{refused:?}");
        assert!(buf.is_empty(), "nothing half read is left");
        segments.read_ahead(loc, 0, &mut buf, Reads::Waiting)?;
        assert!(*buf == chunk[..], "read from the disk");
        segments.read_ahead(loc, 0, &mut buf, Reads::Cached)?;
        assert!(*buf == chunk[..], "in memory again");
        Ok(())
    }

    /// Reads `loc` as `reads` until one is refused for want of memory,
    /// dropping the segments from the page cache before each.
    #[cfg(target_os = "linux")]
    fn refused_once_paged_out(
        dir: &Path,
        segments: &Segments,
        loc: Loc,
        reads: Reads,
    ) -> Result<()> {
        let mut buf = ReadBuf::default();
        // The kernel may keep a page another CPU still holds a reference
        // to; it lets go soon after.
        let mut refused = Ok(());
        for _ in 0..20 {
            page_out(dir);
            refused = segments.read_ahead(loc, 0, &mut buf, reads);
            if refused.is_err() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        match refused {
            Err(StoreError::Uncached) => Ok(()),
            other => panic!("{reads:?} read after a page-out: {other:?}"),
        }
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn mapped_reads_copy_pages_known_in_memory_and_leave_the_rest_to_the_disk() -> Result<()> {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut segments = Segments::open(dir.path())?;
        segments.map_reads(1 << 20);
        let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        let loc = segments.append(&chunk)?;
        let after = segments.append(&[7; 5_000])?;
        segments.sync()?;
        refused_once_paged_out(dir.path(), &segments, loc, Reads::Mapped)?;
        assert_eq!(segments.mapped_bytes(), 0, "no page known");

        let mut buf = ReadBuf::default();
        segments.read_ahead(loc, 0, &mut buf, Reads::Waiting)?;
        // The refused read was the first of these pages: this one maps them.
        segments.read_ahead(loc, 0, &mut buf, Reads::Mapped)?;
        assert!(*buf == chunk[..], "read through the map");
        assert_eq!(segments.mapped_bytes(), 64 * 1024, "its 16 pages known");
        segments.read_ahead(after, 0, &mut buf, Reads::Mapped)?;
        assert_eq!(
            segments.mapped_bytes(),
            64 * 1024,
            "mapped from the second read on"
        );
        segments.read_ahead(after, 0, &mut buf, Reads::Mapped)?;
        assert_eq!(segments.mapped_bytes(), 128 * 1024);
        let mut waited = ReadBuf::default();
        for (at, ahead) in [(loc, 100_000), (loc.part(1_000, 3_000), 0), (after, 10)] {
            segments.read_ahead(at, ahead, &mut buf, Reads::Mapped)?;
            segments.read_ahead(at, ahead, &mut waited, Reads::Waiting)?;
            assert!(
                *buf == *waited,
                "{at:?} and {ahead} ahead, as read with pread"
            );
        }
        assert_eq!(*buf, [7; 5_000]);

        // Bytes past what was written are not in the file: refused as
        // damaged, where a map would have killed the process.
        let past = Loc {
            len: 10_000,
            ..after
        };
        let damaged = segments.read_ahead(past, 0, &mut buf, Reads::Mapped);
        assert!(
            matches!(damaged, Err(StoreError::Damaged(_))),
            "{damaged:?}"
        );

        // Forgotten at renewal, pages are asked about again.
        segments.forget_mapped();
        assert_eq!(segments.mapped_bytes(), 0);
        refused_once_paged_out(dir.path(), &segments, loc, Reads::Mapped)?;
        Ok(())
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn mapped_reads_past_their_budget_or_turned_off_read_with_system_calls() -> Result<()> {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut segments = Segments::open(dir.path())?;
        let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 249) as u8).collect();
        let (a, b) = (segments.append(&chunk)?, segments.append(&chunk)?);
        segments.sync()?;
        let mut buf = ReadBuf::default();
        segments.read_ahead(a, 0, &mut buf, Reads::Mapped)?;
        assert!(*buf == chunk[..], "maps turned off");
        assert_eq!(segments.mapped_bytes(), 0);

        segments.map_reads(80 * 1024);
        for _ in 0..2 {
            segments.read_ahead(a, 0, &mut buf, Reads::Mapped)?;
            assert!(*buf == chunk[..]);
        }
        let known = segments.mapped_bytes();
        assert_eq!(known, 64 * 1024);
        for _ in 0..2 {
            segments.read_ahead(b, 0, &mut buf, Reads::Mapped)?;
        }
        assert!(*buf == chunk[..], "past the budget");
        assert_eq!(segments.mapped_bytes(), known, "no more pages known");
        // Past the budget, reads still refuse to wait for the disk.
        refused_once_paged_out(dir.path(), &segments, b, Reads::Mapped)?;
        Ok(())
    }

    #[test]
    fn reads_ahead_only_what_was_written_in_full() -> Result<()> {
        let dir = tempfile::tempdir().expect("temp dir");
        let segments = Segments::open(dir.path())?;
        let a = segments.append(&[1; 100])?;
        let mut buf = ReadBuf::default();
        segments.read_ahead(a, 1_000, &mut buf, Reads::Waiting)?;
        assert_eq!(*buf, [1; 100]);
        let b = segments.append(&[2; 200])?;
        segments.read_ahead(a, 1_000, &mut buf, Reads::Waiting)?;
        assert_eq!(buf.len(), 300);
        assert_eq!(buf[100..], [2; 200]);
        segments.read_ahead(a, 50, &mut buf, Reads::Waiting)?;
        assert_eq!(buf.len(), 150);
        segments.read_ahead(b, 1_000, &mut buf, Reads::Waiting)?;
        assert_eq!(*buf, [2; 200]);
        // After a reopen, the file's length is what was written.
        drop(segments);
        let segments = Segments::open(dir.path())?;
        segments.read_ahead(a, 1_000, &mut buf, Reads::Waiting)?;
        assert_eq!(buf.len(), 300);
        // Bytes in the file past what appends have reached (as a write in
        // progress leaves them) are left out.
        let path = segments.path(segments.current());
        OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.write_all_at(&[9; 50], 300))
            .expect("write past the appends");
        segments.read_ahead(b, 1_000, &mut buf, Reads::Waiting)?;
        assert_eq!(*buf, [2; 200]);
        Ok(())
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn views_read_bytes_in_the_map_and_outlive_a_renewal_and_their_segment() -> Result<()> {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut segments = Segments::open(dir.path())?;
        segments.map_reads(1 << 20);
        let big: Vec<u8> = (0..40 << 20).map(|i| (i % 251) as u8).collect();
        let first = segments.append(&big)?;
        let second = segments.append(&big)?;
        assert_ne!(first.segment, second.segment);
        segments.sync()?;
        let part = first.part(1_000, 9_000);
        assert!(
            matches!(segments.view(part)?, View::Unmapped),
            "the block's first read is left to a system call"
        );
        let View::Mapped(bytes) = segments.view(part)? else {
            panic!("the block's second read is not mapped");
        };
        assert!(*bytes == big[1_000..9_000]);
        assert_eq!(segments.mapped_bytes(), 64 * 1024);

        segments.forget_mapped();
        assert!(*bytes == big[1_000..9_000], "read again once unmapped");
        segments.retire(first.segment);
        segments.remove_retired()?;
        assert!(segments.view(part).is_err(), "the segment is gone");
        assert!(*bytes == big[1_000..9_000], "the view holds the map");
        drop(bytes);

        // Pages not in memory are refused, not waited for.
        let part = second.part(0, 8_000);
        let mut refused = false;
        for _ in 0..20 {
            segments.forget_mapped();
            assert!(matches!(segments.view(part)?, View::Unmapped));
            page_out(dir.path());
            if matches!(segments.view(part)?, View::Uncached) {
                refused = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(refused, "a view of pages the page cache dropped");
        Ok(())
    }

    #[test]
    fn retired_segments_go_only_when_asked() -> Result<()> {
        let dir = tempfile::tempdir().expect("temp dir");
        let segments = Segments::open(dir.path())?;
        let first = segments.append(&vec![1; 40 * 1024 * 1024])?;
        let second = segments.append(&vec![2; 40 * 1024 * 1024])?;
        assert_ne!(first.segment, second.segment);
        segments.retire(first.segment);
        let mut buf = Vec::new();
        segments.read(first, &mut buf)?;
        segments.remove_retired()?;
        assert!(segments.read(first, &mut buf).is_err());
        segments.read(second, &mut buf)?;
        assert_eq!(buf.len(), 40 * 1024 * 1024);
        Ok(())
    }

    /// Appends a frame of `chunk` and `writes`, synced; gives the chunk's
    /// location and where the frame ends.
    fn frame(segments: &Segments, chunk: &[u8], writes: &[u8]) -> Result<(Loc, (u32, u64))> {
        let mut frame = segments.begin(chunk.len() as u64)?;
        let loc = frame.put(chunk)?;
        let end = segments.finish(frame, writes)?;
        segments.sync()?;
        Ok((loc, end))
    }

    /// A frame's writes and where it ends.
    type Redone = (Vec<u8>, (u32, u64));

    fn redone(segments: &Segments, from: (u32, u64)) -> Result<Vec<Redone>> {
        let mut out = Vec::new();
        segments.redo_from(from.0, from.1, |writes, end| {
            out.push((writes.to_vec(), end));
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn frames_are_redone_in_order_across_segments_up_to_a_damaged_one() -> Result<()> {
        let dir = tempfile::tempdir().expect("temp dir");
        let segments = Segments::open(dir.path())?;
        let (_, first) = frame(&segments, &[1; 100], b"one")?;
        let (big, second) = frame(&segments, &vec![2; 70 * 1024 * 1024], b"two")?;
        let (third_loc, third) = frame(&segments, &[3; 10], b"three")?;
        assert_eq!(big.segment, 2, "a frame that does not fit starts a segment");
        assert_eq!(third_loc.segment, 3);
        // A frame holds only its writes and no chunk, and an empty one is
        // not written.
        let fourth = segments.finish(segments.begin(0)?, b"four")?;
        assert_eq!(segments.finish(segments.begin(0)?, b"")?, fourth);
        segments.sync()?;
        let mut buf = Vec::new();
        segments.read(third_loc, &mut buf)?;
        assert_eq!(buf, [3; 10]);

        let all = redone(&segments, (1, 0))?;
        let writes: Vec<&[u8]> = all.iter().map(|(w, _)| w.as_slice()).collect();
        assert_eq!(writes, [&b"one"[..], b"two", b"three", b"four"]);
        assert_eq!(
            all.iter().map(|(_, end)| *end).collect::<Vec<_>>(),
            [first, second, third, fourth]
        );
        // From where a frame ends, the ones after it; from past the end of
        // a segment, the next segment's.
        assert_eq!(redone(&segments, first)?.len(), 3);
        assert_eq!(redone(&segments, second)?.len(), 2);
        assert_eq!(redone(&segments, fourth)?.len(), 0);

        // A byte changed in the third frame's chunk: the redo stops
        // before it.
        OpenOptions::new()
            .write(true)
            .open(segments.path(3))
            .and_then(|f| f.write_all_at(&[9], third_loc.offset + 4))
            .expect("damage the frame");
        let writes: Vec<Vec<u8>> = redone(&segments, (1, 0))?
            .into_iter()
            .map(|(w, _)| w)
            .collect();
        assert_eq!(writes, [b"one".to_vec(), b"two".to_vec()]);
        Ok(())
    }
}
