//! An HTTP/2 stream as a byte stream (`AsyncRead` + `AsyncWrite`), for HBONE inside HBONE: the
//! source agent's tunnel to another zone's workload runs its own mutual TLS and HTTP/2 over a
//! CONNECT stream to that zone's gateway. The gateway forwards the stream's bytes and never
//! holds a key that decrypts them.
//!
//! Flow control is h2's: data is written only as the peer grants capacity, and received
//! capacity is released as the reader takes it.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::client::StreamLease;

/// The largest write sent as one DATA frame (above it, a write is split).
const MAX_WRITE: usize = 64 * 1024;

pub struct StreamIo {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// What the last DATA frame held beyond what the reader took.
    pending: Bytes,
    eof: bool,
    shut: bool,
    /// The outer stream's share of its connection, held while this stream is in use.
    _lease: StreamLease,
}

impl StreamIo {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream, lease: StreamLease) -> StreamIo {
        StreamIo { send, recv, pending: Bytes::new(), eof: false, shut: false, _lease: lease }
    }
}

fn h2_io(e: h2::Error) -> std::io::Error {
    std::io::Error::other(e)
}

impl AsyncRead for StreamIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(out.remaining());
                out.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.pending = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => self.eof = true,
            }
        }
    }
}

impl AsyncWrite for StreamIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let want = buf.len().min(MAX_WRITE);
        loop {
            self.send.reserve_capacity(want);
            let granted = match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(n)) => n,
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::BrokenPipe,
                        "the HTTP/2 stream to the gateway closed",
                    )))
                }
            };
            if granted == 0 {
                // Nothing granted yet: ask again (poll_capacity registers the wake-up).
                continue;
            }
            let n = granted.min(want);
            self.send.send_data(Bytes::copy_from_slice(&buf[..n]), false).map_err(h2_io)?;
            return Poll::Ready(Ok(n));
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // h2 sends as its connection task runs; there is nothing buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if !self.shut {
            self.shut = true;
            // Already reset or ended: nothing more to say.
            let _ = self.send.send_data(Bytes::new(), true);
        }
        Poll::Ready(Ok(()))
    }
}
