//! The workload the integration tests run inside pods: an echo server and clients that check
//! every byte and report, as one JSON line, what the kernel told them (peer address, errno).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use serde_json::json;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get =
        |name: &str| -> Option<String> { args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned() };
    let num = |name: &str, default: u64| get(name).map(|v| v.parse::<u64>().expect(name)).unwrap_or(default);
    let to = || -> SocketAddr { get("--to").expect("--to IP:PORT").parse().expect("--to IP:PORT") };
    let timeout = Duration::from_millis(num("--timeout-ms", 3000));
    let mptcp = args.iter().any(|a| a == "--mptcp");
    match args.first().map(String::as_str) {
        Some("serve") => serve(get("--listen").expect("--listen IP:PORT").parse().expect("--listen")),
        Some("echo") => {
            let pace = (num("--chunk", 64 * 1024) as usize, Duration::from_millis(num("--pace-ms", 0)));
            // Half the bytes, then a wait until this file exists, then the rest: a transfer
            // that provably spans an event the test brings about.
            HALFWAY_FILE.with(|f| *f.borrow_mut() = get("--halfway-until-file").map(std::path::PathBuf::from));
            // A socket mark (SO_MARK) on the connecting socket, as any process holding
            // CAP_NET_RAW may set.
            MARK.with(|m| m.set(get("--mark").map(|v| v.parse().expect("--mark"))));
            let r = echo(to(), num("--bytes", 1 << 20), num("--seed", 1), get("--marker"), (timeout, mptcp), pace);
            let ok = r["ok"] == true;
            println!("{r}");
            std::process::exit(if ok { 0 } else { 1 });
        }
        Some("echoes") => {
            // `--count` echoes one after another: how many succeeded, and the first failure.
            let (mut ok, mut failed, mut first_error) = (0u64, 0u64, None);
            for i in 0..num("--count", 100) {
                let r = echo(
                    to(),
                    num("--bytes", 1000),
                    i + 1,
                    get("--marker"),
                    (timeout, mptcp),
                    (64 * 1024, Duration::ZERO),
                );
                if r["ok"] == true {
                    ok += 1;
                } else {
                    failed += 1;
                    first_error.get_or_insert(r);
                }
            }
            println!("{}", json!({"ok": failed == 0, "succeeded": ok, "failed": failed, "first_error": first_error}));
        }
        Some("probe") => {
            let until = get("--until-file").map(std::path::PathBuf::from);
            probe(to(), num("--interval-ms", 5), num("--duration-ms", 3000), until, timeout)
        }
        Some("linger") => linger(to(), num("--seconds", 60), timeout),
        Some("hold") => hold(to(), num("--count", 3), num("--hold-ms", 2000), timeout),
        Some("churn") => churn(to(), num("--count", 1000), (timeout, mptcp)),
        Some("reuse") => {
            let addr = |name: &str| -> SocketAddr { get(name).expect(name).parse().expect(name) };
            let ready = get("--ready-file").expect("--ready-file PATH");
            reuse(addr("--first"), addr("--second"), num("--port", 40000) as u16, &ready, timeout)
        }
        _ => {
            eprintln!("usage: sm-testapp serve --listen IP:PORT | echo --to IP:PORT [--bytes N] [--marker S] [--mptcp] [--chunk N --pace-ms N] [--halfway-until-file PATH] | echoes --to IP:PORT --count N [--bytes N] [--marker S] | probe --to IP:PORT [--duration-ms N] [--until-file PATH] | hold --to IP:PORT --count N | churn --to IP:PORT --count N [--mptcp] | reuse --first IP:PORT --second IP:PORT --port P --ready-file PATH");
            std::process::exit(2);
        }
    }
}

/// Echo server: logs one JSON line per accepted connection (peer and local address) so that a
/// test can tell who reached the app and how.
fn serve(addr: SocketAddr) {
    // A deep listen queue, as a server built for load has: the abuse tests drive a thousand
    // connections at the app at once, and with std's 128 the kernel falls back to SYN cookies
    // and resets connections the queue had no room for, which is the app's limit, not the
    // mesh's.
    let l = (|| -> std::io::Result<TcpListener> {
        let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        s.bind(&addr.into())?;
        s.listen(4096)?;
        Ok(s.into())
    })()
    .expect("bind");
    println!("{}", json!({"event": "listening", "addr": addr.to_string()}));
    loop {
        // The peer as accept() reports it: a connection reset at once has no peer_addr() left.
        let Ok((mut s, peer)) = l.accept() else { continue };
        // An IPv4 client of a dual-stack listener is shown as IPv4 (not ::ffff:a.b.c.d).
        let show = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port()).to_string();
        let peer = show(peer);
        let local = s.local_addr().map(show).unwrap_or_default();
        println!("{}", json!({"event": "accept", "peer": peer, "local": local}));
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = s.shutdown(Shutdown::Write);
        });
    }
}

