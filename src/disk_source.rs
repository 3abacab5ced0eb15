//! The virtual disk of a source, whatever holds it: a raw file or block device, an extblk
//! image, or a qcow2 image read through `qemu-img`. `convert` and `compare` see only this: the
//! disk's size, where its data may be (the rest reads as zeroes without any I/O) and reads at
//! any offset.
//!
//! - **raw**: the file's holes (`SEEK_DATA`/`SEEK_HOLE`) read as zeroes; a filesystem or device
//!   that cannot tell is all data.
//! - **extblk**: opened read-only, as `info` and `map` open it (a journal with committed
//!   transactions is read as replayed); only written extents are data, unwritten ones and holes
//!   read as zeroes. A restart log a killed daemon left is not applied (`check --repair` does).
//! - **qcow2**: `qemu-img convert -O raw -S 4k` into a sparse temporary file first, then read as
//!   raw. Simplest robust way: qemu-img knows every qcow2 variant (backing files, compression,
//!   encryption keys aside), and its sparse output keeps unallocated and zero clusters as holes,
//!   so the copy costs no more space than the data. The temporary file goes when the source
//!   drops.
//!
//! Autodetection (no `-f`): the qcow2 magic `QFI\xfb`; else an ext4 superblock that opens as an
//! extblk image (`/disk` in its root); else raw. An ext4 filesystem that is not an image (a
//! guest's filesystem on a whole raw disk) is raw, with a note saying why.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use thiserror::Error;

use crate::ext4::superblock::SUPERBLOCK_OFFSET;
use crate::ext4::{FormatError, BLOCK_SIZE_U64};
use crate::image::{Image, ImageError, OpenOptions, Run, RunKind};
use crate::io::backing::{Backing, OpenError};
use crate::io::{sys, BlockIo, FileIo};

/// The on-disk formats a virtual disk can be read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    Raw,
    Extblk,
    Qcow2,
}

impl std::fmt::Display for SourceFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SourceFormat::Raw => "raw",
            SourceFormat::Extblk => "extblk",
            SourceFormat::Qcow2 => "qcow2",
        })
    }
}

/// Why a source's disk could not be read. Each names the path, for a one-line message.
#[derive(Debug, Error)]
pub enum SourceError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("{0}: not an extblk image ({1})")]
    NotAnImage(PathBuf, FormatError),
    #[error("{0}: {1}")]
    Image(PathBuf, ImageError),
    #[error("{0}: {1}")]
    Io(PathBuf, io::Error),
    #[error("{0}: reading a qcow2 image needs qemu-img, which is not installed (apt-get install qemu-utils)")]
    NoQemuImg(PathBuf),
    #[error("{0}: qemu-img failed: {1}")]
    QemuImg(PathBuf, String),
}

/// A stretch of the disk: `data` ranges are read, the others read as zeroes without I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub len: u64,
    pub data: bool,
}

impl Segment {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// A temporary file removed on drop (qcow2 sources read through qemu-img).
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

enum Kind {
    Raw(Backing),
    Image {
        /// Boxed: an open image is large beside a raw file's descriptor.
        img: Box<Image>,
        /// The disk's runs, sorted, covering every block: looked up by `read_at`.
        runs: Vec<Run>,
    },
}

/// An open source: its disk, read-only (and locked shared, so no writer changes it meanwhile).
pub struct DiskSource {
    path: PathBuf,
    format: SourceFormat,
    size: u64,
    kind: Kind,
    /// Why autodetection read an ext4 filesystem as raw, for the user to see.
    note: Option<String>,
    /// Dropped after `kind` (field order): the raw copy of a qcow2 source.
    _temp: Option<TempFile>,
}

impl DiskSource {
    /// Opens `path` as `format`, or as detected. A qcow2 source is first copied to a sparse
    /// raw file in `temp_dir`.
    pub fn open(
        path: &Path,
        format: Option<SourceFormat>,
        temp_dir: &Path,
    ) -> Result<DiskSource, SourceError> {
        let (format, note) = match format {
            Some(f) => (f, None),
            None => detect(path)?,
        };
        match format {
            SourceFormat::Raw => Ok(DiskSource::raw(path, path, format, note, None)?),
            SourceFormat::Extblk => {
                let io: Arc<dyn BlockIo> = Arc::new(FileIo::open(path, true)?);
                let img =
                    Image::open(io, OpenOptions { read_only: true }).map_err(|e| match e {
                        ImageError::Format(f) => SourceError::NotAnImage(path.to_path_buf(), f),
                        other => SourceError::Image(path.to_path_buf(), other),
                    })?;
                let runs = img.runs();
                Ok(DiskSource {
                    path: path.to_path_buf(),
                    format,
                    size: img.disk_size(),
                    kind: Kind::Image {
                        img: Box::new(img),
                        runs,
                    },
                    note,
                    _temp: None,
                })
            }
            SourceFormat::Qcow2 => {
                let temp = qcow2_to_raw(path, temp_dir)?;
                let raw = temp.0.clone();
                DiskSource::raw(path, &raw, format, note, Some(temp))
            }
        }
    }

