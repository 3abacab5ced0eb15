//! Journal recovery, the same logic as the kernel's and e2fsck's (format reference §4.5):
//! scan the committed transactions from `s_start`, collect revokes, then produce the final
//! content of every logged block not revoked by a later-or-equal transaction.
//!
//! Replay does not write: it returns the blocks, so `check` can look at the replayed image
//! without changing it and `open` can write them home.

use std::collections::{BTreeMap, HashMap};

use super::format::{self, JournalSuperblock, Tag, BT_COMMIT, BT_DESCRIPTOR, BT_REVOKE};
use super::LogMap;
use crate::ext4::BLOCK_SIZE;
use crate::io::BlockIo;

#[derive(Debug, Default)]
pub struct ReplayOutcome {
    /// Complete transactions found in the log.
    pub transactions: u32,
    /// The tid after the last complete transaction.
    pub end_tid: u32,
    /// Final content of each replayed filesystem block.
    pub blocks: BTreeMap<u64, Vec<u8>>,
    /// Why the scan stopped early on a damaged transaction (reported like e2fsck does).
    pub corrupt: Option<String>,
    /// Logged blocks skipped because their tag checksum failed.
    pub bad_tags: u32,
    /// Log blocks used by the complete transactions.
    pub log_blocks: u32,
}

struct Txn {
    tid: u32,
    tags: Vec<(Tag, u32)>,
    revokes: Vec<u64>,
}

/// Scans and resolves the log described by `sb`.
pub fn replay(
    io: &dyn BlockIo,
    map: &LogMap,
    sb: &JournalSuperblock,
) -> std::io::Result<ReplayOutcome> {
    let mut out = ReplayOutcome {
        end_tid: sb.sequence,
        ..Default::default()
    };
    if sb.start == 0 {
        return Ok(out);
    }
    let scan = scan(io, map, sb)?;
    out.transactions = scan.txns.len() as u32;
    out.end_tid = scan.end_tid;
    out.log_blocks = scan.log_blocks;
    out.corrupt = scan.corrupt;
    let revoked = newest_revokes(&scan.txns, sb.sequence);
    resolve(io, map, sb, &scan.txns, &revoked, &mut out)?;
    Ok(out)
}

/// What the scan of the log found.
struct Scan {
    /// The complete transactions, oldest first.
    txns: Vec<Txn>,
    /// The tid after the last of them.
    end_tid: u32,
    /// Log blocks they use.
    log_blocks: u32,
    /// Why the scan stopped at a damaged transaction, if it did.
    corrupt: Option<String>,
}

