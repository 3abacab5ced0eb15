//! Logical → physical mapping of `/disk`: the extent tree and the block allocator.

pub mod alloc;
pub mod tree;
pub mod usemap;
pub mod zone;

use thiserror::Error;

use crate::ext4::FormatError;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MapError {
    #[error("no free blocks left in the image")]
    NoSpace,
    #[error("{0}")]
    Format(#[from] FormatError),
    /// The allocator was asked to change blocks it does not manage: outside the filesystem or
    /// in its own metadata. Reachable only from a tree that disagrees with the image.
    #[error("{len} block(s) from {start} {why}")]
    Invalid {
        start: u64,
        len: u64,
        why: zone::Invalid,
    },
    /// Blocks freed that were not in use, or allocated that were: the bitmaps and the tree
    /// disagree. Refused before any block changes state.
    #[error("block {block} is already {}", if *used { "in use" } else { "free" })]
    Inconsistent { block: u64, used: bool },
}
