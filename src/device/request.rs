//! Descriptor chains → typed virtio-blk requests (virtio 1.2 §5.2.6), with every check a guest
//! can fail. Nothing here performs I/O: the result is either a [`Request`] ready for the engine
//! or a [`RequestError`] that names the status to answer with.
//!
//! Layout is not assumed (VIRTIO_F_ANY_LAYOUT is implied by VERSION_1): the 16-byte header is
//! the first 16 device-readable bytes, wherever the descriptor boundaries fall; the status is the
//! last device-writable byte; data is what lies between.

use std::any::Any;
use std::ops::Deref;
use std::sync::Arc;

use thiserror::Error;
use virtio_bindings::virtio_blk::*;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes as _, GuestAddress, GuestMemory, Permissions};

use super::chain::Desc;
use crate::engine::{GuestBuffers, ZeroRange};
use crate::units::{ByteRange, Bytes, Sectors, SECTOR_SIZE};

const HEADER_LEN: usize = 16;
const DWZ_SEGMENT_LEN: usize = 16;
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// The limits advertised in config space, which requests are held to.
#[derive(Clone, Debug)]
pub struct Limits {
    pub capacity: Bytes,
    pub logical_block_size: u32,
    pub seg_max: u32,
    pub size_max: u32,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub read_only: bool,
}

/// The status byte values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = VIRTIO_BLK_S_OK as u8,
    IoErr = VIRTIO_BLK_S_IOERR as u8,
    Unsupp = VIRTIO_BLK_S_UNSUPP as u8,
}

/// Everything a guest can get wrong.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("chain has no device-writable status byte")]
    NoStatus,
    #[error("device-readable descriptor after a device-writable one")]
    DescriptorOrder,
    #[error("chain has {0} descriptors, more than allowed")]
    TooManyDescriptors(usize),
    #[error("header shorter than 16 bytes")]
    ShortHeader,
    #[error("data segment of {0} bytes exceeds size_max")]
    SegmentTooLarge(u32),
    #[error("guest memory range {0:#x}+{1} is not mapped")]
    BadGuestAddress(u64, u64),
    #[error("data buffers in the wrong direction for request type {0}")]
    WrongDirection(u32),
    #[error("data length {0} is not a multiple of the logical block size")]
    UnalignedLength(u64),
    #[error("sector {0} is not aligned to the logical block size")]
    UnalignedSector(u64),
    #[error("sector range overflows")]
    Overflow,
    #[error("range {0:?} extends past the capacity")]
    OutOfRange(ByteRange),
    #[error("write to a read-only device")]
    ReadOnly,
    #[error("unsupported request type {0}")]
    UnknownType(u32),
    #[error(
        "discard/write-zeroes payload of {0} bytes is not a non-empty array of 16-byte segments"
    )]
    BadSegmentList(usize),
    #[error("{0} discard/write-zeroes segments exceed the advertised maximum")]
    TooManySegments(usize),
    #[error("segment of {0} sectors exceeds the advertised maximum")]
    SegmentTooLong(u32),
    #[error("reserved flags {0:#x} set in a discard/write-zeroes segment")]
    ReservedFlags(u32),
    #[error("unmap flag set on a discard segment")]
    UnmapOnDiscard,
    #[error("GET_ID without a buffer")]
    NoIdBuffer,
}

impl RequestError {
    /// The status the spec asks for.
    pub fn status(&self) -> Status {
        match self {
            RequestError::UnknownType(_)
            | RequestError::ReservedFlags(_)
            | RequestError::UnmapOnDiscard => Status::Unsupp,
            _ => Status::IoErr,
        }
    }
}

/// A guest-physical range of one data descriptor (or a part of one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestRange {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A validated request.
pub enum Request {
    Read { offset: Bytes, bufs: GuestBuffers },
    Write { offset: Bytes, bufs: GuestBuffers },
    Flush,
    GetId { buf: Vec<GuestRange> },
    Discard { ranges: Vec<ZeroRange> },
    WriteZeroes { ranges: Vec<ZeroRange> },
}

impl Request {
    /// Bytes the device writes into the guest's buffers on success (excluding the status).
    pub fn written_len(&self) -> u32 {
        match self {
            Request::Read { bufs, .. } => bufs.len() as u32,
            Request::GetId { buf } => buf.iter().map(|r| r.len).sum::<u32>().min(ID_BYTES as u32),
            _ => 0,
        }
    }
}

/// The result of parsing one chain.
pub struct Parsed {
    pub head: u16,
    /// Where to write the status; `None` when the chain has no writable byte to put it in.
    pub status: Option<GuestAddress>,
    pub request: Result<Request, RequestError>,
}

/// Reads the request header from the front of the readable ranges and takes its bytes off
/// them, without allocating (this runs for every request).
/// The guest ranges of a request's descriptors: inline for a header, up to 2 data segments and
/// the status (no heap allocation for a common request).
type Ranges = smallvec::SmallVec<[GuestRange; 4]>;

