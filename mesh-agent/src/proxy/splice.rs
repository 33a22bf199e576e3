//! Plain TCP-to-TCP relaying with splice(2): bytes move socket → pipe → socket inside the
//! kernel and are never copied through the agent's memory. Used where the agent relays without
//! TLS (same-node connections, plaintext passed through); HBONE needs the bytes in user space
//! to encrypt them.
//!
//! A pipe is held only while a chunk is in flight: it is always drained before the next read
//! (so EAGAIN on the read side means the socket has nothing, never that the pipe is full),
//! and an empty pipe goes back to a small per-thread pool for the next chunk of any
//! connection. An idle connection holds no pipe, so a connection costs the agent two
//! descriptors, not six. When no pipe can be had within the descriptors kept for established
//! traffic ([`crate::limits::fd_ceiling`]), the chunk is copied through user space instead:
//! an established connection never fails for want of a pipe.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::limits::Activity;

/// What one splice from the socket may move (the pipe is sized to hold it).
const PIPE_SIZE: usize = 256 * 1024;

struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

impl Pipe {
    fn new() -> std::io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into a two-element array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let p = unsafe { Pipe { r: OwnedFd::from_raw_fd(fds[0]), w: OwnedFd::from_raw_fd(fds[1]) } };
        // Best effort: a larger pipe means fewer system calls on a bulk flow; the default
        // (64 KiB) works too if the limit (fs.pipe-max-size) is lower.
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(p.w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE as libc::c_int) };
        Ok(p)
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> std::io::Result<usize> {
    // SAFETY: splice between two descriptors this function's callers own, no offsets.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Idle pipes kept per thread.
const POOL: usize = 8;

thread_local! {
    static PIPES: std::cell::RefCell<Vec<Pipe>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An empty pipe from this thread's pool, or a new one if its descriptors are below the
/// ceiling; None when neither can be had.
fn take_pipe() -> Option<Pipe> {
    if let Some(p) = PIPES.with(|p| p.borrow_mut().pop()) {
        return Some(p);
    }
    let p = Pipe::new().ok()?;
    (p.w.as_raw_fd() < crate::limits::fd_ceiling()).then_some(p)
}

/// An emptied pipe, back to this thread's pool (or closed, when the pool is full).
fn give_back(p: Pipe) {
    PIPES.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOL {
            pool.push(p);
        }
    });
}

/// One direction: from `r` to `w` until EOF, then half-closes `w`. Returns the bytes moved;
/// each chunk is noted in `activity` (`forward`: the client-to-upstream direction).
pub async fn one_way(r: &TcpStream, w: &TcpStream, activity: &Activity, forward: bool) -> std::io::Result<u64> {
    let mut total = 0u64;
    loop {
        r.readable().await?;
        let n = match take_pipe() {
            Some(p) => match spliced(r, w, p).await? {
                Some(n) => n,
                None => continue,
            },
            None => match copied(r, w).await? {
                Some(n) => n,
                None => continue,
            },
        };
        if n == 0 {
            // EOF from the reader: pass the half-close on; the other direction may go on.
            let _ = socket2::SockRef::from(w).shutdown(std::net::Shutdown::Write);
            return Ok(total);
        }
        total += n as u64;
        activity.moved(forward, n as u64);
    }
}

/// One chunk through `p`: Some(bytes moved, 0 at EOF), or None when there was nothing to read.
/// The pipe goes back to the pool once empty; on an error it is closed.
async fn spliced(r: &TcpStream, w: &TcpStream, p: Pipe) -> std::io::Result<Option<usize>> {
    let n = match r.try_io(Interest::READABLE, || splice(r.as_raw_fd(), p.w.as_raw_fd(), PIPE_SIZE)) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            give_back(p);
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let mut left = n;
    while left > 0 {
        match w.try_io(Interest::WRITABLE, || splice(p.r.as_raw_fd(), w.as_raw_fd(), left)) {
            Ok(m) => left -= m,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => w.writable().await?,
            Err(e) => return Err(e),
        }
    }
    give_back(p);
    Ok(Some(n))
}

/// One chunk through user space, when no pipe could be had: as [`spliced`].
async fn copied(r: &TcpStream, w: &TcpStream) -> std::io::Result<Option<usize>> {
    let mut buf = vec![0u8; 64 * 1024];
    let n = match r.try_read(&mut buf) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
        Err(e) => return Err(e),
    };
    super::write_all(w, &buf[..n]).await?;
    Ok(Some(n))
}
