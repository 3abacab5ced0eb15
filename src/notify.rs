//! systemd's service readiness protocol (sd_notify(3)): a `Type=notify` unit learns that the
//! daemon is ready, and later that it is stopping, from a datagram sent to `$NOTIFY_SOCKET`.
//! Without that variable (not started by systemd, or another unit type) nothing is sent.

use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;

/// Sends `state` (newline-separated `KEY=value` assignments, e.g. `READY=1`) to the service
/// manager. Returns whether a manager was there to tell.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let addr = notify_addr(&target)?;
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
}

/// `$NOTIFY_SOCKET` is a path, or with a leading `@` a name in the abstract namespace.
fn notify_addr(target: &OsStr) -> io::Result<SocketAddr> {
    match target.as_bytes() {
        [] => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "NOTIFY_SOCKET is empty",
        )),
        [b'@', name @ ..] => SocketAddr::from_abstract_name(name),
        path => SocketAddr::from_pathname(Path::new(OsStr::from_bytes(path))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_and_an_abstract_name_are_both_understood() {
        let dir = std::env::temp_dir().join(format!("extblk-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let a = notify_addr(path.as_os_str()).unwrap();
        UnixDatagram::unbound()
            .unwrap()
            .send_to_addr(b"READY=1", &a)
            .unwrap();
        let mut buf = [0u8; 32];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let name = format!("extblk-notify-test-{}", std::process::id());
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        let a = notify_addr(OsStr::new(&format!("@{name}"))).unwrap();
        UnixDatagram::unbound()
            .unwrap()
            .send_to_addr(b"STOPPING=1", &a)
            .unwrap();
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
        assert!(notify_addr(OsStr::new("")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