fn take_header<M: GuestMemory>(
    mem: &M,
    ranges: &mut Ranges,
) -> Result<[u8; HEADER_LEN], RequestError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    let mut used = 0;
    while got < HEADER_LEN && used < ranges.len() {
        let r = ranges[used];
        let take = (r.len as usize).min(HEADER_LEN - got);
        mem.read_slice(&mut header[got..got + take], r.addr)
            .map_err(|_| RequestError::BadGuestAddress(r.addr.0, take as u64))?;
        got += take;
        if take == r.len as usize {
            used += 1;
        } else {
            ranges[used] = GuestRange {
                addr: r.addr.unchecked_add(take as u64),
                len: r.len - take as u32,
            };
        }
    }
    ranges.drain(..used);
    Ok(header)
}

fn total(ranges: &[GuestRange]) -> u64 {
    ranges.iter().map(|r| u64::from(r.len)).sum()
}

fn read_bytes<M: GuestMemory>(mem: &M, ranges: &[GuestRange]) -> Result<Vec<u8>, RequestError> {
    let mut out = Vec::with_capacity(total(ranges) as usize);
    for r in ranges {
        let start = out.len();
        out.resize(start + r.len as usize, 0);
        mem.read_slice(&mut out[start..], r.addr)
            .map_err(|_| RequestError::BadGuestAddress(r.addr.0, u64::from(r.len)))?;
    }
    Ok(out)
}

