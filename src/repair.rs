//! `check --repair`: what can be rebuilt safely. The journal is replayed into place (by opening
//! the image read-write); block bitmaps and free counts that disagree with what the extent trees
//! and the metadata really use are rebuilt from them (only when no block is claimed twice or lies
//! past the end — then the claims can be trusted); the image is closed cleanly, which rewrites the
//! superblock's counts. Damage that cannot be rebuilt (a bad checksum, a double-used block) is
//! left for `check` to report.

use std::path::Path;
use std::sync::Arc;

use crate::image::Image;
use crate::io::{BlockIo, FileIo};

pub fn repair(path: &Path) -> anyhow::Result<()> {
    let io: Arc<dyn BlockIo> = Arc::new(FileIo::open(path, false)?);
    let mut img = Image::open_for_repair(io)
        .map_err(|e| anyhow::anyhow!("{}: cannot repair: {e}", path.display()))?;
    let r = img.recovery().clone();
    if r.transactions > 0 {
        println!(
            "replayed {} journal transaction(s) ({} blocks)",
            r.transactions, r.blocks
        );
    }
    let report = crate::check::check(&img, path.display().to_string());
    if report.bitmaps_rebuildable {
        for (g, bm) in report.rebuilt_bitmaps {
            img.replace_block_bitmap(g, bm)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            println!("rebuilt the block bitmap and free count of group {g}");
        }
    } else if !report.rebuilt_bitmaps.is_empty() {
        println!("block bitmaps disagree with the trees, but some block is claimed twice: not rebuilding them");
    }
    img.close()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(())
}
