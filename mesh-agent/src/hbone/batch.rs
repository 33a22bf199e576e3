//! One write per turn on an HBONE connection.
//!
//! TLS and HTTP/2 each write as soon as they have something: during a tunnel's set-up the
//! client's last handshake flight, the HTTP/2 preface, its SETTINGS and the CONNECT request
//! went out as four writes, and every write here is a packet the peer's kernel and agent then
//! handle on their own. [`BatchIo`] sits between rustls and the TCP socket and, while the task
//! that owns the connection is being polled (inside [`Batcher::run`]), keeps small writes in a
//! buffer; when that poll ends, everything it wrote leaves in one write. Outside a batched poll
//! it writes through.
//!
//! No byte can be left behind: a batched poll never ends with buffered data unless the socket
//! is full, and then the task waits for it to drain before anything else. Writes larger than
//! [`HOLD_MAX`] are not copied (bulk data goes straight to the socket, after what is buffered).

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The most a batched poll keeps back before writing through.
pub const HOLD_MAX: usize = 16 * 1024;

struct Shared {
    state: Mutex<State>,
}

struct State {
    tcp: TcpStream,
    buf: Vec<u8>,
    hold: bool,
    /// A failed write at the end of a batched poll, returned by the next operation.
    broken: Option<io::ErrorKind>,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Only the task that owns the connection uses it: never contended.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    /// Writes out whatever is buffered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(kind) = self.broken {
            return Poll::Ready(Err(kind.into()));
        }
        while !self.buf.is_empty() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.buf))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.buf.drain(..n);
        }
        if self.buf.capacity() > HOLD_MAX {
            self.buf = Vec::new();
        }
        Poll::Ready(Ok(()))
    }
}

/// The TCP stream under TLS, batching writes as described in the module documentation.
pub struct BatchIo(Arc<Shared>);

impl BatchIo {
    pub fn new(tcp: TcpStream) -> BatchIo {
        // Delayed ACKs (TCP_QUICKACK off), so they ride on the reply: every exchange on an
        // HBONE connection is answered (handshake flights, SETTINGS, CONNECT, data), yet at the
        // start of a connection Linux acknowledges each segment at once, which cost a bare ACK
        // packet before each handshake reply. The kernel goes back to quick ACKs by itself when
        // a delayed ACK finds no reply to ride on. Best effort: only packets depend on it.
        let _ = socket2::SockRef::from(&tcp).set_quickack(false);
        BatchIo(Arc::new(Shared { state: Mutex::new(State { tcp, buf: Vec::new(), hold: false, broken: None }) }))
    }

    pub fn batcher(&self) -> Batcher {
        Batcher(self.0.clone())
    }
}

impl AsyncRead for BatchIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0.state().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for BatchIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut st = self.0.state();
        if let Some(kind) = st.broken {
            return Poll::Ready(Err(kind.into()));
        }
        if st.hold && st.buf.len() + total <= HOLD_MAX {
            for b in bufs {
                st.buf.extend_from_slice(b);
            }
            return Poll::Ready(Ok(total));
        }
        // Write through, after what is already buffered (order is preserved).
        ready!(st.poll_drain(cx))?;
        Pin::new(&mut st.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = self.0.state();
        if st.hold {
            // The batched poll's end writes it.
            return Poll::Ready(Ok(()));
        }
        st.poll_drain(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = self.0.state();
        if !st.buf.is_empty() {
            // The last bytes (GOAWAY, close_notify) and the FIN in one segment: corked, the
            // kernel holds the data until shutdown pushes it with the FIN attached.
            let _ = socket2::SockRef::from(&st.tcp).set_cork(true);
        }
        ready!(st.poll_drain(cx))?;
        Pin::new(&mut st.tcp).poll_shutdown(cx)
    }
}

/// The handle that batches a connection's writes per poll of the task that drives it.
#[derive(Clone)]
pub struct Batcher(Arc<Shared>);

impl Batcher {
    /// Polls `fut` with this connection's writes held, writing them out when each poll ends.
    pub fn run<F: Future + Unpin>(self, fut: F) -> Batched<F> {
        Batched { inner: fut, io: self.0, done: None }
    }

