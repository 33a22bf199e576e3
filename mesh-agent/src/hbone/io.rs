//! Moving bytes between a TCP stream and an HTTP/2 stream, with h2's flow control: data is
//! sent only as the peer grants capacity, and received capacity is released as it is written
//! out, so a slow side slows the other down instead of growing buffers.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

/// Read sizes: a connection starts small and doubles while reads fill the buffer (a bulk flow),
/// up to the largest; request/response traffic stays small. Each read becomes one DATA frame,
/// and h2 gives rustls a frame's 9-byte header together with its payload, so each read stops a
/// header short of a power of two: a bulk frame is then exactly four full TLS records instead
/// of four and a 9-byte fifth (docs/decisions/0003-data-frames-sized-to-tls-records.md).
///
/// This holds while a read goes out as one frame: both ends advertise a 256 KiB
/// SETTINGS_MAX_FRAME_SIZE ([`super::MAX_FRAME_SIZE`]; at the 16 KiB default every frame would
/// carry a 9-byte tail again), and the frame is not split by a smaller grant of send capacity
/// or preceded in the same write by a control frame.
const MIN_CHUNK: usize = 8 * 1024;
const CHUNK: usize = 64 * 1024;
const FRAME_HEADER: usize = 9;
const _: () = assert!(MIN_CHUNK > FRAME_HEADER && CHUNK <= super::MAX_FRAME_SIZE as usize);

/// Relays until both directions are done, or until neither has moved a byte for `idle` (the
/// error is then [`is_idle`]). Resolves to (bytes TCP→h2, bytes h2→TCP, first error).
///
/// One hand-written future for both directions, not two async blocks joined: every idle
/// connection's task holds this state for the connection's life, and the compiler's layout of
/// the joined blocks (each direction's locals, their awaits, the timer) was about 1.2 KB where
/// this is about 250 bytes. The read buffer exists only while data is flowing: an idle
/// connection holds none (it waits for readability first).
pub fn relay(tcp: TcpStream, send: SendStream<Bytes>, recv: RecvStream, idle: Option<Duration>) -> Relay {
    Relay {
        tcp,
        send,
        recv: Some(recv),
        buf: BytesMut::new(),
        up_data: Bytes::new(),
        down_data: Bytes::new(),
        want: MIN_CHUNK as u32,
        up: Dir::Open,
        down: Dir::Open,
        moved: (0, 0),
        error: None,
        idle: idle.map(|t| Idle { after: t, last: Instant::now(), timer: Box::pin(tokio::time::sleep(t)) }),
    }
}

/// One direction's progress.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Open,
    /// Its end was seen; the end is still to be passed on (h2→TCP: the write side's shutdown).
    Ending,
    Done,
}

/// The idle timeout's state. The timer is boxed: a relay without one does not carry its size.
struct Idle {
    after: Duration,
    last: Instant,
    timer: Pin<Box<tokio::time::Sleep>>,
}

pub struct Relay {
    tcp: TcpStream,
    send: SendStream<Bytes>,
    /// Dropped once that direction has failed: h2 then discards what it buffered for it and
    /// gives the connection's window back, while the other direction goes on.
    recv: Option<RecvStream>,
    /// TCP→h2: the read buffer while reads find data, and what was read but not yet sent
    /// (waiting for the peer's flow-control capacity).
    buf: BytesMut,
    up_data: Bytes,
    /// h2→TCP: the DATA frame being written to the socket.
    down_data: Bytes,
    /// The next read's size, header included.
    want: u32,
    up: Dir,
    down: Dir,
    /// Bytes moved TCP→h2 and h2→TCP.
    moved: (u64, u64),
    /// The first error, the TCP→h2 direction's first if both failed in one poll.
    error: Option<std::io::Error>,
    idle: Option<Idle>,
}

impl Relay {
    fn moved(&mut self, up: bool, n: usize) {
        if up {
            self.moved.0 += n as u64;
        } else {
            self.moved.1 += n as u64;
        }
        if let Some(idle) = self.idle.as_mut() {
            idle.last = Instant::now();
        }
    }