thread_local! {
    static HALFWAY_FILE: std::cell::RefCell<Option<std::path::PathBuf>> = const { std::cell::RefCell::new(None) };
    static MARK: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
}

struct Gen(u64);
impl Gen {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let b = self.0.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
    }
}

fn fnv(h: &mut u64, data: &[u8]) {
    for b in data {
        *h ^= *b as u64;
        *h = h.wrapping_mul(0x100000001b3);
    }
}

/// IPPROTO_MPTCP: a multipath TCP socket (the kernel falls back to TCP when the peer does not
/// speak it).
const IPPROTO_MPTCP: i32 = 262;

/// Connects a TCP socket, or an MPTCP one with `mptcp`, marked if `--mark` was given.
fn connect_socket(to: SocketAddr, timeout: Duration, mptcp: bool) -> std::io::Result<TcpStream> {
    let mark = MARK.with(|m| m.get());
    if !mptcp && mark.is_none() {
        return TcpStream::connect_timeout(&to, timeout);
    }
    let proto = if mptcp { socket2::Protocol::from(IPPROTO_MPTCP) } else { socket2::Protocol::TCP };
    let s = socket2::Socket::new(socket2::Domain::for_address(to), socket2::Type::STREAM, Some(proto))?;
    if let Some(m) = mark {
        s.set_mark(m)?;
    }
    s.connect_timeout(&to.into(), timeout)?;
    Ok(s.into())
}

fn connect(to: SocketAddr, (timeout, mptcp): (Duration, bool)) -> Result<TcpStream, serde_json::Value> {
    connect_socket(to, timeout, mptcp)
        .map_err(|e| json!({"ok": false, "stage": "connect", "error": e.to_string(), "errno": e.raw_os_error()}))
}

/// Sends `bytes` pseudo-random bytes (prefixed by the marker, if any), reads the echo back and
/// compares checksums of both directions.
/// `pace`: (chunk size, pause after each chunk), for a slow, long-lived connection.
fn echo(
    to: SocketAddr,
    bytes: u64,
    seed: u64,
    marker: Option<String>,
    timeout: (Duration, bool),
    pace: (usize, Duration),
) -> serde_json::Value {
    let started = Instant::now();
    let s = match connect(to, timeout) {
        Ok(s) => s,
        Err(e) => return e,
    };
    let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let wire_peer = wire_peer(&s).unwrap_or_default();
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let mut w = s.try_clone().expect("clone");
    let mut halfway = HALFWAY_FILE.with(|f| f.borrow().clone());
    // While the writer waits for the halfway file, nothing is owed to the reader: its timeout
    // then says nothing about the connection (a slow machine may hold the file back longer).
    // (Waiting now, when the wait ended.)
    let waiting = std::sync::Arc::new(std::sync::Mutex::new((false, None::<Instant>)));
    let writer_waiting = waiting.clone();
    let writer = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut g = Gen(seed.max(1));
        let mut h = 0xcbf29ce484222325u64;
        let mut sent = 0u64;
        if let Some(m) = marker {
            w.write_all(m.as_bytes())?;
            fnv(&mut h, m.as_bytes());
            sent += m.len() as u64;
        }
        let mut buf = vec![0u8; pace.0.max(1)];
        while sent < bytes {
            if sent >= bytes / 2 {
                if let Some(f) = halfway.take() {
                    writer_waiting.lock().unwrap().0 = true;
                    while !f.exists() {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    *writer_waiting.lock().unwrap() = (false, Some(Instant::now()));
                }
            }
            let n = ((bytes - sent) as usize).min(buf.len());
            g.fill(&mut buf[..n]);
            w.write_all(&buf[..n])?;
            fnv(&mut h, &buf[..n]);
            sent += n as u64;
            if !pace.1.is_zero() {
                std::thread::sleep(pace.1);
            }
        }
        w.shutdown(Shutdown::Write)?;
        Ok(h ^ sent)
    });
    let mut r = s;
    let mut h = 0xcbf29ce484222325u64;
    let mut received = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let read_err = loop {
        match r.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => {
                fnv(&mut h, &buf[..n]);
                received += n as u64;
            }
            // A read that began during the wait gets a whole timeout after it.
            Err(e)
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) && {
                    let (now, ended) = *waiting.lock().unwrap();
                    now || ended.is_some_and(|t| t.elapsed() < Duration::from_secs(30))
                } => {}
            Err(e) => break Some(e),
        }
    };
    let sent_hash = writer.join().expect("writer");
    let (sent_ok, sent_hash) = match sent_hash {
        Ok(h) => (true, h),
        Err(_) => (false, 0),
    };
    let matches = sent_ok && read_err.is_none() && (h ^ received) == sent_hash;
    json!({
        "ok": matches,
        "stage": "transfer",
        "peer": peer,
        "local": local,
        "wire_peer": wire_peer,
        "received": received,
        "checksum_match": matches,
        "error": read_err.map(|e| e.to_string()),
        "ms": started.elapsed().as_millis() as u64,
    })
}

