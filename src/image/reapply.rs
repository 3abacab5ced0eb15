//! The restart log's changes applied again after the journal replay: the conversions,
//! zeroings and punches a killed daemon had made (and acknowledged) in transactions that never
//! committed, redone in the order they were made, in the running transaction — as many as fit
//! one transaction: the caller commits between [`Image::reapply_chunk`] calls.
//!
//! A conversion's allocation was usually in the lost transaction too, so a "written" record
//! maps holes at the blocks it names. Those blocks were free when the killed daemon took them
//! (nothing but a commit frees blocks for reuse), so they are free in the replayed image. No
//! tree edit of an earlier record may take one for a node: the records not applied yet have
//! their blocks reserved in the allocator (in memory, never in a bitmap), and each record
//! claims its own just before it is applied and gives back, before the next record, what it
//! did not map — so every committed transaction's bitmaps match its trees. Every record is
//! safe to apply twice: a block mapped elsewhere or already written is left as it is.

use std::collections::BTreeMap;

use super::{Image, ImageError};
use crate::restart_log::format::Change;

/// Physical runs claimed for a record, taken as they are mapped (start → length, disjoint).
#[derive(Default)]
pub(super) struct Claims(BTreeMap<u64, u64>);

impl Claims {
    fn insert(&mut self, s: u64, l: u64) {
        self.0.insert(s, l);
    }

    /// Removes and returns the claimed parts of `[s, s + l)`, in order.
    pub(super) fn take(&mut self, s: u64, l: u64) -> Vec<(u64, u64)> {
        let e = s + l;
        let mut hits: Vec<(u64, u64)> = Vec::new();
        if let Some((&rs, &rl)) = self.0.range(..=s).next_back() {
            if rs + rl > s {
                hits.push((rs, rl));
            }
        }
        hits.extend(self.0.range(s + 1..e).map(|(&a, &b)| (a, b)));
        let mut out = Vec::new();
        for (rs, rl) in hits {
            self.0.remove(&rs);
            let (os, oe) = (rs.max(s), (rs + rl).min(e));
            if rs < os {
                self.0.insert(rs, os - rs);
            }
            if oe < rs + rl {
                self.0.insert(oe, rs + rl - oe);
            }
            out.push((os, oe - os));
        }
        out
    }

    fn drain(&mut self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.0).into_iter().collect()
    }
}

/// What [`Image::reapply`] did, in blocks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reapplied {
    /// Unwritten blocks converted to written.
    pub converted: u64,
    /// Holes mapped written at the blocks their record names.
    pub mapped: u64,
    /// Blocks of written records neither converted nor mapped: mapped elsewhere by then, or
    /// their physical block not free.
    pub left: u64,
    pub zeroed: u64,
    pub punched: u64,
    /// Records outside the disk, skipped.
    pub out_of_range: u64,
    /// Physical runs the punches freed: the caller deallocates them in the backing once the
    /// transaction is committed (and takes them, chunk after chunk).
    pub freed: Vec<(u64, u64)>,
}

impl Image {
    /// Applies the first of `changes` (the restart log's records the replayed journal does
    /// not hold, in the order they were made, those of earlier chunks left out) to the running
    /// transaction, up to the record after which it should commit (checked between records:
    /// one record is one tree edit, a few blocks, and the bound is a quarter of the log);
    /// returns how many it applied, at least one when there are any. The caller commits, then
    /// calls again with the rest. Counts go to `out`. A record outside the disk is skipped and
    /// counted; an error otherwise (an inconsistent image) leaves the image to be dropped
    /// unserved.
    pub fn reapply_chunk(
        &mut self,
        changes: &[Change],
        out: &mut Reapplied,
    ) -> Result<usize, ImageError> {
        self.pool.writable()?;
        self.pool
            .alloc
            .set_reserved(changes.iter().filter_map(|c| match *c {
                Change::Written { len, pblk, .. } => Some((pblk, u64::from(len))),
                _ => None,
            }));
        let r = self.reapply_reserved(changes, out);
        // Nothing allocates between chunks (a commit, a log rewrite), and the next chunk
        // reserves what is left then.
        self.pool.alloc.set_reserved([]);
        r
    }

    fn reapply_reserved(
        &mut self,
        changes: &[Change],
        out: &mut Reapplied,
    ) -> Result<usize, ImageError> {
        let mut n = 0;
        for c in changes {
            self.reapply_one(c, out)?;
            n += 1;
            if self.should_commit() {
                break;
            }
        }
        Ok(n)
    }

    fn reapply_one(&mut self, c: &Change, out: &mut Reapplied) -> Result<(), ImageError> {
        let mut claims = Claims::default();
        if let Change::Written { len, pblk, .. } = *c {
            for (s, l) in self.pool.alloc.claim_free(pblk, u64::from(len))? {
                claims.insert(s, l);
            }
        }
        let r = match self.pool.start() {
            Err(e) => Err(e),
            Ok(mut h) => match *c {
                Change::Written { lblk, len, pblk } => self
                    .disk
                    .map_written(&mut h, lblk.into(), len.into(), pblk, &mut claims)
                    .map(|(c, m, l)| {
                        out.converted += c;
                        out.mapped += m;
                        out.left += l;
                    }),
                Change::Zero { lblk, len } => {
                    self.disk.zero(&mut h, lblk.into(), len.into()).map(|()| {
                        out.zeroed += u64::from(len);
                    })
                }
                Change::Punch { lblk, len } => self
                    .disk
                    .punch(&mut h, lblk.into(), len.into())
                    .map(|freed| {
                        out.punched += u64::from(len);
                        out.freed.extend(freed);
                    }),
            },
        };
        // Claimed blocks the record did not map are free again, whatever happened.
        for (s, l) in claims.drain() {
            self.pool.alloc.unclaim(s, l)?;
        }
        match r {
            Ok(()) => Ok(()),
            Err(ImageError::OutOfRange(..)) => {
                out.out_of_range += 1;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Claims;

    #[test]
    fn claims_are_taken_in_pieces() {
        let mut c = Claims::default();
        c.insert(10, 10);
        c.insert(30, 5);
        assert_eq!(c.take(12, 3), vec![(12, 3)]);
        assert_eq!(c.take(5, 40), vec![(10, 2), (15, 5), (30, 5)]);
        assert!(c.take(0, 100).is_empty());
        assert!(c.drain().is_empty());
    }
}