/// Host iovecs for guest ranges, split where guest memory regions split.
fn to_buffers<M>(mem: &Arc<M>, ranges: &[GuestRange]) -> Result<GuestBuffers, RequestError>
where
    M: GuestMemory + Send + Sync + 'static,
{
    let mut iovecs = crate::io::uring::Iovs::with_capacity(ranges.len());
    for r in ranges {
        let bad = || RequestError::BadGuestAddress(r.addr.0, u64::from(r.len));
        let slices = mem
            .get_slices(r.addr, r.len as usize, Permissions::ReadWrite)
            .map_err(|_| bad())?;
        for slice in slices {
            let slice = slice.map_err(|_| bad())?;
            let guard = slice.ptr_guard_mut();
            iovecs.push(libc::iovec {
                iov_base: guard.as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    let keepalive: Arc<dyn Any + Send + Sync> = mem.clone();
    // SAFETY: the pointers come from `mem`'s mappings, which `keepalive` keeps alive; the
    // descriptors belong to this request until its used-ring entry is written.
    Ok(unsafe { GuestBuffers::new(iovecs, keepalive) })
}

/// Checks a sector range against alignment and capacity; returns it in bytes.
fn check_range(limits: &Limits, sector: u64, len: u64) -> Result<ByteRange, RequestError> {
    let lbs = u64::from(limits.logical_block_size);
    let offset = Sectors(sector).to_bytes().ok_or(RequestError::Overflow)?;
    if offset.0 % lbs != 0 {
        return Err(RequestError::UnalignedSector(sector));
    }
    if len % lbs != 0 {
        return Err(RequestError::UnalignedLength(len));
    }
    let range = ByteRange {
        offset,
        len: Bytes(len),
    };
    let end = range.end().ok_or(RequestError::Overflow)?;
    if end > limits.capacity {
        return Err(RequestError::OutOfRange(range));
    }
    Ok(range)
}

fn parse_dwz_segments<M: GuestMemory>(
    mem: &M,
    data: &[GuestRange],
    limits: &Limits,
    discard: bool,
) -> Result<Vec<ZeroRange>, RequestError> {
    let len = total(data) as usize;
    let (max_seg, max_sectors) = if discard {
        (limits.max_discard_seg, limits.max_discard_sectors)
    } else {
        (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
    };
    if len == 0 || len % DWZ_SEGMENT_LEN != 0 {
        return Err(RequestError::BadSegmentList(len));
    }
    let count = len / DWZ_SEGMENT_LEN;
    if count > max_seg as usize {
        return Err(RequestError::TooManySegments(count));
    }
    let bytes = read_bytes(mem, data)?;
    let mut ranges = Vec::with_capacity(count);
    for seg in bytes.chunks_exact(DWZ_SEGMENT_LEN) {
        let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
        let num = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
        if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
            return Err(RequestError::ReservedFlags(flags));
        }
        let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        if discard && unmap {
            return Err(RequestError::UnmapOnDiscard);
        }
        if num > max_sectors {
            return Err(RequestError::SegmentTooLong(num));
        }
        let range = check_range(limits, sector, u64::from(num) * SECTOR_SIZE)?;
        ranges.push(ZeroRange { range, unmap });
    }
    Ok(ranges)
}

/// Parses one descriptor chain.
pub fn parse<M, D>(chain: DescriptorChain<D>, mem: &Arc<M>, limits: &Limits) -> Parsed
where
    M: GuestMemory + Send + Sync + 'static,
    D: Deref<Target = M>,
{
    let head = chain.head_index();
    let descs = chain.map(|d| Desc {
        addr: d.addr(),
        len: d.len(),
        write_only: d.is_write_only(),
    });
    parse_descs(head, descs, mem, limits)
}

/// [`parse`] over descriptors however they were found (popped off the avail ring, or walked
/// from a head the inflight region kept: `chain::walk`).
pub fn parse_descs<M>(
    head: u16,
    descs: impl IntoIterator<Item = Desc>,
    mem: &Arc<M>,
    limits: &Limits,
) -> Parsed
where
    M: GuestMemory + Send + Sync + 'static,
{
    // Header + seg_max data descriptors + status; anything longer is refused before we collect it.
    let max_descriptors = limits.seg_max as usize + 2;
    let mut readable = Ranges::new();
    let mut writable = Ranges::new();
    let mut order_error = false;
    let mut count = 0usize;
    let mut last_past_limit: Option<Option<GuestRange>> = None;
    for desc in descs {
        count += 1;
        let r = GuestRange {
            addr: desc.addr,
            len: desc.len,
        };
        if count > max_descriptors {
            // Not collected, but the chain's last descriptor still carries the status byte
            // the refusal is reported in (if it is writable).
            last_past_limit = Some(desc.write_only.then_some(r));
            continue;
        }
        if desc.write_only {
            writable.push(r);
        } else {
            if !writable.is_empty() {
                order_error = true;
            }
            readable.push(r);
        }
    }

    if let Some(last) = last_past_limit {
        writable = last.into_iter().collect();
    }
    // The status byte is the last writable byte. Without it nothing can be reported; a
    // descriptor whose last byte lies past 2^64 has none (its address would wrap).
    let status = match writable.last_mut() {
        Some(last) if last.len > 0 && last.addr.checked_add(u64::from(last.len) - 1).is_some() => {
            last.len -= 1;
            let addr = last.addr.unchecked_add(u64::from(last.len));
            if last.len == 0 {
                writable.pop();
            }
            Some(addr)
        }
        _ => None,
    };
    let request = match status {
        None => Err(RequestError::NoStatus),
        Some(_) if count > max_descriptors => Err(RequestError::TooManyDescriptors(count)),
        Some(_) if order_error => Err(RequestError::DescriptorOrder),
        Some(_) => parse_body(readable, writable, mem, limits),
    };
    Parsed {
        head,
        status,
        request,
    }
}

fn parse_body<M>(
    mut readable: Ranges,
    writable: Ranges,
    mem: &Arc<M>,
    limits: &Limits,
) -> Result<Request, RequestError>
where
    M: GuestMemory + Send + Sync + 'static,
{
    if total(&readable) < HEADER_LEN as u64 {
        return Err(RequestError::ShortHeader);
    }
    let header = take_header(&**mem, &mut readable)?;
    let req_type = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    let out_data = readable;
    let in_data = writable;

    let check_segments = |data: &[GuestRange]| -> Result<(), RequestError> {
        if data.len() > limits.seg_max as usize {
            return Err(RequestError::TooManyDescriptors(data.len() + 2));
        }
        match data.iter().find(|r| r.len > limits.size_max) {
            Some(r) => Err(RequestError::SegmentTooLarge(r.len)),
            None => Ok(()),
        }
    };

    match req_type {
        VIRTIO_BLK_T_IN => {
            if !out_data.is_empty() {
                return Err(RequestError::WrongDirection(req_type));
            }
            check_segments(&in_data)?;
            let range = check_range(limits, sector, total(&in_data))?;
            Ok(Request::Read {
                offset: range.offset,
                bufs: to_buffers(mem, &in_data)?,
            })
        }
        VIRTIO_BLK_T_OUT => {
            if !in_data.is_empty() {
                return Err(RequestError::WrongDirection(req_type));
            }
            if limits.read_only {
                return Err(RequestError::ReadOnly);
            }
            check_segments(&out_data)?;
            let range = check_range(limits, sector, total(&out_data))?;
            Ok(Request::Write {
                offset: range.offset,
                bufs: to_buffers(mem, &out_data)?,
            })
        }
        VIRTIO_BLK_T_FLUSH => Ok(Request::Flush),
        VIRTIO_BLK_T_GET_ID => {
            if !out_data.is_empty() {
                return Err(RequestError::WrongDirection(req_type));
            }
            if in_data.is_empty() {
                return Err(RequestError::NoIdBuffer);
            }
            Ok(Request::GetId {
                buf: in_data.into_vec(),
            })
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if !in_data.is_empty() {
                return Err(RequestError::WrongDirection(req_type));
            }
            if limits.read_only {
                return Err(RequestError::ReadOnly);
            }
            let discard = req_type == VIRTIO_BLK_T_DISCARD;
            let ranges = parse_dwz_segments(&**mem, &out_data, limits, discard)?;
            Ok(if discard {
                Request::Discard { ranges }
            } else {
                Request::WriteZeroes { ranges }
            })
        }
        other => Err(RequestError::UnknownType(other)),
    }
}
