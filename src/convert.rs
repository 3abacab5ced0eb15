//! `extblk convert` and `extblk compare`: copy a virtual disk between formats, or compare two,
//! over [`DiskSource`]s (the format-neutral reading of a disk).
//!
//! Convert copies only what can hold data: the source's holes and unwritten extents are never
//! read, and 4 KiB blocks of zeroes inside its data are not written, so the destination stays
//! as sparse as the source's content allows (as `qemu-img convert -S 4k`).
//!
//! - **to an extblk image**: a fresh image of the same virtual size, made by `create`'s code,
//!   then written through the image engine exactly as the daemon writes a guest's requests:
//!   allocating writes, conversions and commits through the jbd2 journal, a FLUSH and a clean
//!   close at the end. The engine's allocation unit is one block: a larger unit would fill the
//!   skipped zero blocks around each write with zeroes and allocate them.
//! - **to raw**: a sparse file of the virtual size with the data written where it belongs.
//!   Regular files only: on a block device the skipped ranges would keep whatever the device
//!   held before.
//!
//! The destination must not exist unless `force`: unlike qemu-img, which overwrites, convert
//! refuses, as `create` does, so a typo cannot replace a disk. Even with `force` an extblk
//! destination is overwritten only once its image lock is held (`create --force`): an image
//! a daemon serves is never touched. A destination this run created is removed if the copy
//! fails.

use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use serde::Serialize;
use thiserror::Error;

use crate::disk_source::{DiskSource, Segment, SourceError, SourceFormat};
use crate::engine::image::{EngineOptions, ImageEngine, ImageQueue};
use crate::engine::{BlockEngine, Completion, EngineError, EngineOp, EngineQueue, GuestBuffers};
use crate::ext4::BLOCK_SIZE_U64;
use crate::image::ImageError;
use crate::io::backing::{Backing, OpenError};
use crate::io::{sys, BlockIo, FileIo};
use crate::units::Bytes;

const BS: u64 = BLOCK_SIZE_U64;
/// Bytes read (and at most written) at once: the device's largest request (`size_max`).
const CHUNK: u64 = 1 << 20;
/// Writes in flight through the image engine: enough to keep the worker's conversions and
/// the data I/O overlapping, with a bounded 8 MiB of buffers.
const DEPTH: usize = 8;

/// The formats convert writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DestFormat {
    Raw,
    Extblk,
}

impl std::fmt::Display for DestFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DestFormat::Raw => "raw",
            DestFormat::Extblk => "extblk",
        })
    }
}

#[derive(Debug, Error)]
pub enum ConvertError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("{0} already exists (use --force to overwrite it)")]
    Exists(PathBuf),
    #[error("{0}: the source and the destination are the same file")]
    SameFile(PathBuf),
    #[error("{0}: raw output to a block device is not supported (skipped zero ranges would keep the device's old data); write an extblk image, or use dd")]
    RawToDevice(PathBuf),
    #[error("{0}: not a regular file or block device")]
    NotFileOrDevice(PathBuf),
    #[error("{0}: {1}")]
    Create(PathBuf, ImageError),
    #[error("{0}: {1}")]
    Io(PathBuf, io::Error),
    #[error("{0}: {1}")]
    Engine(PathBuf, EngineError),
}

/// What `convert` is asked to do.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// The source's format; `None`: detected.
    pub source_format: Option<SourceFormat>,
    pub dest_format: DestFormat,
    /// Overwrite an existing destination (an extblk one only once its lock is held).
    pub force: bool,
    /// Journal size of a new extblk image, in blocks (`create --journal-size`).
    pub journal_blocks: Option<u64>,
}

/// What a conversion did (`--output json`).
#[derive(Clone, Debug, Serialize)]
pub struct ConvertSummary {
    pub source: String,
    pub destination: String,
    pub source_format: SourceFormat,
    pub destination_format: DestFormat,
    pub virtual_size: u64,
    /// Bytes written to the destination.
    pub bytes_copied: u64,
    /// Bytes not written: holes, unwritten extents and blocks of zeroes.
    pub bytes_skipped: u64,
    pub seconds: f64,
}

