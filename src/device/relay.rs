//! A thin vhost-user message layer in front of `vhost-user-backend`.
//!
//! vhost-user-backend 0.24 answers GET_INFLIGHT_FD and SET_INFLIGHT_FD with an error (which
//! ends the connection), and its request handler is private to the crate, so it cannot be
//! taught them. Rather than fork the crate, each frontend connection is relayed: the frontend's
//! socket on one side, a private socket to the crate's `VhostUserDaemon` on the other. Every
//! message is passed through unchanged, file descriptors included, except:
//!
//! - GET_INFLIGHT_FD / SET_INFLIGHT_FD, answered here through [`RelayHandler`] (the device
//!   keeps the region; `inflight.rs`);
//! - SET_VRING_KICK, passed on and then followed by one kick of our own on that eventfd: a
//!   restarted daemon must look at its ring even if the guest, told by a stale
//!   `avail_event` (EVENT_IDX) written by the previous process, sends no kick.
//! - SET_BACKEND_REQ_FD, passed on, with a copy of the backend channel kept by the device: the
//!   crate's `Backend` cannot send CONFIG_CHANGE_MSG (its handler answers ENOSYS), and a
//!   grown disk must tell the frontend (`BlockDevice::resize`).
//!
//! The relay reads one whole message at a time (a 12-byte header, at most `MAX_PAYLOAD` bytes
//! of payload, at most `MAX_FDS` descriptors): anything larger or malformed ends the
//! connection, as vhost-user-backend itself does with bad input. It ends when either side
//! closes; closing one side closes the other, so the daemon's connection ends with the
//! frontend's.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;

use thiserror::Error;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::inflight::{InflightError, InflightRegion};

/// vhost-user's largest message payload (`MAX_MSG_SIZE` in the vhost crate).
const MAX_PAYLOAD: usize = 0x1000;
/// Most file descriptors one message carries (`MAX_ATTACHED_FD_ENTRIES` in the vhost crate).
const MAX_FDS: usize = 32;
const HEADER: usize = 12;
/// Longest wait for the rest of a message whose first bytes arrived.
const STALLED_MESSAGE: std::time::Duration = std::time::Duration::from_secs(10);

const SET_VRING_KICK: u32 = 12;
const SET_BACKEND_REQ_FD: u32 = 21;
const GET_INFLIGHT_FD: u32 = 31;
const SET_INFLIGHT_FD: u32 = 32;

const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
/// SET_VRING_KICK's payload: no descriptor attached (polling mode).
const VRING_NOFD: u64 = 0x100;
/// SET_VRING_KICK's payload: the queue index.
const VRING_INDEX: u64 = 0xff;

/// `VhostUserInflight`: mmap_size u64, mmap_offset u64, num_queues u16, queue_size u16,
/// padded to 24 bytes as the C struct is.
const INFLIGHT_PAYLOAD: usize = 24;
const INFLIGHT_MIN: usize = 20;

/// What the relay asks the device for.
pub trait RelayHandler: Send + Sync {
    /// A new region for `num_queues` queues of `queue_size` descriptors (GET_INFLIGHT_FD).
    fn get_inflight_fd(
        &self,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<InflightRegion, InflightError>;
    /// The connection's region (SET_INFLIGHT_FD), already mapped and checked against its file.
    fn set_inflight_fd(&self, region: InflightRegion) -> Result<(), InflightError>;
    /// Queue `queue`'s kick eventfd on this connection (SET_VRING_KICK), kept so that the
    /// device can look at the ring again on its own (after a quiesce).
    fn vring_kick(&self, queue: usize, kick: File);
    /// The backend channel's socket on this connection (SET_BACKEND_REQ_FD): the frontend
    /// negotiated BACKEND_REQ and listens there for CONFIG_CHANGE_MSG.
    fn backend_channel(&self, channel: UnixStream);
}

#[derive(Debug, Error)]
pub enum RelayError {
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    #[error("message {request} with a {size}-byte payload (at most {MAX_PAYLOAD})")]
    TooLarge { request: u32, size: usize },
    #[error("message {0}: malformed payload")]
    Malformed(u32),
    #[error("{0}")]
    Inflight(#[from] InflightError),
}

/// One vhost-user message.
struct Msg {
    request: u32,
    flags: u32,
    payload: Vec<u8>,
    fds: Vec<File>,
}

impl Msg {
    fn reply(request: u32, payload: Vec<u8>, fds: Vec<File>) -> Msg {
        Msg {
            request,
            flags: FLAG_VERSION | FLAG_REPLY,
            payload,
            fds,
        }
    }
}

fn recv_msg(sock: &UnixStream) -> Result<Option<Msg>, RelayError> {
    let mut hdr = [0u8; HEADER];
    let mut raw: [RawFd; MAX_FDS] = [-1; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: HEADER,
    }];
    // SAFETY: the iovec describes `hdr`, which lives across the call and may take any bytes.
    let (n, nfds) = loop {
        match unsafe { sock.recv_with_fds(&mut iov, &mut raw) } {
            Ok(r) => break r,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno()).into()),
        }
    };
    // SAFETY: recvmsg gave us these descriptors; each is owned by exactly one File from here.
    let fds: Vec<File> = raw[..nfds]
        .iter()
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    let mut s = sock;
    if n < HEADER {
        s.read_exact(&mut hdr[n..])?;
    }
    let word = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().unwrap_or([0; 4]));
    let (request, flags, size) = (word(0), word(4), word(8) as usize);
    if size > MAX_PAYLOAD {
        return Err(RelayError::TooLarge { request, size });
    }
    let mut payload = vec![0u8; size];
    s.read_exact(&mut payload)?;
    Ok(Some(Msg {
        request,
        flags,
        payload,
        fds,
    }))
}

