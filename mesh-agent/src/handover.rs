//! Hand-over between two agents on one node, for an upgrade without a refused connection.
//!
//! A running agent listens on `<state-dir>/handover.sock` (a Unix `SOCK_SEQPACKET` socket,
//! mode 0600, and only a peer of the agent's own user is answered). A starting agent connects
//! there first. If an agent answers:
//!
//! 1. the successor says `hello`; the predecessor sends copies of its listening sockets
//!    (`SCM_RIGHTS`): the node-wide ones (admin, metrics, readiness) and each captured
//!    workload's (outbound, inbound, HBONE), by the workload's pin name, then `end`;
//! 2. the successor captures its workloads on those same sockets (nothing queued in a
//!    listener's backlog is lost: it is one socket in two processes), and waits until it could
//!    serve every one of them (a configuration, a certificate for each); until then only the
//!    predecessor accepts;
//! 3. the successor starts accepting and says `stop`; the predecessor stops accepting, tells
//!    its HBONE peers to go away (GOAWAY: their next streams go to a new connection, which the
//!    successor accepts), answers `stopped`, and drains: established connections run until
//!    they end or the drain deadline, when they are closed and counted. It never detaches a
//!    program or removes a pin on the way out.
//!
//! If the successor goes away before `stop`, the predecessor carries on as before.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use socket2::{Domain, SockAddr, Socket, Type};

/// The socket's name in the state directory.
pub const SOCKET: &str = "handover.sock";
/// The protocol spoken on it; a peer speaking another is refused.
pub const VERSION: u32 = 1;
/// At most this many descriptors go in one message (the kernel's limit is 253).
const FDS_PER_MESSAGE: usize = 64;
/// How long one step of the exchange may take before the successor gives up on it.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_MESSAGE: usize = 64 * 1024;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Message {
    Hello {
        version: u32,
    },
    /// `kinds[i]` names the i-th descriptor attached. `group` is `node` or a workload's pin
    /// name.
    Listeners {
        group: String,
        kinds: Vec<String>,
    },
    End {
        pid: u32,
    },
    Refused {
        reason: String,
    },
    Stop,
    Stopped,
}

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("hand-over socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the running agent (at {path}) answered something unexpected: {what}")]
    Protocol { path: PathBuf, what: String },
    #[error("the running agent (at {path}) refused to hand over: {reason}")]
    Refused { path: PathBuf, reason: String },
}

/// What a predecessor offers: listeners by group, each with its kind.
pub type Offer = Vec<(String, Vec<(String, OwnedFd)>)>;

/// The successor's side: the listeners received, and the connection to tell the
/// predecessor to stop on.
pub struct Taken {
    sock: Socket,
    path: PathBuf,
    pub pid: u32,
    pub groups: HashMap<String, Vec<(String, OwnedFd)>>,
}

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET)
}

/// The node's agent lock (`<state-dir>/agent.lock`), held by the agent that serves the node.
pub const LOCK: &str = "agent.lock";

/// Takes the node's agent lock, or says why an agent cannot start beside one that holds it
/// and does not hand over.
fn open_lock(path: &Path) -> io::Result<std::fs::File> {
    std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path)
}

pub fn lock(state_dir: &Path) -> anyhow::Result<std::fs::File> {
    let path = state_dir.join(LOCK);
    let f = open_lock(&path).map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another agent holds {} but did not answer on {} to hand over: it serves this node's pods, and capturing them beside it would refuse them. Stop it first (an agent too old to hand over is upgraded by stopping it: on Kubernetes, roll out once with maxSurge 0 and maxUnavailable 1)",
            path.display(),
            socket_path(state_dir).display()
        ),
        Err(std::fs::TryLockError::Error(e)) => anyhow::bail!("locking {}: {e}", path.display()),
    }
}

/// The same, waiting until the holder (a predecessor draining) exits.
pub fn lock_blocking(state_dir: &Path) -> io::Result<std::fs::File> {
    let f = open_lock(&state_dir.join(LOCK))?;
    f.lock()?;
    Ok(f)
}

