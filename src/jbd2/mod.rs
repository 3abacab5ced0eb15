//! The jbd2 journal (inode 8): on-disk blocks (`format`), replay (`replay`), and the
//! transaction writer (`journal`). Everything is big-endian, checksum v3 with crc32c.

pub mod format;
