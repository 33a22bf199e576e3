//! Plain TCP-to-TCP relaying with splice(2): bytes move socket → pipe → socket inside the
//! kernel and are never copied through the agent's memory. Used where the agent relays without
//! TLS (same-node connections, plaintext passed through); HBONE needs the bytes in user space
//! to encrypt them.
//!
//! A direction gets its pipe the first time it carries data (an idle connection holds none),
//! and the pipe is always drained before the next read, so EAGAIN on the read side means the
//! socket has nothing, never that the pipe is full.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

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

/// One direction: from `r` to `w` until EOF, then half-closes `w`. Returns the bytes moved.
pub async fn one_way(r: &TcpStream, w: &TcpStream) -> std::io::Result<u64> {
    let mut pipe: Option<Pipe> = None;
    let mut total = 0u64;
    loop {
        r.readable().await?;
        let p = match &mut pipe {
            Some(p) => p,
            None => pipe.insert(Pipe::new()?),
        };
        let n = match r.try_io(Interest::READABLE, || splice(r.as_raw_fd(), p.w.as_raw_fd(), PIPE_SIZE)) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            // EOF from the reader: pass the half-close on; the other direction may go on.
            let _ = socket2::SockRef::from(w).shutdown(std::net::Shutdown::Write);
            return Ok(total);
        }
        let mut left = n;
        while left > 0 {
            match w.try_io(Interest::WRITABLE, || splice(p.r.as_raw_fd(), w.as_raw_fd(), left)) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => w.writable().await?,
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
    }
}
