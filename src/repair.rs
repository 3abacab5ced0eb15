//! `check --repair`: the journal is replayed into place (by opening the image read-write) and
//! the image is closed cleanly, which rewrites the superblock's free counts. Structural damage
//! (a bad checksum, a double-used block) is reported by `check`, not rewritten blindly.

use std::path::Path;
use std::sync::Arc;

use crate::engine::raw::Backing;
use crate::image::{Image, OpenOptions};
use crate::io::{BlockIo, FileIo};

pub fn repair(path: &Path) -> anyhow::Result<()> {
    let io: Arc<dyn BlockIo> = Arc::new(FileIo::new(Backing::open(path, false)?));
    let img = Image::open(io, OpenOptions { read_only: false })
        .map_err(|e| anyhow::anyhow!("{}: cannot repair: {e}", path.display()))?;
    let r = img.recovery().clone();
    if r.transactions > 0 {
        println!(
            "replayed {} journal transaction(s) ({} blocks)",
            r.transactions, r.blocks
        );
    }
    img.close()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(())
}
