//! The benchmark's load generator, run inside pods: an echo server that holds many connections
//! cheaply, request/response latency (closed loop or at a fixed rate), new connections per
//! second, and many idle connections held open. Each client prints one JSON line of results.
//!
//! Latency at a fixed rate is measured from when each request was due, not when it was sent, so
//! a stall shows up in the percentiles instead of being hidden (no coordinated omission).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn usage() -> ! {
    eprintln!(
        "usage: sm-load serve --listen IP:PORT\n\
         \x20      sm-load rr --to IP:PORT [--size 1024] [--seconds 3] [--rate N (per second and connection; 0 = closed loop)] [--parallel 1]\n\
         \x20      sm-load conns --to IP:PORT [--seconds 3] [--parallel 8] [--size 1024]\n\
         \x20      sm-load hold --to IP:PORT --count N [--parallel 64]   (holds until stdin closes)"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let num = |name: &str, default: u64| -> u64 {
        match get(name) {
            None => default,
            Some(v) => v.parse().unwrap_or_else(|_| {
                eprintln!("{name}: {v:?} is not a number");
                usage()
            }),
        }
    };
    let addr = |name: &str| -> SocketAddr {
        get(name).and_then(|v| v.parse().ok()).unwrap_or_else(|| {
            eprintln!("{name} IP:PORT is required");
            usage()
        })
    };
    raise_nofile();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let out = match args.first().map(String::as_str) {
        Some("serve") => rt.block_on(serve(addr("--listen"))),
        Some("rr") => {
            rr(addr("--to"), num("--size", 1024) as usize, num("--seconds", 3), num("--rate", 0), num("--parallel", 1))
        }
        Some("conns") => {
            rt.block_on(conns(addr("--to"), num("--seconds", 3), num("--parallel", 8), num("--size", 1024) as usize))
        }
        Some("hold") => rt.block_on(hold(addr("--to"), num("--count", 100), num("--parallel", 64))),
        _ => usage(),
    };
    println!("{out}");
}