    fn fail(&mut self, e: std::io::Error) {
        self.error.get_or_insert(e);
    }

    /// TCP→h2 as far as it can go now.
    fn poll_up(&mut self, cx: &mut Context<'_>) -> Result<(), std::io::Error> {
        loop {
            if !self.up_data.is_empty() {
                self.send.reserve_capacity(self.up_data.len());
                let cap = match self.send.poll_capacity(cx) {
                    Poll::Pending => return Ok(()),
                    Poll::Ready(Some(Ok(c))) => c,
                    Poll::Ready(Some(Err(e))) => return Err(h2_io(e)),
                    Poll::Ready(None) => {
                        return Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "HTTP/2 stream closed"))
                    }
                };
                let chunk = self.up_data.split_to(cap.min(self.up_data.len()));
                self.send.send_data(chunk, false).map_err(h2_io)?;
                continue;
            }
            if self.tcp.poll_read_ready(cx)?.is_pending() {
                // Waiting: give the buffer back (a short read leaves its unused room in it).
                self.buf = BytesMut::new();
                return Ok(());
            }
            let room = self.want as usize - FRAME_HEADER;
            self.buf.reserve(room);
            match self.tcp.try_read_buf(&mut (&mut self.buf).limit(room)) {
                Ok(0) => {
                    self.send.send_data(Bytes::new(), true).map_err(h2_io)?;
                    // Not kept while the other direction finishes.
                    self.buf = BytesMut::new();
                    self.up = Dir::Done;
                    return Ok(());
                }
                Ok(n) => {
                    self.moved(true, n);
                    if n == room {
                        self.want = (self.want * 2).min(CHUNK as u32);
                    }
                    self.up_data = self.buf.split().freeze();
                }
                // Nothing to read after all: give the buffer back before waiting.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => self.buf = BytesMut::new(),
                Err(e) => return Err(e),
            }
        }
    }

    /// h2→TCP as far as it can go now.
    fn poll_down(&mut self, cx: &mut Context<'_>) -> Result<(), std::io::Error> {
        loop {
            if self.down == Dir::Ending {
                if Pin::new(&mut self.tcp).poll_shutdown(cx)?.is_pending() {
                    return Ok(());
                }
                self.down = Dir::Done;
                return Ok(());
            }
            if !self.down_data.is_empty() {
                let n = match Pin::new(&mut self.tcp).poll_write(cx, &self.down_data)? {
                    Poll::Pending => return Ok(()),
                    Poll::Ready(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                    Poll::Ready(n) => n,
                };
                self.down_data.advance(n);
                self.moved(false, n);
                // Written out: the peer may send as much again.
                if let Some(recv) = self.recv.as_mut() {
                    let _ = recv.flow_control().release_capacity(n);
                }
                continue;
            }
            let Some(recv) = self.recv.as_mut() else { return Ok(()) };
            match recv.poll_data(cx) {
                Poll::Pending => return Ok(()),
                Poll::Ready(Some(Ok(data))) => self.down_data = data,
                Poll::Ready(Some(Err(e))) => return Err(h2_io(e)),
                Poll::Ready(None) => self.down = Dir::Ending,
            }
        }
    }

    fn result(&mut self) -> (u64, u64, Option<std::io::Error>) {
        (self.moved.0, self.moved.1, self.error.take())
    }
}

impl Future for Relay {
    type Output = (u64, u64, Option<std::io::Error>);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if this.up != Dir::Done {
            if let Err(e) = this.poll_up(cx) {
                this.fail(e);
                this.up = Dir::Done;
            }
        }
        if this.down != Dir::Done {
            if let Err(e) = this.poll_down(cx) {
                this.fail(e);
                this.recv = None;
                // As dropping the socket's write half would: the client sees the end.
                let _ = Pin::new(&mut this.tcp).poll_shutdown(cx);
                this.down = Dir::Done;
            }
        }
        if this.up == Dir::Done && this.down == Dir::Done {
            return Poll::Ready(this.result());
        }
        if let Some(idle) = this.idle.as_mut() {
            loop {
                let deadline = tokio::time::Instant::from_std(idle.last + idle.after);
                if idle.timer.deadline() != deadline {
                    idle.timer.as_mut().reset(deadline);
                }
                if idle.timer.as_mut().poll(cx).is_pending() {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    let (up, down, _) = this.result();
                    return Poll::Ready((up, down, Some(idle_error())));
                }
            }
        }
        Poll::Pending
    }
}

