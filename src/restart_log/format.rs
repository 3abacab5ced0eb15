//! The restart log's bytes: a header binding the file to one image and one daemon session,
//! then fixed-size records, each checksummed. Little-endian (the file never leaves the host
//! that wrote it). `docs/format.md` ("The restart log") has the table.
//!
//! Decoding trusts nothing: a file shorter than a header or with a bad header is an error
//! (the caller ignores the log with a warning); records are read up to the first one that does
//! not check out (a write torn by the kill, or stale bytes), and the rest is reported as
//! ignored, never as an error.

use thiserror::Error;

/// "EXTBLKRL": extblk restart log.
pub const MAGIC: [u8; 8] = *b"EXTBLKRL";
pub const VERSION: u32 = 2;
pub const HEADER_LEN: usize = 56;
pub const RECORD_LEN: usize = 28;
/// The longest written run a record may carry: ext4's longest initialised extent. The engine
/// logs the extents a conversion changed, which are never longer.
pub const MAX_WRITTEN_LEN: u32 = 32768;

const KIND_WRITTEN: u8 = 1;
const KIND_ZERO: u8 = 2;
const KIND_PUNCH: u8 = 3;

/// What the file says it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The image's filesystem UUID (`s_uuid`).
    pub uuid: [u8; 16],
    /// The image's mount count (`s_mnt_count`) during the session that wrote the file: every
    /// read-write open bumps it, so a log left by an older session is recognised.
    pub session: u16,
    /// Every record belongs to a transaction with this tid or a later one: the first
    /// transaction that was not durable when the file was (re)started.
    pub base_tid: u32,
    /// The host's boot (`/proc/sys/kernel/random/boot_id`) that wrote the file: a log that
    /// survived a reboot (a `--restart-log` path off tmpfs) describes data that may never
    /// have reached the disk, and is ignored.
    pub boot_id: [u8; 16],
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`, 32 hex digits with dashes), or zeroes
/// where the kernel has none. Read once per process: it cannot change while the process lives,
/// and `serve`'s sandbox reads it before Landlock leaves `/proc` out of reach.
pub fn boot_id() -> [u8; 16] {
    static ID: std::sync::OnceLock<[u8; 16]> = std::sync::OnceLock::new();
    *ID.get_or_init(read_boot_id)
}

fn read_boot_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") else {
        return id;
    };
    let hex: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
    for (i, pair) in hex.chunks(2).take(16).enumerate() {
        let digits = std::str::from_utf8(pair).unwrap_or("0");
        id[i] = u8::from_str_radix(digits, 16).unwrap_or(0);
    }
    id
}

/// One metadata change of `/disk`, as the engine made it in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// `[lblk, lblk + len)` was converted to written at `pblk…` (the data is there).
    Written { lblk: u32, len: u32, pblk: u64 },
    /// `[lblk, lblk + len)` was made unwritten (WRITE_ZEROES without unmap).
    Zero { lblk: u32, len: u32 },
    /// `[lblk, lblk + len)` was unmapped (DISCARD, WRITE_ZEROES with unmap).
    Punch { lblk: u32, len: u32 },
}

/// A change and the journal transaction it joined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub tid: u32,
    pub change: Change,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LogFormatError {
    #[error("{0} bytes: shorter than a restart log header ({HEADER_LEN})")]
    Short(usize),
    #[error("not a restart log (bad magic)")]
    BadMagic,
    #[error("restart log version {0} (this daemon writes version {VERSION})")]
    Version(u32),
    #[error("the restart log header's checksum does not match")]
    HeaderChecksum,
}

/// A decoded file: the header, the records that check out, and how many bytes past them were
/// ignored (a torn or stale tail).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub header: Header,
    pub records: Vec<Record>,
    pub ignored_bytes: usize,
}

fn crc(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

pub fn encode_header(h: &Header) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[0..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[12..28].copy_from_slice(&h.uuid);
    b[28..30].copy_from_slice(&h.session.to_le_bytes());
    // 30..32 reserved, zero.
    b[32..36].copy_from_slice(&h.base_tid.to_le_bytes());
    b[36..52].copy_from_slice(&h.boot_id);
    let c = crc(!0, &b[..52]);
    b[52..56].copy_from_slice(&c.to_le_bytes());
    b
}

pub fn decode_header(b: &[u8]) -> Result<Header, LogFormatError> {
    if b.len() < HEADER_LEN {
        return Err(LogFormatError::Short(b.len()));
    }
    if b[0..8] != MAGIC {
        return Err(LogFormatError::BadMagic);
    }
    let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(LogFormatError::Version(version));
    }
    let c = u32::from_le_bytes(b[52..56].try_into().expect("4 bytes"));
    if c != crc(!0, &b[..52]) {
        return Err(LogFormatError::HeaderChecksum);
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&b[12..28]);
    let mut boot_id = [0u8; 16];
    boot_id.copy_from_slice(&b[36..52]);
    Ok(Header {
        uuid,
        session: u16::from_le_bytes([b[28], b[29]]),
        base_tid: u32::from_le_bytes(b[32..36].try_into().expect("4 bytes")),
        boot_id,
    })
}

/// The records' checksum seed: the header's checksum, so a record only checks out after the
/// header it was written under (not after a later generation's, nor another image's).
pub fn record_seed(h: &Header) -> u32 {
    let b = encode_header(h);
    u32::from_le_bytes(b[52..56].try_into().expect("4 bytes"))
}

pub fn encode_record(seed: u32, r: &Record) -> [u8; RECORD_LEN] {
    let (kind, lblk, len, pblk) = match r.change {
        Change::Written { lblk, len, pblk } => (KIND_WRITTEN, lblk, len, pblk),
        Change::Zero { lblk, len } => (KIND_ZERO, lblk, len, 0),
        Change::Punch { lblk, len } => (KIND_PUNCH, lblk, len, 0),
    };
    let mut b = [0u8; RECORD_LEN];
    b[0] = kind;
    // 1..4 reserved, zero.
    b[4..8].copy_from_slice(&r.tid.to_le_bytes());
    b[8..12].copy_from_slice(&lblk.to_le_bytes());
    b[12..16].copy_from_slice(&len.to_le_bytes());
    b[16..24].copy_from_slice(&pblk.to_le_bytes());
    let c = crc(seed, &b[..24]);
    b[24..28].copy_from_slice(&c.to_le_bytes());
    b
}

/// One record, or `None` when its bytes do not check out.
pub fn decode_record(seed: u32, b: &[u8]) -> Option<Record> {
    let b: &[u8; RECORD_LEN] = b.get(..RECORD_LEN)?.try_into().ok()?;
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    if u32_at(24) != crc(seed, &b[..24]) || b[1..4] != [0, 0, 0] {
        return None;
    }
    let (tid, lblk, len) = (u32_at(4), u32_at(8), u32_at(12));
    let pblk = u64::from_le_bytes(b[16..24].try_into().expect("8 bytes"));
    if len == 0 || lblk.checked_add(len).is_none() {
        return None;
    }
    let change = match b[0] {
        KIND_WRITTEN if len <= MAX_WRITTEN_LEN && pblk.checked_add(u64::from(len)).is_some() => {
            Change::Written { lblk, len, pblk }
        }
        KIND_ZERO if pblk == 0 => Change::Zero { lblk, len },
        KIND_PUNCH if pblk == 0 => Change::Punch { lblk, len },
        _ => return None,
    };
    Some(Record { tid, change })
}

/// A whole file: header, then records up to the first that does not check out.
pub fn decode(b: &[u8]) -> Result<Decoded, LogFormatError> {
    let header = decode_header(b)?;
    let seed = record_seed(&header);
    let mut records = Vec::new();
    let mut at = HEADER_LEN;
    while let Some(r) = b
        .get(at..at + RECORD_LEN)
        .and_then(|c| decode_record(seed, c))
    {
        records.push(r);
        at += RECORD_LEN;
    }
    Ok(Decoded {
        header,
        records,
        ignored_bytes: b.len() - at,
    })
}

/// Records encoded one after another (one append).
pub fn encode_records(seed: u32, rs: &[Record]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rs.len() * RECORD_LEN);
    for r in rs {
        out.extend_from_slice(&encode_record(seed, r));
    }
    out
}

/// Is transaction `tid` at or after `first` (tids wrap, as jbd2's do)?
pub fn tid_at_or_after(tid: u32, first: u32) -> bool {
    (tid.wrapping_sub(first) as i32) >= 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_boot_id_is_this_boots_and_stable() {
        let id = boot_id();
        assert_ne!(id, [0; 16], "no boot id read from /proc");
        assert_eq!(id, boot_id());
    }

    use super::*;

    fn header() -> Header {
        Header {
            uuid: [9; 16],
            session: 7,
            base_tid: 41,
            boot_id: [7; 16],
        }
    }

    fn records() -> Vec<Record> {
        vec![
            Record {
                tid: 41,
                change: Change::Written {
                    lblk: 16,
                    len: 16,
                    pblk: 1000,
                },
            },
            Record {
                tid: 42,
                change: Change::Zero { lblk: 3, len: 1 },
            },
            Record {
                tid: 42,
                change: Change::Punch {
                    lblk: 0,
                    len: u32::MAX,
                },
            },
        ]
    }

    fn file(h: &Header, rs: &[Record]) -> Vec<u8> {
        let mut b = encode_header(h).to_vec();
        b.extend(encode_records(record_seed(h), rs));
        b
    }

    #[test]
    fn round_trip() {
        let d = decode(&file(&header(), &records())).unwrap();
        assert_eq!(d.header, header());
        assert_eq!(d.records, records());
        assert_eq!(d.ignored_bytes, 0);
    }

    #[test]
    fn a_torn_tail_is_ignored() {
        let b = file(&header(), &records());
        for cut in HEADER_LEN..b.len() {
            let d = decode(&b[..cut]).unwrap();
            let whole = (cut - HEADER_LEN) / RECORD_LEN;
            assert_eq!(d.records, records()[..whole], "cut at {cut}");
            assert_eq!(d.ignored_bytes, cut - HEADER_LEN - whole * RECORD_LEN);
        }
        // A flipped byte in the second record: the first stands, the rest is ignored.
        let mut b = b;
        b[HEADER_LEN + RECORD_LEN + 9] ^= 1;
        let d = decode(&b).unwrap();
        assert_eq!(d.records, records()[..1]);
        assert_eq!(d.ignored_bytes, 2 * RECORD_LEN);
    }

    #[test]
    fn records_are_bound_to_their_header() {
        // Records written under one header do not check out after another (another image's
        // UUID, another session or generation): a spliced file yields no records.
        let rs = encode_records(record_seed(&header()), &records());
        for other in [
            Header {
                uuid: [8; 16],
                ..header()
            },
            Header {
                session: 8,
                ..header()
            },
            Header {
                base_tid: 42,
                boot_id: [7; 16],
                ..header()
            },
        ] {
            let mut b = encode_header(&other).to_vec();
            b.extend_from_slice(&rs);
            let d = decode(&b).unwrap();
            assert_eq!(d.header, other);
            assert!(d.records.is_empty());
            assert_eq!(d.ignored_bytes, rs.len());
        }
    }

    #[test]
    fn a_bad_header_is_an_error() {
        let b = file(&header(), &records());
        assert_eq!(decode(&b[..10]), Err(LogFormatError::Short(10)));
        assert_eq!(decode(&[]), Err(LogFormatError::Short(0)));
        let mut m = b.clone();
        m[0] = b'X';
        assert_eq!(decode(&m), Err(LogFormatError::BadMagic));
        let mut v = b.clone();
        v[8] = 1; // the version before the header named the boot
        assert_eq!(decode(&v), Err(LogFormatError::Version(1)));
        let mut u = b.clone();
        u[12] ^= 0xff; // the UUID, under the header checksum
        assert_eq!(decode(&u), Err(LogFormatError::HeaderChecksum));
    }

    #[test]
    fn records_that_make_no_sense_end_the_log() {
        let h = header();
        let seed = record_seed(&h);
        let bad = [
            // Empty run.
            Change::Zero { lblk: 1, len: 0 },
            // Past logical block 2^32.
            Change::Punch {
                lblk: u32::MAX,
                len: 2,
            },
            // Longer than any extent.
            Change::Written {
                lblk: 0,
                len: MAX_WRITTEN_LEN + 1,
                pblk: 5,
            },
            // Physical run wrapping.
            Change::Written {
                lblk: 0,
                len: 2,
                pblk: u64::MAX,
            },
        ];
        for c in bad {
            let b = encode_record(seed, &Record { tid: 1, change: c });
            assert_eq!(decode_record(seed, &b), None, "{c:?}");
        }
        // A kind this version does not know, checksum correct.
        let mut b = encode_record(seed, &records()[1]);
        b[0] = 9;
        let c = crc(seed, &b[..24]);
        b[24..28].copy_from_slice(&c.to_le_bytes());
        assert_eq!(decode_record(seed, &b), None);
    }

    #[test]
    fn tids_compare_across_the_wrap() {
        assert!(tid_at_or_after(5, 5));
        assert!(tid_at_or_after(6, 5));
        assert!(!tid_at_or_after(4, 5));
        assert!(tid_at_or_after(2, u32::MAX - 1));
        assert!(!tid_at_or_after(u32::MAX - 1, 2));
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = decode(&b);
        }
    }
}
