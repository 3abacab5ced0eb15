//! An extblk image: an ext4 filesystem holding the virtual disk as `/disk`.

pub mod create;

use std::io;

use thiserror::Error;

use crate::ext4::FormatError;

#[derive(Debug, Error)]
pub enum ImageError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Format(#[from] FormatError),
    #[error("the backing holds {0} bytes, the image needs {1}")]
    TooSmall(u64, u64),
    #[error("{0} already exists (use --force to overwrite it)")]
    Exists(std::path::PathBuf),
    #[error(transparent)]
    Open(#[from] crate::engine::raw::OpenError),
}