/// Connects repeatedly for `duration_ms`; each probe sends a line and waits for its echo. Prints
/// one JSON line per probe and a summary.
/// Probes until `duration_ms` has passed or, sooner, `until` exists (so that a test can end
/// it at an event rather than a time).
fn probe(to: SocketAddr, interval_ms: u64, duration_ms: u64, until: Option<std::path::PathBuf>, timeout: Duration) {
    let end = Instant::now() + Duration::from_millis(duration_ms);
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut peers = std::collections::BTreeMap::<String, u64>::new();
    let mut errors = Vec::<String>::new();
    let mut max_connect_us = 0u128;
    let mut max_rtt_us = 0u128;
    let mut n = 0u64;
    while Instant::now() < end && !until.as_ref().is_some_and(|p| p.exists()) {
        n += 1;
        let line = format!("probe {n}\n");
        let result = (|| -> Result<String, String> {
            let t0 = Instant::now();
            let s = TcpStream::connect_timeout(&to, timeout).map_err(|e| format!("connect: {e}"))?;
            max_connect_us = max_connect_us.max(t0.elapsed().as_micros());
            let _ = s.set_read_timeout(Some(timeout));
            (&s).write_all(line.as_bytes()).map_err(|e| e.to_string())?;
            let mut back = String::new();
            BufReader::new(&s).read_line(&mut back).map_err(|e| e.to_string())?;
            if back != line {
                return Err(format!("echo mismatch: {back:?}"));
            }
            // From connect() to the answer: a listener nobody accepts on completes the
            // handshake (the backlog) but answers nothing, so this is the wait a client sees.
            max_rtt_us = max_rtt_us.max(t0.elapsed().as_micros());
            // Where the connection really went (getpeername shows a meshed app its destination).
            let peer = wire_peer(&s).ok_or("no socket table entry")?;
            Ok(peer)
        })();
        match result {
            Ok(peer) => {
                ok += 1;
                *peers.entry(peer).or_default() += 1;
            }
            Err(e) => {
                failed += 1;
                if errors.len() < 10 {
                    errors.push(format!("probe {n}: {e}"));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(interval_ms));
    }
    println!(
        "{}",
        json!({"ok": ok, "failed": failed, "peers": peers, "errors": errors, "max_connect_us": max_connect_us as u64, "max_rtt_us": max_rtt_us as u64})
    );
}

/// Opens `count` connections one after another and keeps them open for `hold_ms`.
fn hold(to: SocketAddr, count: u64, hold_ms: u64, timeout: Duration) {
    let mut held = Vec::new();
    let mut results = Vec::new();
    for _ in 0..count {
        match TcpStream::connect_timeout(&to, timeout) {
            Ok(mut s) => {
                let _ = s.set_read_timeout(Some(timeout));
                let mut b = [0u8; 1];
                let r = s
                    .write_all(b"x")
                    .map_err(|e| ("write", e))
                    .and_then(|()| s.read_exact(&mut b).map_err(|e| ("read", e)));
                results.push(match r {
                    Ok(()) => json!({"ok": true}),
                    Err((stage, e)) => {
                        json!({"ok": false, "stage": stage, "error": e.to_string(), "errno": e.raw_os_error()})
                    }
                });
                held.push(s);
            }
            Err(e) => results.push(json!({"ok": false, "error": e.to_string(), "errno": e.raw_os_error()})),
        }
    }
    println!("{}", json!({"results": results}));
    std::thread::sleep(Duration::from_millis(hold_ms));
}

/// One connection, one byte echoed, then waits up to `seconds` for the other end to close it:
/// reports whether it did (end of stream or reset) — what a client sees when the mesh cuts a
/// connection it was carrying.
fn linger(to: SocketAddr, seconds: u64, timeout: Duration) {
    let mut held = Instant::now();
    let r = (|| -> std::io::Result<bool> {
        let mut s = TcpStream::connect_timeout(&to, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(b"x")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        held = Instant::now();
        s.set_read_timeout(Some(Duration::from_secs(seconds)))?;
        Ok(match s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => false,
            Err(_) => true,
        })
    })();
    match r {
        Ok(closed) => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            let held_ms = held.elapsed().as_millis() as u64;
            println!(
                "{}",
                json!({"ok": true, "closed_by_peer": closed, "held_ms": held_ms, "closed_unix_ms": now.as_millis() as u64})
            )
        }
        Err(e) => println!("{}", json!({"ok": false, "error": e.to_string(), "errno": e.raw_os_error()})),
    }
}

/// Opens and closes `count` connections one after another (nothing sent): what a client that
/// churns connections leaves behind.
fn churn(to: SocketAddr, count: u64, (timeout, mptcp): (Duration, bool)) {
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut first_error = None;
    for _ in 0..count {
        match connect_socket(to, timeout, mptcp) {
            Ok(s) => {
                ok += 1;
                drop(s);
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    println!("{}", json!({"ok": ok, "failed": failed, "mptcp": mptcp, "first_error": first_error}));
}

/// Two connections from the same local port, one after the other: the first to `first`,
/// written to and reset; then the second to `second`, which writes a line and waits for its
/// echo. `ready` is created once the second has written (the test then lets the agent run).
fn reuse(first: SocketAddr, second: SocketAddr, port: u16, ready: &str, timeout: Duration) {
    let bound = |to: SocketAddr| -> std::io::Result<socket2::Socket> {
        let s = socket2::Socket::new(socket2::Domain::for_address(to), socket2::Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        let any: SocketAddr = if to.is_ipv4() { ([0, 0, 0, 0], port).into() } else { ([0u16; 8], port).into() };
        s.bind(&any.into())?;
        s.connect_timeout(&to.into(), timeout)?;
        Ok(s)
    };
    let first_result = (|| -> std::io::Result<()> {
        let s = bound(first)?;
        (&s).write_all(b"first\n")?;
        // A reset, not a FIN: the connection is gone at once and its port is free again.
        s.set_linger(Some(Duration::ZERO))?;
        Ok(())
    })();
    let second_result = (|| -> std::io::Result<String> {
        let s: TcpStream = bound(second)?.into();
        (&s).write_all(b"second\n")?;
        std::fs::write(ready, b"")?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut back = String::new();
        BufReader::new(&s).read_line(&mut back)?;
        Ok(back)
    })();
    println!(
        "{}",
        json!({
            "first": first_result.map(|_| json!({"ok": true})).unwrap_or_else(|e| json!({"ok": false, "error": e.to_string()})),
            "second": match second_result {
                Ok(back) => json!({"ok": back == "second\n", "echo": back}),
                Err(e) => json!({"ok": false, "error": e.to_string()}),
            },
        })
    );
}

/// The far end of `s`'s TCP connection as this netns's socket table has it (/proc/self/net/tcp
/// and tcp6, found by the socket's inode): where the bytes really go, whatever getpeername()
/// says. Addresses there are hex of the kernel's words in host order; ports are plain hex.
fn wire_peer(s: &TcpStream) -> Option<String> {
    use std::os::fd::AsRawFd;
    let link = std::fs::read_link(format!("/proc/self/fd/{}", s.as_raw_fd())).ok()?;
    let inode = link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned();
    fn addr(hex: &str) -> Option<SocketAddr> {
        let (ip, port) = hex.split_once(':')?;
        let port = u16::from_str_radix(port, 16).ok()?;
        let mut bytes = Vec::new();
        for i in (0..ip.len()).step_by(8) {
            bytes.extend(u32::from_str_radix(ip.get(i..i + 8)?, 16).ok()?.to_ne_bytes());
        }
        let ip: std::net::IpAddr = match bytes.len() {
            4 => <[u8; 4]>::try_from(bytes).ok()?.into(),
            16 => <[u8; 16]>::try_from(bytes).ok()?.into(),
            _ => return None,
        };
        Some(SocketAddr::new(ip, port))
    }
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let text = std::fs::read_to_string(table).ok()?;
        for line in text.lines().skip(1) {
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.get(9) == Some(&inode.as_str()) {
                let r = addr(cols.get(2)?)?;
                return Some(SocketAddr::new(r.ip().to_canonical(), r.port()).to_string());
            }
        }
    }
    None
}