fn send_msg(sock: &UnixStream, m: &Msg) -> Result<(), RelayError> {
    let mut hdr = [0u8; HEADER];
    hdr[0..4].copy_from_slice(&m.request.to_le_bytes());
    hdr[4..8].copy_from_slice(&m.flags.to_le_bytes());
    hdr[8..12].copy_from_slice(&(m.payload.len() as u32).to_le_bytes());
    let fds: Vec<RawFd> = m.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let total = HEADER + m.payload.len();
    let sent = loop {
        match sock.send_with_fds(&[&hdr[..], &m.payload[..]], &fds) {
            Ok(n) => break n,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno()).into()),
        }
    };
    if sent < total {
        // The descriptors went with the first byte; the rest is plain data.
        let mut rest = hdr.to_vec();
        rest.extend_from_slice(&m.payload);
        let mut s = sock;
        s.write_all(&rest[sent..])?;
    }
    Ok(())
}

fn inflight_fields(m: &Msg) -> Result<(u64, u64, u16, u16), RelayError> {
    let p = &m.payload;
    if p.len() < INFLIGHT_MIN {
        return Err(RelayError::Malformed(m.request));
    }
    let u64_at = |i: usize| u64::from_le_bytes(p[i..i + 8].try_into().unwrap_or([0; 8]));
    let u16_at = |i: usize| u16::from_le_bytes(p[i..i + 2].try_into().unwrap_or([0; 2]));
    Ok((u64_at(0), u64_at(8), u16_at(16), u16_at(18)))
}

fn inflight_payload(size: u64, offset: u64, num_queues: u16, queue_size: u16) -> Vec<u8> {
    let mut p = vec![0u8; INFLIGHT_PAYLOAD];
    p[0..8].copy_from_slice(&size.to_le_bytes());
    p[8..16].copy_from_slice(&offset.to_le_bytes());
    p[16..18].copy_from_slice(&num_queues.to_le_bytes());
    p[18..20].copy_from_slice(&queue_size.to_le_bytes());
    p
}

/// What to do with a message from the frontend.
enum Action {
    Forward(Msg),
    Answer(Msg),
    /// Handled here; the frontend wants no reply.
    Done,
    /// Pass it on, then kick this eventfd once.
    ForwardAndKick(Msg, File),
}

fn from_frontend(m: Msg, handler: &dyn RelayHandler) -> Result<Action, RelayError> {
    match m.request {
        GET_INFLIGHT_FD => {
            let (_, _, num_queues, queue_size) = inflight_fields(&m)?;
            let region = handler.get_inflight_fd(num_queues, queue_size)?;
            let fd = region.file().try_clone()?;
            log::debug!(
                "inflight region: {num_queues} queue(s) of {queue_size}, {} bytes",
                region.size()
            );
            let p = inflight_payload(region.size(), 0, num_queues, queue_size);
            Ok(Action::Answer(Msg::reply(GET_INFLIGHT_FD, p, vec![fd])))
        }
        SET_INFLIGHT_FD => {
            let (size, offset, num_queues, queue_size) = inflight_fields(&m)?;
            let mut fds = m.fds;
            let (Some(file), true) = (fds.pop(), fds.is_empty()) else {
                return Err(RelayError::Malformed(SET_INFLIGHT_FD));
            };
            let r = InflightRegion::from_frontend(file, size, offset, num_queues, queue_size)
                .and_then(|region| handler.set_inflight_fd(region));
            match (r, m.flags & FLAG_NEED_REPLY != 0) {
                (Ok(()), need) => {
                    log::info!("inflight region set: {num_queues} queue(s) of {queue_size}");
                    Ok(if need {
                        Action::Answer(Msg::reply(
                            SET_INFLIGHT_FD,
                            0u64.to_le_bytes().to_vec(),
                            vec![],
                        ))
                    } else {
                        Action::Done
                    })
                }
                (Err(e), true) => {
                    log::error!("SET_INFLIGHT_FD refused: {e}");
                    Ok(Action::Answer(Msg::reply(
                        SET_INFLIGHT_FD,
                        1u64.to_le_bytes().to_vec(),
                        vec![],
                    )))
                }
                (Err(e), false) => Err(e.into()),
            }
        }
        SET_VRING_KICK => {
            let v = m
                .payload
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
                .ok_or(RelayError::Malformed(SET_VRING_KICK))?;
            match m.fds.first() {
                Some(f) if v & VRING_NOFD == 0 => {
                    handler.vring_kick((v & VRING_INDEX) as usize, f.try_clone()?);
                    let kick = f.try_clone()?;
                    Ok(Action::ForwardAndKick(m, kick))
                }
                _ => Ok(Action::Forward(m)),
            }
        }
        SET_BACKEND_REQ_FD => {
            if let [f] = &m.fds[..] {
                handler
                    .backend_channel(UnixStream::from(std::os::fd::OwnedFd::from(f.try_clone()?)));
            }
            Ok(Action::Forward(m))
        }
        _ => Ok(Action::Forward(m)),
    }
}