fn h2_io(e: h2::Error) -> std::io::Error {
    std::io::Error::other(e)
}

/// The error a relay closed for idleness ends with.
pub fn idle_error() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, IDLE)
}

const IDLE: &str = "no byte moved either way for the idle timeout";

/// Whether a relay ended because it was idle.
pub fn is_idle(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::TimedOut && e.to_string() == IDLE
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A TCP connection over loopback (the relay's side and the app's side), and an HTTP/2
    /// stream over an in-memory pipe (the relay's side and the peer agent's side).
    async fn setup() -> (TcpStream, TcpStream, SendStream<Bytes>, RecvStream, SendStream<Bytes>, RecvStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let (a, b) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(b).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            let send = respond.send_response(http::Response::new(()), false).unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            (send, req.into_body())
        });
        let (mut client, conn) = h2::client::handshake(a).await.unwrap();
        tokio::spawn(conn);
        let req = http::Request::builder().method("CONNECT").uri("10.0.0.1:80").body(()).unwrap();
        let (resp, peer_send) = client.send_request(req, false).unwrap();
        let (relay_send, relay_recv) = server.await.unwrap();
        let peer_recv = resp.await.unwrap().into_body();
        (tcp, app, relay_send, relay_recv, peer_send, peer_recv)
    }

    async fn read_stream(mut recv: RecvStream) -> Vec<u8> {
        let mut got = Vec::new();
        while let Some(d) = recv.data().await {
            let d = d.unwrap();
            got.extend_from_slice(&d);
            let _ = recv.flow_control().release_capacity(d.len());
        }
        got
    }

    async fn write_stream(mut send: SendStream<Bytes>, data: Vec<u8>) {
        let mut data = Bytes::from(data);
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            let cap = std::future::poll_fn(|cx| send.poll_capacity(cx)).await.unwrap().unwrap();
            send.send_data(data.split_to(cap.min(data.len())), false).unwrap();
        }
        send.send_data(Bytes::new(), true).unwrap();
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[tokio::test]
    async fn carries_both_ways_with_flow_control_and_passes_each_end_on() {
        let (tcp, mut app, relay_send, relay_recv, peer_send, peer_recv) = setup().await;
        let relay = tokio::spawn(relay(tcp, relay_send, relay_recv, None));
        // More than the stream window (64 KiB by default here) each way, so flow control
        // must hold each side back and release it.
        let up = pattern(3 << 20, 1);
        let down = pattern(2 << 20, 7);
        let (up2, down2) = (up.clone(), down.clone());
        let (mut app_r, mut app_w) = app.split();
        let app_side = async {
            app_w.write_all(&up2).await.unwrap();
            // The app's end reaches the peer as the stream's end.
            app_w.shutdown().await.unwrap();
            let mut got = Vec::new();
            app_r.read_to_end(&mut got).await.unwrap();
            got
        };
        let peer_side = async { tokio::join!(read_stream(peer_recv), write_stream(peer_send, down2)).0 };
        let (app_got, peer_got) = tokio::join!(app_side, peer_side);
        assert!(peer_got == up, "the peer got {} bytes, not the {} the app sent", peer_got.len(), up.len());
        assert!(app_got == down, "the app got {} bytes, not the {} the peer sent", app_got.len(), down.len());
        let (sent, received, err) = relay.await.unwrap();
        assert!(err.is_none(), "{err:?}");
        assert_eq!((sent, received), (up.len() as u64, down.len() as u64));
    }

    #[tokio::test]
    async fn one_side_ending_leaves_the_other_direction_open() {
        let (tcp, mut app, relay_send, relay_recv, mut peer_send, peer_recv) = setup().await;
        let relay = tokio::spawn(relay(tcp, relay_send, relay_recv, None));
        // The peer ends its side first; the app still sends, and its bytes still arrive.
        peer_send.send_data(Bytes::from_static(b"bye"), true).unwrap();
        let mut got = Vec::new();
        app.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"bye");
        app.write_all(b"still here").await.unwrap();
        app.shutdown().await.unwrap();
        assert_eq!(read_stream(peer_recv).await, b"still here");
        let (sent, received, err) = relay.await.unwrap();
        assert!(err.is_none(), "{err:?}");
        assert_eq!((sent, received), (10, 3));
    }

    #[tokio::test]
    async fn a_quiet_relay_ends_as_idle_and_counts_what_moved() {
        let (tcp, mut app, relay_send, relay_recv, _peer_send, mut peer_recv) = setup().await;
        let relay = tokio::spawn(relay(tcp, relay_send, relay_recv, Some(Duration::from_millis(200))));
        app.write_all(b"ping").await.unwrap();
        assert_eq!(&peer_recv.data().await.unwrap().unwrap()[..], b"ping");
        // Nothing more either way: the relay ends on its own, as idle.
        let (sent, received, err) = relay.await.unwrap();
        assert!(err.as_ref().is_some_and(is_idle), "{err:?}");
        assert_eq!((sent, received), (4, 0));
    }

    #[tokio::test]
    async fn traffic_keeps_a_relay_with_an_idle_timeout_open() {
        let (tcp, mut app, relay_send, relay_recv, _peer_send, mut peer_recv) = setup().await;
        let idle = Duration::from_millis(200);
        let relay = tokio::spawn(relay(tcp, relay_send, relay_recv, Some(idle)));
        // Bytes every 50 ms for six idle periods: the deadline must move with each.
        for _ in 0..24 {
            app.write_all(b"x").await.unwrap();
            assert_eq!(&peer_recv.data().await.unwrap().unwrap()[..], b"x");
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(!relay.is_finished(), "the relay ended although bytes kept moving");
        }
        let (sent, _, err) = relay.await.unwrap();
        assert!(err.as_ref().is_some_and(is_idle), "{err:?}");
        assert_eq!(sent, 24);
    }

    #[tokio::test]
    async fn the_apps_end_reaches_the_peer_while_the_peer_still_sends() {
        let (tcp, mut app, relay_send, relay_recv, mut peer_send, peer_recv) = setup().await;
        let relay = tokio::spawn(relay(tcp, relay_send, relay_recv, None));
        app.write_all(b"request").await.unwrap();
        app.shutdown().await.unwrap();
        // The peer sees the request and its end before it answers (the bound only keeps a
        // lost end from hanging the test run).
        let got = tokio::time::timeout(Duration::from_secs(60), read_stream(peer_recv)).await;
        assert_eq!(got.expect("the app's end did not reach the peer"), b"request");
        peer_send.send_data(Bytes::from_static(b"answer"), true).unwrap();
        let mut got = Vec::new();
        app.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"answer");
        let (sent, received, err) = relay.await.unwrap();
        assert!(err.is_none(), "{err:?}");
        assert_eq!((sent, received), (7, 6));
    }

    #[tokio::test]
    async fn a_reset_stream_ends_the_relay_with_an_error_and_the_app_sees_the_end() {
        let (tcp, mut app, relay_send, relay_recv, mut peer_send, _peer_recv) = setup().await;
        let relay = tokio::spawn(relay(tcp, relay_send, relay_recv, None));
        peer_send.send_reset(h2::Reason::CANCEL);
        let mut got = Vec::new();
        // The app's connection is ended (not left hanging) once the stream is gone.
        let _ = app.read_to_end(&mut got).await;
        assert!(got.is_empty());
        drop(app);
        let (_, _, err) = relay.await.unwrap();
        assert!(err.is_some(), "a reset stream must end the relay with an error");
    }
}