    fn raw(
        path: &Path,
        file: &Path,
        format: SourceFormat,
        note: Option<String>,
        temp: Option<TempFile>,
    ) -> Result<DiskSource, SourceError> {
        let b = Backing::open(file, true)?;
        Ok(DiskSource {
            path: path.to_path_buf(),
            format,
            size: b.size,
            kind: Kind::Raw(b),
            note,
            _temp: temp,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn format(&self) -> SourceFormat {
        self.format
    }

    /// The virtual disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Why autodetection chose raw for a file with an ext4 superblock, if it did.
    pub fn note(&self) -> Option<&str> {
        self.note.as_deref()
    }

    /// Is this (an open of) the file at `other`? Same device and inode.
    pub fn is_file(&self, other: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(&self.path), std::fs::metadata(other)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }

    /// The disk as data and zero segments, in order, covering `[0, size)`, neighbours of one
    /// kind merged.
    pub fn segments(&self) -> Result<Vec<Segment>, SourceError> {
        let mut out: Vec<Segment> = Vec::new();
        let mut push = |offset: u64, end: u64, data: bool| {
            if end <= offset {
                return;
            }
            match out.last_mut() {
                Some(l) if l.data == data && l.end() == offset => l.len = end - l.offset,
                _ => out.push(Segment {
                    offset,
                    len: end - offset,
                    data,
                }),
            }
        };
        match &self.kind {
            Kind::Raw(b) => {
                let mut pos = 0;
                while pos < self.size {
                    let data = match sys::seek_data(&b.file, pos) {
                        Ok(Some(d)) => d.min(self.size),
                        Ok(None) => self.size,
                        // No hole information here (a filesystem without SEEK_DATA): all data.
                        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => pos,
                        Err(e) => return Err(SourceError::Io(self.path.clone(), e)),
                    };
                    push(pos, data, false);
                    if data >= self.size {
                        break;
                    }
                    let hole = match sys::seek_hole(&b.file, data) {
                        Ok(Some(h)) => h.min(self.size),
                        Ok(None) => self.size,
                        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.size,
                        Err(e) => return Err(SourceError::Io(self.path.clone(), e)),
                    };
                    // A hole must end past where the data began; anything else (a file
                    // changed under us) would loop: read the rest as data.
                    let hole = if hole > data { hole } else { self.size };
                    push(data, hole, true);
                    pos = hole;
                }
            }
            Kind::Image { runs, .. } => {
                for r in runs {
                    let start = r.lblk * BLOCK_SIZE_U64;
                    let end = ((r.lblk + r.len) * BLOCK_SIZE_U64).min(self.size);
                    push(start, end, r.kind == RunKind::Data);
                }
            }
        }
        Ok(out)
    }

    /// Reads `buf.len()` bytes of the disk at `offset` (inside the disk): data from where it
    /// lives, zeroes for holes and unwritten extents.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), SourceError> {
        let err = |e| SourceError::Io(self.path.clone(), e);
        let end = offset + buf.len() as u64;
        if end > self.size {
            return Err(err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("read of {}+{} past the disk's end", offset, buf.len()),
            )));
        }
        match &self.kind {
            Kind::Raw(b) => b.file.read_exact_at(buf, offset).map_err(err),
            Kind::Image { img, runs } => {
                let mut pos = offset;
                while pos < end {
                    let lblk = pos / BLOCK_SIZE_U64;
                    // The run holding `lblk`: the last starting at or before it.
                    let i = runs.partition_point(|r| r.lblk <= lblk) - 1;
                    let r = &runs[i];
                    let run_end = ((r.lblk + r.len) * BLOCK_SIZE_U64).min(end);
                    let piece = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
                    match (r.kind, r.pblk) {
                        (RunKind::Data, Some(p)) => {
                            let at = p * BLOCK_SIZE_U64 + (pos - r.lblk * BLOCK_SIZE_U64);
                            img.io().read_at(piece, at).map_err(err)?;
                        }
                        _ => piece.fill(0),
                    }
                    pos = run_end;
                }
                Ok(())
            }
        }
    }
}

/// The format of `path` as autodetection sees it, with a note when an ext4 filesystem that is
/// not an extblk image is taken as raw.
pub fn detect(path: &Path) -> Result<(SourceFormat, Option<String>), SourceError> {
    let b = Backing::open(path, true)?;
    let mut head = [0u8; 2048];
    let n = read_up_to(&b.file, &mut head).map_err(|e| SourceError::Io(path.to_path_buf(), e))?;
    if n >= 4 && head[..4] == *b"QFI\xfb" {
        return Ok((SourceFormat::Qcow2, None));
    }
    let magic_at = SUPERBLOCK_OFFSET as usize + 0x38;
    if n < magic_at + 2 || u16::from_le_bytes([head[magic_at], head[magic_at + 1]]) != 0xEF53 {
        return Ok((SourceFormat::Raw, None));
    }
    drop(b);
    let io: Arc<dyn BlockIo> = Arc::new(FileIo::open(path, true)?);
    match Image::open(io, OpenOptions { read_only: true }) {
        Ok(_) => Ok((SourceFormat::Extblk, None)),
        Err(ImageError::Format(f)) => Ok((
            SourceFormat::Raw,
            Some(format!(
                "{}: an ext4 filesystem but not an extblk image ({f}): read as raw (-f chooses)",
                path.display()
            )),
        )),
        Err(e) => Err(SourceError::Image(path.to_path_buf(), e)),
    }
}

/// Reads from the start until `buf` is full or the file ends; returns the bytes read.
fn read_up_to(f: &File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Copies a qcow2 image's disk to a sparse raw file in `dir` with qemu-img.
fn qcow2_to_raw(path: &Path, dir: &Path) -> Result<TempFile, SourceError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "source".into());
    let temp = TempFile(dir.join(format!(".{name}.extblk-{}.raw", std::process::id())));
    let out = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "qcow2", "-O", "raw", "-S", "4k"])
        .arg(path)
        .arg(&temp.0)
        .output()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => SourceError::NoQemuImg(path.to_path_buf()),
            _ => SourceError::QemuImg(path.to_path_buf(), e.to_string()),
        })?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(SourceError::QemuImg(
            path.to_path_buf(),
            if msg.is_empty() {
                out.status.to_string()
            } else {
                msg
            },
        ));
    }
    Ok(temp)
}