/// Relays one connection until either side closes. `frontend` is the accepted frontend
/// socket, `backend` a connected socket whose peer `VhostUserDaemon` serves.
pub fn run(frontend: UnixStream, backend: UnixStream, handler: &dyn RelayHandler) {
    // A read only starts once poll says a message is there; a peer that sends part of one and
    // stalls ends the connection instead of holding the relay (and a shutdown) for ever.
    for s in [&frontend, &backend] {
        if let Err(e) = s.set_read_timeout(Some(STALLED_MESSAGE)) {
            log::warn!("vhost-user relay: cannot set a read timeout: {e}");
        }
    }
    match relay(&frontend, &backend, handler) {
        Ok(()) => {}
        Err(e) => log::warn!("vhost-user connection ended: {e}"),
    }
    // Either side gone: end the other, so the daemon's connection ends with the frontend's
    // and the frontend sees a backend that went away.
    let _ = frontend.shutdown(std::net::Shutdown::Both);
    let _ = backend.shutdown(std::net::Shutdown::Both);
}

fn relay(
    frontend: &UnixStream,
    backend: &UnixStream,
    handler: &dyn RelayHandler,
) -> Result<(), RelayError> {
    loop {
        let [from_front, from_back] =
            crate::io::sys::poll_readable([frontend.as_raw_fd(), backend.as_raw_fd()])?;
        if from_front {
            let Some(m) = recv_msg(frontend)? else {
                return Ok(());
            };
            match from_frontend(m, handler)? {
                Action::Forward(m) => send_msg(backend, &m)?,
                Action::Done => {}
                Action::Answer(m) => send_msg(frontend, &m)?,
                Action::ForwardAndKick(m, kick) => {
                    send_msg(backend, &m)?;
                    let mut k = &kick;
                    if let Err(e) = k.write_all(&1u64.to_ne_bytes()) {
                        log::warn!("cannot kick the restarted queue: {e}");
                    }
                }
            }
        }
        if from_back {
            let Some(m) = recv_msg(backend)? else {
                return Ok(());
            };
            send_msg(frontend, &m)?;
        }
    }
}

/// The private socket between the relay and `VhostUserDaemon`: in a directory of its own
/// (mode 0700, made by `mkdtemp`), so that no other local user can connect in the relay's
/// place; removed with it.
pub struct PrivateSocket {
    dir: std::path::PathBuf,
    path: std::path::PathBuf,
    listener: std::os::unix::net::UnixListener,
}

