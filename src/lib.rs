//! extblk: a vhost-user-blk backend daemon.
//!
//! Data flows one way, device → engine → backing; completions flow back on whichever thread
//! can finish them. See `docs/architecture.md`.

pub mod bench;
pub mod check;
pub mod cli;
pub mod counters;
pub mod device;
pub mod engine;
pub mod ext4;
pub mod fatal;
pub mod image;
pub mod io;
pub mod jbd2;
pub mod mapping;
pub mod repair;
pub mod rng;
pub mod serve;
pub mod testing;
pub mod tools;
pub mod units;