/// The committed transactions from `s_start`: descriptors (with where each tagged copy sits)
/// and revoke records, up to the first block with the wrong magic or tid, a bad descriptor or
/// revoke checksum, or a commit whose checksum fails (reported as corrupt unless older than
/// the previous commit).
fn scan(io: &dyn BlockIo, map: &LogMap, sb: &JournalSuperblock) -> std::io::Result<Scan> {
    let jseed = format::journal_seed(&sb.uuid);
    let csum = sb.has_csum_v3();
    let (first, maxlen) = (sb.first, sb.maxlen);
    let wrap = |p: u32| super::wrap(p, first, maxlen);
    let mut buf = vec![0u8; BLOCK_SIZE];
    let mut pos = sb.start;
    let mut tid = sb.sequence;
    let mut txns: Vec<Txn> = Vec::new();
    let mut corrupt = None;
    let mut cur = Txn {
        tid,
        tags: Vec::new(),
        revokes: Vec::new(),
    };
    let mut last_commit_sec = 0u64;
    let mut used = 0u32;
    let mut cur_used = 0u32;
    // Never scan more than the log holds: a corrupt log cannot loop us.
    while used + cur_used < maxlen {
        io.read_at(&mut buf, map.byte_offset(pos))?;
        let Some((btype, btid)) = format::header(&buf) else {
            break;
        };
        if btid != tid {
            break;
        }
        match btype {
            BT_DESCRIPTOR => {
                let Ok((tags, ok)) = format::decode_descriptor(&buf, jseed) else {
                    break;
                };
                if csum && !ok {
                    break;
                }
                let mut p = wrap(pos + 1);
                for t in tags {
                    cur.tags.push((t, p));
                    p = wrap(p + 1);
                }
                pos = p;
                cur_used = count_used(sb.start, pos, first, maxlen) - used;
            }
            BT_REVOKE => {
                let Ok((blocks, ok)) = format::decode_revoke(&buf, jseed) else {
                    break;
                };
                if csum && !ok {
                    break;
                }
                cur.revokes.extend(blocks);
                pos = wrap(pos + 1);
                cur_used = count_used(sb.start, pos, first, maxlen) - used;
            }
            BT_COMMIT => {
                let (sec, ok) = format::decode_commit(&buf, jseed);
                if csum && !ok {
                    if sec >= last_commit_sec {
                        corrupt = Some(format!(
                            "journal transaction {tid} is corrupt, replay was aborted"
                        ));
                    }
                    break;
                }
                last_commit_sec = sec;
                pos = wrap(pos + 1);
                used = count_used(sb.start, pos, first, maxlen);
                cur_used = 0;
                txns.push(std::mem::replace(
                    &mut cur,
                    Txn {
                        tid: tid.wrapping_add(1),
                        tags: Vec::new(),
                        revokes: Vec::new(),
                    },
                ));
                tid = tid.wrapping_add(1);
            }
            _ => break,
        }
    }
    Ok(Scan {
        txns,
        end_tid: tid,
        log_blocks: used,
        corrupt,
    })
}

/// A tid's age relative to `s_sequence`: tid order is wrap-safe relative to it.
fn age(tid: u32, sequence: u32) -> u32 {
    tid.wrapping_sub(sequence)
}

/// Revokes: block → the newest tid that revokes it.
fn newest_revokes(txns: &[Txn], sequence: u32) -> HashMap<u64, u32> {
    let mut revoked: HashMap<u64, u32> = HashMap::new();
    for t in txns {
        for &b in &t.revokes {
            let e = revoked.entry(b).or_insert(t.tid);
            if age(t.tid, sequence) > age(*e, sequence) {
                *e = t.tid;
            }
        }
    }
    revoked
}

/// The final content of every logged block that no later-or-equal transaction revoked and
/// whose tag checksum holds (the others counted in `bad_tags`), unescaped, into `out`.
fn resolve(
    io: &dyn BlockIo,
    map: &LogMap,
    sb: &JournalSuperblock,
    txns: &[Txn],
    revoked: &HashMap<u64, u32>,
    out: &mut ReplayOutcome,
) -> std::io::Result<()> {
    let jseed = format::journal_seed(&sb.uuid);
    let csum = sb.has_csum_v3();
    let mut buf = vec![0u8; BLOCK_SIZE];
    for t in txns {
        for (tag, p) in &t.tags {
            if revoked
                .get(&tag.blocknr)
                .is_some_and(|&r| age(r, sb.sequence) >= age(t.tid, sb.sequence))
            {
                continue;
            }
            io.read_at(&mut buf, map.byte_offset(*p))?;
            if csum && format::block_csum(jseed, t.tid, &buf) != tag.checksum {
                out.bad_tags += 1;
                continue;
            }
            let mut data = buf.clone();
            if tag.escaped {
                format::unescape(&mut data);
            }
            out.blocks.insert(tag.blocknr, data);
        }
    }
    Ok(())
}

/// Log blocks from `start` up to (not including) `pos`, with wrap-around.
fn count_used(start: u32, pos: u32, first: u32, maxlen: u32) -> u32 {
    if pos >= start {
        pos - start
    } else {
        (maxlen - start) + (pos - first)
    }
}