/// Copies the disk of `src` into a new `dst`. `note` is told a detection note once the source
/// is open; `progress` the bytes of the disk done so far, after every chunk.
pub fn convert(
    src: &Path,
    dst: &Path,
    opts: &ConvertOptions,
    note: &dyn Fn(&str),
    progress: &dyn Fn(u64, u64),
) -> Result<ConvertSummary, ConvertError> {
    let started = Instant::now();
    let existed = match std::fs::symlink_metadata(dst) {
        Ok(m) => {
            if !opts.force {
                return Err(ConvertError::Exists(dst.to_path_buf()));
            }
            let ft = std::fs::metadata(dst)
                .map(|m| m.file_type())
                .unwrap_or(m.file_type());
            if !ft.is_file() && !ft.is_block_device() {
                return Err(ConvertError::NotFileOrDevice(dst.to_path_buf()));
            }
            if ft.is_block_device() && opts.dest_format == DestFormat::Raw {
                return Err(ConvertError::RawToDevice(dst.to_path_buf()));
            }
            true
        }
        Err(_) => false,
    };
    // A qcow2 source's raw copy goes beside the destination: the space it needs is where the
    // user expects to spend it, and usually not a small /tmp.
    let temp_dir = match dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let source = DiskSource::open(src, opts.source_format, &temp_dir)?;
    if let Some(n) = source.note() {
        note(n);
    }
    if existed && source.is_file(dst) {
        return Err(ConvertError::SameFile(dst.to_path_buf()));
    }
    let size = source.size();
    let result = (|| -> Result<u64, ConvertError> {
        let mut sink: Box<dyn Sink> = match opts.dest_format {
            DestFormat::Raw => Box::new(RawSink::create(dst, size, existed)?),
            DestFormat::Extblk => Box::new(ImageSink::create(dst, size, opts)?),
        };
        let copied = copy(&source, &mut *sink, &|done| progress(done, size))?;
        sink.finish()?;
        Ok(copied)
    })();
    let copied = match result {
        Ok(c) => c,
        Err(e) => {
            // Ours to remove only if this run made it (not one that appeared meanwhile).
            if !existed && !matches!(e, ConvertError::Exists(_)) {
                let _ = std::fs::remove_file(dst);
            }
            return Err(e);
        }
    };
    Ok(ConvertSummary {
        source: src.display().to_string(),
        destination: dst.display().to_string(),
        source_format: source.format(),
        destination_format: opts.dest_format,
        virtual_size: size,
        bytes_copied: copied,
        bytes_skipped: size - copied,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Is every byte zero? (No early exit: the OR of a block vectorises, and blocks are small.)
fn is_zero(b: &[u8]) -> bool {
    b.iter().fold(0u8, |a, &x| a | x) == 0
}

/// Copies the data segments of `src` into `sink`, chunk by chunk, leaving out 4 KiB blocks
/// of zeroes; returns the bytes written.
fn copy(
    src: &DiskSource,
    sink: &mut dyn Sink,
    progress: &dyn Fn(u64),
) -> Result<u64, ConvertError> {
    let mut copied = 0;
    for seg in src.segments()? {
        if !seg.data {
            progress(seg.end());
            continue;
        }
        let mut pos = seg.offset;
        while pos < seg.end() {
            let end = ((pos / CHUNK + 1) * CHUNK).min(seg.end());
            let mut buf = vec![0u8; (end - pos) as usize];
            src.read_at(&mut buf, pos)?;
            // Runs of non-zero blocks, the blocks aligned on the disk (not on the chunk).
            let mut runs: Vec<(usize, usize)> = Vec::new();
            let mut i = 0;
            while i < buf.len() {
                let block_end = ((((pos + i as u64) / BS + 1) * BS - pos) as usize).min(buf.len());
                if !is_zero(&buf[i..block_end]) {
                    match runs.last_mut() {
                        Some(r) if r.1 == i => r.1 = block_end,
                        _ => runs.push((i, block_end)),
                    }
                }
                i = block_end;
            }
            if runs.len() == 1 && runs[0] == (0, buf.len()) {
                copied += buf.len() as u64;
                sink.write(pos, buf)?;
            } else {
                for (s, e) in runs {
                    copied += (e - s) as u64;
                    sink.write(pos + s as u64, buf[s..e].to_vec())?;
                }
            }
            progress(end);
            pos = end;
        }
    }
    Ok(copied)
}

/// Where converted data goes.
trait Sink {
    fn write(&mut self, offset: u64, data: Vec<u8>) -> Result<(), ConvertError>;
    /// Makes everything durable and releases the destination.
    fn finish(self: Box<Self>) -> Result<(), ConvertError>;
}

/// A raw destination: a sparse regular file.
struct RawSink {
    backing: Backing,
}

impl RawSink {
    fn create(path: &Path, size: u64, existed: bool) -> Result<RawSink, ConvertError> {
        let mut open = std::fs::OpenOptions::new();
        open.read(true).write(true);
        if !existed {
            open.create_new(true);
        }
        // No O_TRUNC: emptied only once locked, as `create --force` does.
        let file = open.open(path).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => ConvertError::Exists(path.to_path_buf()),
            _ => ConvertError::Io(path.to_path_buf(), e),
        })?;
        let mut backing = Backing::lock(file, path, false)?;
        backing.set_len(0)?;
        backing.set_len(size)?;
        Ok(RawSink { backing })
    }
}

impl Sink for RawSink {
    fn write(&mut self, offset: u64, data: Vec<u8>) -> Result<(), ConvertError> {
        self.backing
            .file
            .write_all_at(&data, offset)
            .map_err(|e| ConvertError::Io(self.backing.path.clone(), e))
    }

    fn finish(self: Box<Self>) -> Result<(), ConvertError> {
        sys::fdatasync(&self.backing.file)
            .map_err(|e| ConvertError::Io(self.backing.path.clone(), e))
    }
}

/// The completion of one request sent to the image engine: its result, back to the writer.
struct Sent(mpsc::Sender<Result<(), EngineError>>);

impl Completion for Sent {
    fn complete(self, r: Result<(), EngineError>) {
        let _ = self.0.send(r);
    }
}

/// An extblk destination: a new image written through the image engine, one queue driven
/// from this thread as a virtqueue thread drives it (submit, reap the ring's completions;
/// allocating writes complete from the worker, after their conversion).
struct ImageSink {
    path: PathBuf,
    engine: ImageEngine,
    queue: Option<ImageQueue<Sent>>,
    tx: mpsc::Sender<Result<(), EngineError>>,
    rx: mpsc::Receiver<Result<(), EngineError>>,
    in_flight: usize,
    closed: bool,
}

impl ImageSink {
    fn create(path: &Path, size: u64, opts: &ConvertOptions) -> Result<ImageSink, ConvertError> {
        let create = |e| ConvertError::Create(path.to_path_buf(), e);
        crate::image::create::create_path(path, size, opts.journal_blocks, opts.force).map_err(
            |e| match e {
                ImageError::Exists(p) => ConvertError::Exists(p),
                ImageError::Open(o) => ConvertError::Open(o),
                other => create(other),
            },
        )?;
        let io: Arc<dyn BlockIo> = Arc::new(FileIo::open(path, false)?);
        let engine = ImageEngine::open(
            io,
            EngineOptions {
                alloc_unit: 1,
                ..Default::default()
            },
        )
        .map_err(create)?;
        let queue = engine
            .open_queue::<Sent>(0)
            .map_err(|e| ConvertError::Engine(path.to_path_buf(), e))?;
        let (tx, rx) = mpsc::channel();
        Ok(ImageSink {
            path: path.to_path_buf(),
            engine,
            queue: Some(queue),
            tx,
            rx,
            in_flight: 0,
            closed: false,
        })
    }

    fn queue(&mut self) -> &mut ImageQueue<Sent> {
        self.queue.as_mut().expect("the queue lives until finish")
    }

    fn submit(&mut self, op: EngineOp) {
        let done = Sent(self.tx.clone());
        let q = self.queue();
        q.submit(op, done);
        q.submit_batch();
        self.in_flight += 1;
    }

    /// Takes the completions that arrived; with `wait`, waits until at least one has. The
    /// first failed request's error is returned (the others are still counted).
    fn reap(&mut self, wait: bool) -> Result<(), ConvertError> {
        let mut first_err = None;
        loop {
            self.queue().process_completions();
            let mut got = false;
            while let Ok(r) = self.rx.try_recv() {
                self.in_flight -= 1;
                got = true;
                if let Err(e) = r {
                    if first_err.is_none() {
                        first_err = Some(e);
                    }
                }
            }
            if got || !wait || self.in_flight == 0 {
                break;
            }
            // Ring completions wake the eventfd; the worker's come by the channel, which poll
            // cannot watch: a short timeout covers them.
            match self.queue().completion_fd() {
                Some(fd) => {
                    sys::poll_readable_for(fd, 1)
                        .map_err(|e| ConvertError::Io(self.path.clone(), e))?;
                }
                None => std::thread::sleep(std::time::Duration::from_millis(1)),
            }
        }
        match first_err {
            Some(e) => Err(ConvertError::Engine(self.path.clone(), e)),
            None => Ok(()),
        }
    }

    fn drain(&mut self) -> Result<(), ConvertError> {
        let mut first = Ok(());
        while self.in_flight > 0 {
            if let Err(e) = self.reap(true) {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }
}

impl Sink for ImageSink {
    fn write(&mut self, offset: u64, data: Vec<u8>) -> Result<(), ConvertError> {
        while self.in_flight >= DEPTH {
            self.reap(true)?;
        }
        let keep = Arc::new(data);
        let iov = libc::iovec {
            iov_base: keep.as_ptr() as *mut libc::c_void,
            iov_len: keep.len(),
        };
        // SAFETY: the buffer is the Vec in `keep`, which the GuestBuffers holds until the
        // request completes; nothing else refers to it, and the engine only reads it.
        let bufs = unsafe { GuestBuffers::new(vec![iov], keep) };
        self.submit(EngineOp::Write {
            offset: Bytes(offset),
            bufs,
            fua: false,
        });
        self.reap(false)
    }

    fn finish(mut self: Box<Self>) -> Result<(), ConvertError> {
        self.drain()?;
        // A FLUSH as a guest's, then the daemon's shutdown: commit, checkpoint, marked clean.
        self.submit(EngineOp::Flush);
        self.drain()?;
        self.queue = None;
        self.closed = true;
        self.engine
            .close()
            .map_err(|e| ConvertError::Engine(self.path.clone(), e))
    }
}

impl Drop for ImageSink {
    /// On an error: no request may be left in flight when its buffers go (the kernel may
    /// still read them), and the engine's threads end.
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        let _ = self.drain();
        self.queue = None;
        let _ = self.engine.close();
    }
}

/// The first byte offset at which the disks of `a` and `b` differ, `None` if they are the
/// same. The shorter disk reads as zeroes past its end (qemu-img compare without `--strict`).
/// Ranges that both sides know read as zeroes are not read. `progress`: bytes compared so far.
pub fn compare(
    a: &DiskSource,
    b: &DiskSource,
    progress: &dyn Fn(u64, u64),
) -> Result<Option<u64>, SourceError> {
    let total = a.size().max(b.size());
    let padded = |s: &DiskSource| -> Result<Vec<Segment>, SourceError> {
        let mut v = s.segments()?;
        if s.size() < total {
            v.push(Segment {
                offset: s.size(),
                len: total - s.size(),
                data: false,
            });
        }
        Ok(v)
    };
    let (sa, sb) = (padded(a)?, padded(b)?);
    let (mut i, mut j, mut pos) = (0, 0, 0);
    while pos < total {
        let (x, y) = (sa[i], sb[j]);
        let end = x.end().min(y.end());
        let found = match (x.data, y.data) {
            (false, false) => None,
            (true, false) => first_nonzero(a, pos, end)?,
            (false, true) => first_nonzero(b, pos, end)?,
            (true, true) => first_difference(a, b, pos, end)?,
        };
        if found.is_some() {
            return Ok(found);
        }
        progress(end, total);
        pos = end;
        if x.end() == end {
            i += 1;
        }
        if y.end() == end {
            j += 1;
        }
    }
    Ok(None)
}

fn first_nonzero(s: &DiskSource, mut pos: u64, end: u64) -> Result<Option<u64>, SourceError> {
    let mut buf = vec![0u8; CHUNK.min(end - pos) as usize];
    while pos < end {
        let n = CHUNK.min(end - pos) as usize;
        s.read_at(&mut buf[..n], pos)?;
        if let Some(k) = buf[..n].iter().position(|&x| x != 0) {
            return Ok(Some(pos + k as u64));
        }
        pos += n as u64;
    }
    Ok(None)
}

fn first_difference(
    a: &DiskSource,
    b: &DiskSource,
    mut pos: u64,
    end: u64,
) -> Result<Option<u64>, SourceError> {
    let len = CHUNK.min(end - pos) as usize;
    let (mut x, mut y) = (vec![0u8; len], vec![0u8; len]);
    while pos < end {
        let n = CHUNK.min(end - pos) as usize;
        a.read_at(&mut x[..n], pos)?;
        b.read_at(&mut y[..n], pos)?;
        if x[..n] != y[..n] {
            let k = x[..n]
                .iter()
                .zip(&y[..n])
                .position(|(p, q)| p != q)
                .unwrap_or(0);
            return Ok(Some(pos + k as u64));
        }
        pos += n as u64;
    }
    Ok(None)
}