/// Asks the agent running on this node (if any) for its listeners. `None`: no agent answers
/// (none runs, or a stale socket of one that exited).
pub fn take_over(state_dir: &Path) -> Result<Option<Taken>, HandoverError> {
    let path = socket_path(state_dir);
    let err = |source| HandoverError::Io { path: path.clone(), source };
    let sock = Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None).map_err(err)?;
    let addr = SockAddr::unix(&path).map_err(err)?;
    match sock.connect(&addr) {
        Ok(()) => {}
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ECONNREFUSED)) => return Ok(None),
        Err(e) => return Err(err(e)),
    }
    // Sockets are taken only from an agent of our own user (the socket's mode says so too).
    let (me, them) = (unsafe { libc::geteuid() }, peer_uid(&sock).map_err(err)?);
    if them != me {
        return Err(HandoverError::Protocol {
            path,
            what: format!("its owner is user {them}, not this agent's user {me}"),
        });
    }
    sock.set_read_timeout(Some(STEP_TIMEOUT)).map_err(err)?;
    sock.set_write_timeout(Some(STEP_TIMEOUT)).map_err(err)?;
    send(&sock, &Message::Hello { version: VERSION }, &[]).map_err(err)?;
    let mut groups = HashMap::new();
    loop {
        let (msg, fds) = recv(&sock).map_err(err)?;
        match msg {
            Message::Listeners { group, kinds } if kinds.len() == fds.len() => {
                let entry: &mut Vec<(String, OwnedFd)> = groups.entry(group).or_default();
                entry.extend(kinds.into_iter().zip(fds));
            }
            Message::End { pid } => {
                // Blocking from here on: `stop` waits as long as the predecessor needs.
                sock.set_read_timeout(None).map_err(err)?;
                return Ok(Some(Taken { sock, path, pid, groups }));
            }
            Message::Refused { reason } => return Err(HandoverError::Refused { path, reason }),
            other => return Err(HandoverError::Protocol { path, what: format!("{other:?}") }),
        }
    }
}

impl Taken {
    /// Whether the predecessor is gone (it exited, or was killed) before being told to stop:
    /// nothing accepts for it any more, so waiting for it would only hold connections back.
    pub fn predecessor_gone(&self) -> bool {
        let mut b = [0u8; 1];
        // SAFETY: a peek of at most one byte into a live buffer, without blocking.
        let n =
            unsafe { libc::recv(self.sock.as_raw_fd(), b.as_mut_ptr().cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
        n == 0 || (n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock)
    }

    /// Tells the predecessor to stop accepting; returns once it has.
    pub fn stop(self) -> Result<u32, HandoverError> {
        let err = |source| HandoverError::Io { path: self.path.clone(), source };
        send(&self.sock, &Message::Stop, &[]).map_err(err)?;
        self.sock.set_read_timeout(Some(STEP_TIMEOUT)).map_err(err)?;
        match recv(&self.sock).map_err(err)?.0 {
            Message::Stopped => Ok(self.pid),
            other => Err(HandoverError::Protocol { path: self.path.clone(), what: format!("{other:?}") }),
        }
    }
}

/// The predecessor's side: answers successors at `<state_dir>/handover.sock` on a thread of
/// its own. `offer` gives copies of the listeners (called per successor, which from then on
/// has them: the agent should change nothing any more); `resume` is called when that
/// successor goes away before taking over; `on_stop` when a successor says `stop`, and must
/// return once nothing is accepted any more. After that, no other successor is answered.
pub fn serve(
    state_dir: &Path,
    offer: impl Fn() -> io::Result<Offer> + Send + 'static,
    resume: impl Fn() + Send + 'static,
    on_stop: impl FnOnce() + Send + 'static,
) -> io::Result<()> {
    let path = socket_path(state_dir);
    let _ = std::fs::remove_file(&path);
    let listener = Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None)?;
    listener.bind(&SockAddr::unix(&path)?)?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    listener.listen(4)?;
    std::thread::Builder::new().name("handover".into()).spawn(move || {
        let mut on_stop = Some(on_stop);
        loop {
            let conn = match listener.accept() {
                Ok((c, _)) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "hand-over socket accept failed");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            match answer(&conn, &offer) {
                Ok(true) => {
                    if let Some(f) = on_stop.take() {
                        f();
                    }
                    let _ = send(&conn, &Message::Stopped, &[]);
                    // The successor listens at this path now (or will): ours is closed.
                    return;
                }
                Ok(false) => {
                    tracing::warn!("a successor went away before taking over; carrying on");
                    resume();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "hand-over to a successor failed; carrying on");
                    resume();
                }
            }
        }
    })?;
    Ok(())
}