/// Many connections need many descriptors: the soft limit goes up to the hard one.
fn raise_nofile() {
    unsafe {
        let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

async fn serve(addr: SocketAddr) -> serde_json::Value {
    let l = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => return json!({"ok": false, "error": format!("bind {addr}: {e}")}),
    };
    println!("{}", json!({"event": "listening", "addr": addr.to_string()}));
    loop {
        let Ok((mut s, _)) = l.accept().await else { continue };
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// Sends `size` bytes and reads `size` bytes back.
async fn exchange(s: &mut TcpStream, req: &[u8], buf: &mut [u8]) -> std::io::Result<()> {
    s.write_all(req).await?;
    s.read_exact(buf).await?;
    Ok(())
}

fn percentiles(mut us: Vec<f64>) -> serde_json::Value {
    if us.is_empty() {
        return json!(null);
    }
    us.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| us[((us.len() as f64 * q).ceil() as usize).clamp(1, us.len()) - 1];
    json!({"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "p999": at(0.999), "max": us[us.len() - 1], "n": us.len()})
}

/// Request/response on `parallel` connections at once, a thread each: requests and the
/// latency of all of them together.
/// The rate is the sum of each connection's own, each over its measured window (after its
/// connect and warm-up).
fn rr(to: SocketAddr, size: usize, seconds: u64, rate: u64, parallel: u64) -> serde_json::Value {
    let threads: Vec<_> =
        (0..parallel.max(1)).map(|_| std::thread::spawn(move || rr_conn(to, size, seconds, rate))).collect();
    let (mut n, mut per_second, mut lat) = (0u64, 0.0, Vec::new());
    for t in threads {
        match t.join() {
            Ok(Ok((k, secs, l))) => {
                n += k;
                per_second += k as f64 / secs;
                lat.extend(l);
            }
            Ok(Err(e)) => return json!({"ok": false, "error": e}),
            Err(_) => return json!({"ok": false, "error": "a client thread panicked"}),
        }
    }
    json!({"ok": true, "requests": n, "per_second": per_second, "latency_us": percentiles(lat)})
}

/// Request/response on one connection: how many, over how many seconds (after the warm-up),
/// and each one's latency (µs). Blocking I/O
/// and `nanosleep` with the timer slack at its minimum: tokio's timer has millisecond
/// resolution, too coarse for a fixed rate measured in microseconds, and spinning would steal
/// a core from what is being measured.
fn rr_conn(to: SocketAddr, size: usize, seconds: u64, rate: u64) -> Result<(u64, f64, Vec<f64>), String> {
    use std::io::{Read, Write};
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64) };
    let mut s = std::net::TcpStream::connect(to).map_err(|e| format!("connect {to}: {e}"))?;
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let req = vec![0x5au8; size];
    let mut buf = vec![0u8; size];
    let mut exchange = |s: &mut std::net::TcpStream| -> std::io::Result<()> {
        s.write_all(&req)?;
        s.read_exact(&mut buf)
    };
    // Warm up: the first exchange includes the mesh's tunnel setup.
    for _ in 0..50 {
        exchange(&mut s).map_err(|e| format!("warm-up exchange: {e}"))?;
    }
    let mut lat = Vec::with_capacity(1 << 16);
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let mut n = 0u64;
    while Instant::now() < end {
        let due = if let Some(gap) = 1_000_000_000u64.checked_div(rate) {
            let due = start + Duration::from_nanos(n * gap);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            due
        } else {
            Instant::now()
        };
        exchange(&mut s).map_err(|e| format!("exchange {n}: {e}"))?;
        lat.push(due.elapsed().as_nanos() as f64 / 1000.0);
        n += 1;
    }
    Ok((n, start.elapsed().as_secs_f64(), lat))
}

async fn conns(to: SocketAddr, seconds: u64, parallel: u64, size: usize) -> serde_json::Value {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let end = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..parallel {
        let (done, failed, first_error) = (done.clone(), failed.clone(), first_error.clone());
        tasks.push(tokio::spawn(async move {
            let req = vec![0x5au8; size];
            let mut buf = vec![0u8; size];
            // Each completed connection's set-up: from connect() to its answer's last byte.
            let mut setup_us = Vec::new();
            while Instant::now() < end {
                let began = Instant::now();
                let r = async {
                    let mut s = TcpStream::connect(to).await?;
                    let _ = s.set_nodelay(true);
                    exchange(&mut s, &req, &mut buf).await?;
                    setup_us.push(began.elapsed().as_secs_f64() * 1e6);
                    // Close from the client side first, so TIME_WAIT stays here.
                    s.shutdown().await
                };
                match tokio::time::timeout(Duration::from_secs(5), r).await {
                    Ok(Ok(())) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        first_error.lock().unwrap().get_or_insert(e.to_string());
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        first_error.lock().unwrap().get_or_insert("timed out".into());
                    }
                }
            }
            setup_us
        }));
    }
    let mut setup_us = Vec::new();
    for t in tasks {
        setup_us.extend(t.await.unwrap_or_default());
    }
    let secs = start.elapsed().as_secs_f64();
    let (d, f) = (done.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let first_error = first_error.lock().unwrap().clone();
    json!({"ok": f == 0, "completed": d, "failed": f, "per_second": d as f64 / secs, "error": first_error, "setup_us": percentiles(setup_us)})
}

/// Opens `count` connections, exchanges one byte on each (so every one is proxied end to end),
/// reports, and then holds them idle until stdin closes.
async fn hold(to: SocketAddr, count: u64, parallel: u64) -> serde_json::Value {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..parallel.max(1) {
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut held = Vec::new();
            let mut err = None;
            while next.fetch_add(1, Ordering::Relaxed) < count {
                let r = async {
                    let mut s = TcpStream::connect(to).await?;
                    let mut b = [0u8; 1];
                    exchange(&mut s, b"x", &mut b).await?;
                    Ok::<_, std::io::Error>(s)
                };
                match tokio::time::timeout(Duration::from_secs(10), r).await {
                    Ok(Ok(s)) => held.push(s),
                    Ok(Err(e)) => err = Some(e.to_string()),
                    Err(_) => err = Some("timed out".into()),
                }
            }
            (held, err)
        }));
    }
    let mut held = Vec::new();
    let mut errors = Vec::new();
    for t in tasks {
        if let Ok((h, e)) = t.await {
            held.extend(h);
            errors.extend(e);
        }
    }
    println!("{}", json!({"event": "holding", "open": held.len(), "wanted": count, "error": errors.first()}));
    // Hold until told (stdin closes), then report.
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    json!({"ok": held.len() as u64 == count, "open": held.len()})
}
