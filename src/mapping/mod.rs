//! Logical → physical mapping of `/disk`: the extent tree and the block allocator.

pub mod alloc;
pub mod tree;
pub mod usemap;

use thiserror::Error;

use crate::ext4::FormatError;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MapError {
    #[error("no free blocks left in the image")]
    NoSpace,
    #[error("{0}")]
    Format(#[from] FormatError),
}