impl PrivateSocket {
    pub fn new() -> io::Result<PrivateSocket> {
        let template = std::env::temp_dir().join("extblk-relay-XXXXXX");
        let mut t = std::ffi::CString::new(template.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?
            .into_bytes_with_nul();
        // SAFETY: `t` is a writable NUL-terminated template ending in XXXXXX, as mkdtemp needs.
        let p = unsafe { libc::mkdtemp(t.as_mut_ptr().cast()) };
        if p.is_null() {
            return Err(io::Error::last_os_error());
        }
        t.pop();
        let dir = std::path::PathBuf::from(std::ffi::OsString::from(
            String::from_utf8_lossy(&t).into_owned(),
        ));
        let path = dir.join("backend.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path)?;
        Ok(PrivateSocket {
            dir,
            path,
            listener,
        })
    }

    /// The private directory (mode 0700) holding the socket.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// The daemon's listening side.
    pub fn listener(&self) -> io::Result<vhost::vhost_user::Listener> {
        Ok(vhost::vhost_user::Listener::from(
            self.listener.try_clone()?,
        ))
    }

    /// The relay's side: connected before the daemon accepts (the backlog holds it).
    pub fn connect(&self) -> io::Result<UnixStream> {
        UnixStream::connect(&self.path)
    }
}

impl Drop for PrivateSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Device {
        set: Mutex<Vec<(u16, u16)>>,
        kicks: Mutex<Vec<usize>>,
    }

    impl RelayHandler for Device {
        fn get_inflight_fd(&self, nq: u16, qs: u16) -> Result<InflightRegion, InflightError> {
            InflightRegion::create(nq, qs)
        }
        fn set_inflight_fd(&self, r: InflightRegion) -> Result<(), InflightError> {
            self.set
                .lock()
                .unwrap()
                .push((r.num_queues(), r.queue_size()));
            Ok(())
        }
        fn vring_kick(&self, queue: usize, _kick: File) {
            self.kicks.lock().unwrap().push(queue);
        }
        fn backend_channel(&self, _channel: UnixStream) {}
    }

    fn msg(request: u32, flags: u32, payload: Vec<u8>, fds: Vec<File>) -> Msg {
        Msg {
            request,
            flags: FLAG_VERSION | flags,
            payload,
            fds,
        }
    }

    #[test]
    fn inflight_messages_are_answered_and_the_rest_passes_through_with_its_fds() {
        let (front_peer, front) = UnixStream::pair().unwrap();
        let (back, back_peer) = UnixStream::pair().unwrap();
        let dev = std::sync::Arc::new(Device::default());
        let d2 = dev.clone();
        let t = std::thread::spawn(move || run(front, back, &*d2));

        // GET_INFLIGHT_FD: answered by the relay with a region and its fd.
        send_msg(
            &front_peer,
            &msg(GET_INFLIGHT_FD, 0, inflight_payload(0, 0, 2, 128), vec![]),
        )
        .unwrap();
        let r = recv_msg(&front_peer).unwrap().unwrap();
        assert_eq!(
            (r.request, r.flags & FLAG_REPLY),
            (GET_INFLIGHT_FD, FLAG_REPLY)
        );
        let (size, off, nq, qs) = inflight_fields(&r).unwrap();
        assert_eq!((size, off, nq, qs), (2 * 2112, 0, 2, 128));
        assert_eq!(r.fds.len(), 1);
        // SET_INFLIGHT_FD with that fd, wanting an ack.
        let fd = r.fds.into_iter().next().unwrap();
        send_msg(
            &front_peer,
            &msg(
                SET_INFLIGHT_FD,
                FLAG_NEED_REPLY,
                inflight_payload(size, 0, 2, 128),
                vec![fd],
            ),
        )
        .unwrap();
        let ack = recv_msg(&front_peer).unwrap().unwrap();
        assert_eq!(ack.payload, 0u64.to_le_bytes());
        assert_eq!(*dev.set.lock().unwrap(), vec![(2, 128)]);
        // A region that does not fit its file is refused with an error ack, never mapped.
        let small = InflightRegion::create(1, 8)
            .unwrap()
            .file()
            .try_clone()
            .unwrap();
        send_msg(
            &front_peer,
            &msg(
                SET_INFLIGHT_FD,
                FLAG_NEED_REPLY,
                inflight_payload(size, 0, 2, 128),
                vec![small],
            ),
        )
        .unwrap();
        assert_eq!(
            recv_msg(&front_peer).unwrap().unwrap().payload,
            1u64.to_le_bytes()
        );

        // Anything else reaches the backend as sent, descriptor included; replies come back.
        let ev = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        // SAFETY: dup gives a new descriptor that only this File owns.
        let f = unsafe { File::from_raw_fd(libc::dup(ev.as_raw_fd())) };
        send_msg(
            &front_peer,
            &msg(SET_VRING_KICK, 0, 1u64.to_le_bytes().to_vec(), vec![f]),
        )
        .unwrap();
        let got = recv_msg(&back_peer).unwrap().unwrap();
        assert_eq!(
            (got.request, got.payload.clone(), got.fds.len()),
            (SET_VRING_KICK, 1u64.to_le_bytes().to_vec(), 1)
        );
        // ... and the relay kicked the queue once itself, and told the device its kick fd.
        assert_eq!(ev.read().unwrap(), 1);
        assert_eq!(*dev.kicks.lock().unwrap(), vec![1]);
        send_msg(
            &back_peer,
            &msg(1, FLAG_REPLY, 7u64.to_le_bytes().to_vec(), vec![]),
        )
        .unwrap();
        assert_eq!(
            recv_msg(&front_peer).unwrap().unwrap().payload,
            7u64.to_le_bytes()
        );

        // An oversized message ends the connection (both sides).
        let mut bad = [0u8; HEADER];
        bad[8..12].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        (&front_peer).write_all(&bad).unwrap();
        t.join().unwrap();
        assert!(recv_msg(&back_peer).unwrap().is_none());
    }
}
