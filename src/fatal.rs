//! A panic on any thread ends the whole process. Left to Rust's default, a panicking queue,
//! worker or committer thread would die alone while the others carried on around its poisoned
//! locks and half-done requests. Stopping at once is safe: the image is crash-consistent on disk
//! by design, and the next open replays its journal.

use std::any::Any;
use std::panic::Location;

/// Exit status after a panic: what an unwinding panic of the main thread gives, distinct from 0
/// (clean), 1 (a refused input or failed operation) and 2 (`check` could not check, clap usage).
pub const PANIC_EXIT_STATUS: i32 = 101;

/// Installs the hook (`main` does, before anything else runs): the panic is logged with its
/// thread and location, then the process exits with [`PANIC_EXIT_STATUS`] without unwinding
/// further or running any destructor.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = panic_report(
            std::thread::current().name(),
            info.payload(),
            info.location(),
        );
        let msg = format!(
            "{msg}; exiting with status {PANIC_EXIT_STATUS} (the image is crash-consistent: the next open replays its journal)"
        );
        if log::log_enabled!(log::Level::Error) {
            log::error!("{msg}");
        } else {
            // No logger (or RUST_LOG=off): the operator must still learn why the daemon stopped.
            eprintln!("extblk: {msg}");
        }
        // SAFETY: _exit ends the process at once; nothing of this process runs after it, so no
        // other thread can go on over a lock the panicking thread held.
        unsafe { libc::_exit(PANIC_EXIT_STATUS) }
    }));
}

/// "thread 'NAME' panicked at FILE:LINE:COL: MESSAGE", as Rust's default hook words it.
pub fn panic_report(
    thread: Option<&str>,
    payload: &(dyn Any + Send),
    location: Option<&Location<'_>>,
) -> String {
    let what = if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.as_str()
    } else {
        "Box<dyn Any>"
    };
    let at = location.map_or_else(|| "an unknown location".to_string(), |l| l.to_string());
    format!(
        "thread '{}' panicked at {at}: {what}",
        thread.unwrap_or("<unnamed>")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_names_thread_location_and_message() {
        let here = Location::caller();
        let r = panic_report(Some("queue-1"), &"index out of bounds", Some(here));
        assert_eq!(
            r,
            format!("thread 'queue-1' panicked at {here}: index out of bounds")
        );
        assert!(r.contains("src/fatal.rs:"), "{r}");
        let r = panic_report(None, &String::from("formatted 7"), None);
        assert_eq!(
            r,
            "thread '<unnamed>' panicked at an unknown location: formatted 7"
        );
        let r = panic_report(Some("w"), &42u32, None);
        assert!(r.ends_with(": Box<dyn Any>"), "{r}");
    }
}