/// One successor: true when it said `stop`.
fn answer(conn: &Socket, offer: &impl Fn() -> io::Result<Offer>) -> io::Result<bool> {
    let me = unsafe { libc::geteuid() };
    match peer_uid(conn)? {
        uid if uid == me => {}
        uid => {
            let reason = format!("only a process of user {me} may take over this agent's listeners, not user {uid}");
            send(conn, &Message::Refused { reason: reason.clone() }, &[])?;
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, reason));
        }
    }
    conn.set_read_timeout(Some(STEP_TIMEOUT))?;
    match recv(conn)?.0 {
        Message::Hello { version: VERSION } => {}
        Message::Hello { version } => {
            let reason = format!("hand-over protocol {version} asked, this agent speaks {VERSION}");
            send(conn, &Message::Refused { reason: reason.clone() }, &[])?;
            return Err(io::Error::new(io::ErrorKind::InvalidData, reason));
        }
        other => return Err(io::Error::new(io::ErrorKind::InvalidData, format!("expected hello, got {other:?}"))),
    }
    let groups = offer()?;
    let mut sent = 0;
    for (group, listeners) in &groups {
        for chunk in listeners.chunks(FDS_PER_MESSAGE) {
            let kinds = chunk.iter().map(|(k, _)| k.clone()).collect();
            let fds: Vec<RawFd> = chunk.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
            send(conn, &Message::Listeners { group: group.clone(), kinds }, &fds)?;
            sent += fds.len();
        }
    }
    send(conn, &Message::End { pid: std::process::id() }, &[])?;
    tracing::info!(
        groups = groups.len(),
        listeners = sent,
        "listeners handed to a successor; serving until it is ready"
    );
    drop(groups);
    // The successor takes as long as it needs to become ready (a certificate, say).
    conn.set_read_timeout(None)?;
    match recv(conn) {
        Ok((Message::Stop, _)) => Ok(true),
        Ok((other, _)) => Err(io::Error::new(io::ErrorKind::InvalidData, format!("expected stop, got {other:?}"))),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

fn peer_uid(s: &Socket) -> io::Result<u32> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: valid socket, out-pointer sized for ucred.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cred.uid)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn send(s: &Socket, msg: &Message, fds: &[RawFd]) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
    let mut iov = libc::iovec { iov_base: body.as_ptr() as *mut libc::c_void, iov_len: body.len() };
    let space = if fds.is_empty() {
        0
    } else {
        // SAFETY: CMSG_SPACE is a pure size computation.
        unsafe { libc::CMSG_SPACE(std::mem::size_of_val(fds) as u32) as usize }
    };
    let mut control = vec![0u8; space];
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    if !fds.is_empty() {
        hdr.msg_control = control.as_mut_ptr().cast();
        hdr.msg_controllen = space as _;
        // SAFETY: the control buffer is CMSG_SPACE bytes for these descriptors, so the first
        // header and its data fit.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&hdr);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast::<RawFd>(), fds.len());
        }
    }
    // SAFETY: the header points at live buffers for the duration of the call.
    let n = unsafe { libc::sendmsg(s.as_raw_fd(), &hdr, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn recv(s: &Socket) -> io::Result<(Message, Vec<OwnedFd>)> {
    let mut body = vec![0u8; MAX_MESSAGE];
    let mut iov = libc::iovec { iov_base: body.as_mut_ptr().cast(), iov_len: body.len() };
    // SAFETY: a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((FDS_PER_MESSAGE * std::mem::size_of::<RawFd>()) as u32) as usize };
    let mut control = vec![0u8; space];
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = control.as_mut_ptr().cast();
    hdr.msg_controllen = space as _;
    // SAFETY: the header points at live buffers for the duration of the call.
    let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut hdr, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return Err(if e.kind() == io::ErrorKind::WouldBlock {
            io::Error::new(io::ErrorKind::TimedOut, "no answer in time")
        } else {
            e
        });
    }
    // Descriptors first, so that they are closed whatever the message turns out to be.
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote, within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&hdr);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&hdr, c);
        }
    }
    if n == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the other agent closed the hand-over connection"));
    }
    if hdr.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "a hand-over message was truncated"));
    }
    let msg = serde_json::from_slice(&body[..n as usize])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("a hand-over message: {e}")))?;
    Ok((msg, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both sides over a real socket: the listeners arrive as working sockets (the successor
    /// accepts a connection made to the predecessor's address), and `stop` runs `on_stop`.
    #[test]
    fn listeners_cross_and_stop_is_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let fd: OwnedFd = l.into();
        let stopped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stopped.clone();
        serve(
            dir.path(),
            move || Ok(vec![("node".to_owned(), vec![("admin".to_owned(), fd.try_clone()?)])]),
            || {},
            move || s2.store(true, std::sync::atomic::Ordering::SeqCst),
        )
        .unwrap();
        let taken = take_over(dir.path()).unwrap().expect("an agent answers");
        assert_eq!(taken.pid, std::process::id());
        assert!(!taken.predecessor_gone());
        let (kind, fd) = &taken.groups["node"][0];
        assert_eq!(kind, "admin");
        let got = std::net::TcpListener::from(fd.try_clone().unwrap());
        let _c = std::net::TcpStream::connect(addr).unwrap();
        assert_eq!(got.accept().unwrap().0.local_addr().unwrap(), addr);
        assert!(!stopped.load(std::sync::atomic::Ordering::SeqCst));
        taken.stop().unwrap();
        assert!(stopped.load(std::sync::atomic::Ordering::SeqCst));
        // Stopped: no second successor is answered.
        std::fs::remove_file(socket_path(dir.path())).ok();
        assert!(take_over(dir.path()).unwrap().is_none());
    }

    #[test]
    fn no_agent_means_none_and_a_stale_socket_too() {
        let dir = tempfile::tempdir().unwrap();
        assert!(take_over(dir.path()).unwrap().is_none());
        // A socket file whose agent is gone.
        drop(std::os::unix::net::UnixListener::bind(socket_path(dir.path())).unwrap());
        assert!(take_over(dir.path()).unwrap().is_none());
    }
}