    /// Closes gently, once the task that drove the connection is done and this side ended it:
    /// the FIN goes out (if the task's shutdown did not send it), then what the peer still sends
    /// is read and dropped until it closes too, or `limit` passes. A socket closed with unread
    /// bytes sends a reset instead, and the kernel drops whatever of ours the peer has not yet
    /// received (the last of a stream's data, say).
    pub async fn linger(self, limit: std::time::Duration) {
        {
            let st = self.0.state();
            let _ = socket2::SockRef::from(&st.tcp).shutdown(std::net::Shutdown::Write);
        }
        let drain = async {
            let mut buf = [0u8; 4096];
            loop {
                let read = std::future::poll_fn(|cx| {
                    let mut st = self.0.state();
                    let mut rb = ReadBuf::new(&mut buf);
                    ready!(Pin::new(&mut st.tcp).poll_read(cx, &mut rb))?;
                    Poll::Ready(Ok::<_, io::Error>(rb.filled().len()))
                })
                .await;
                if !matches!(read, Ok(n) if n > 0) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(limit, drain).await;
    }
}

pub struct Batched<F: Future> {
    inner: F,
    io: Arc<Shared>,
    done: Option<F::Output>,
}

impl<F: Future + Unpin> Future for Batched<F>
where
    F::Output: Unpin,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        if this.done.is_none() {
            this.io.state().hold = true;
            let r = Pin::new(&mut this.inner).poll(cx);
            this.io.state().hold = false;
            if let Poll::Ready(v) = r {
                this.done = Some(v);
            }
        }
        let drained = this.io.state().poll_drain(cx);
        match drained {
            // Waiting for room in the socket: the task is woken when there is some.
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => {
                // The connection is broken: the future sees it at its next read or write.
                let mut st = this.io.state();
                if st.broken.is_none() {
                    st.broken = Some(e.kind());
                    st.buf = Vec::new();
                    cx.waker().wake_by_ref();
                }
            }
        }
        match this.done.take() {
            Some(v) => Poll::Ready(v),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// Reads what has arrived so far, waiting a moment for anything in flight.
    async fn arrived(s: &mut TcpStream) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        while let Ok(Ok(n)) = tokio::time::timeout(std::time::Duration::from_millis(100), s.read(&mut buf)).await {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        out
    }

    /// Data segments the socket has sent (TCP_INFO).
    fn data_segs_out(fd: std::os::fd::RawFd) -> u32 {
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: a live socket and an out-pointer sized for tcp_info.
        let rc = unsafe {
            libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, (&mut info as *mut libc::tcp_info).cast(), &mut len)
        };
        assert_eq!(rc, 0);
        info.tcpi_data_segs_out
    }

    #[tokio::test]
    async fn writes_in_a_batched_poll_leave_together_when_it_ends() {
        let (a, mut b) = pair().await;
        a.set_nodelay(true).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&a);
        let mut io = BatchIo::new(a);
        let batcher = io.batcher();
        // One poll writes three times and flushes twice, then waits: it all leaves when the
        // poll ends, as one segment.
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(batcher.run(Box::pin(async move {
            io.write_all(b"one ").await.unwrap();
            io.flush().await.unwrap();
            io.write_all(b"two ").await.unwrap();
            io.flush().await.unwrap();
            io.write_all(b"three").await.unwrap();
            rx.await.unwrap();
            io.write_all(b" four").await.unwrap();
            io
        })));
        assert_eq!(arrived(&mut b).await, b"one two three");
        assert_eq!(data_segs_out(fd), 1, "three writes in one poll, one segment");
        tx.send(()).unwrap();
        let mut io = task.await.unwrap();
        assert_eq!(arrived(&mut b).await, b" four");
        assert_eq!(data_segs_out(fd), 2);
        // Outside a batched poll, writes go straight out: one segment each.
        for w in [&b"five "[..], b"six ", b"seven"] {
            io.write_all(w).await.unwrap();
            io.flush().await.unwrap();
        }
        assert_eq!(arrived(&mut b).await, b"five six seven");
        assert_eq!(data_segs_out(fd), 5);
        io.shutdown().await.unwrap();
        assert_eq!(b.read(&mut [0u8; 8]).await.unwrap(), 0, "FIN after the data");
    }

    #[tokio::test]
    async fn large_writes_and_a_full_socket_lose_nothing() {
        let (a, mut b) = pair().await;
        let mut io = BatchIo::new(a);
        let batcher = io.batcher();
        // 8 MiB in writes of odd sizes, some below HOLD_MAX and some above, far more than the
        // socket buffers hold while nobody reads: the batched task must wait, not drop.
        let data: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(batcher.run(Box::pin(async move {
            let mut off = 0;
            let mut step = 1;
            while off < sent.len() {
                let n = (step * 977 % 40_000).max(1).min(sent.len() - off);
                io.write_all(&sent[off..off + n]).await.unwrap();
                off += n;
                step += 1;
            }
            io.shutdown().await.unwrap();
        })));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data, "bytes arrive complete and in order");
    }

    #[tokio::test]
    async fn reads_pass_through() {
        let (a, mut b) = pair().await;
        let mut io = BatchIo::new(a);
        b.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        io.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        drop(b);
        assert_eq!(io.read(&mut buf).await.unwrap(), 0);
    }

    /// A side that ends a connection while the peer's last bytes to it sit unread (a window
    /// update, a ping) must still deliver all of its own: closed bluntly, the kernel would send
    /// a reset and drop what was still queued for the peer.
    #[tokio::test]
    async fn a_lingering_close_delivers_everything_despite_unread_bytes() {
        // b's window is small: what a writes waits in a's send queue until b reads.
        let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        l.set_recv_buffer_size(4096).unwrap();
        l.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
        l.listen(1).unwrap();
        l.set_nonblocking(true).unwrap();
        let l = tokio::net::TcpListener::from_std(l.into()).unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (mut b, _) = l.accept().await.unwrap();
        let mut io = BatchIo::new(a);
        let batcher = io.batcher();
        b.write_all(b"never read by a").await.unwrap();
        let data = vec![7u8; 1 << 20];
        let closer = tokio::spawn(async move {
            io.write_all(&data).await.unwrap();
            io.shutdown().await.unwrap();
            drop(io);
            batcher.linger(std::time::Duration::from_secs(10)).await;
        });
        // The reader starts late: most of the data is still queued on a's side at its close.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        let end = loop {
            match b.read(&mut buf).await {
                Ok(0) => break None,
                Ok(n) => got += n,
                Err(e) => break Some(e),
            }
        };
        drop(b);
        closer.await.unwrap();
        assert!(end.is_none(), "read ended with {end:?} after {got} bytes");
        assert_eq!(got, 1 << 20);
    }
}
