//! The test tenant: a tiny HTTP server for the gateway port, run in a `FROM scratch` image.
//!
//! `GET /healthz` → `ok`; `GET /alloc?mb=N` allocates and touches N MiB (to reach the memory
//! cap); `GET /connect?addr=IP:PORT` opens a TCP connection and says whether it worked (for
//! egress tests, against servers the test itself started); `GET /hold?addr=IP:PORT` opens one
//! and keeps it idle, `GET /check?id=N` then sends an HTTP request over held connection N and
//! says whether the answer came (an established connection surviving a rule change);
//! `GET /fill?name=F[&mb=N]` writes 1 MiB blocks to file F in its volume (N of them, or until a
//! write fails) and says how many it wrote and why it stopped; `GET /write?name=F&text=T`
//! writes T to file F and syncs it; `GET /read?name=F` answers with the file's content (F a
//! path inside the volume); `GET /spin?ms=N&threads=T` keeps T threads busy for N ms and
//! answers `cpu_ms C wall_ms W`, the CPU time the process used meanwhile (for CPU limits).
//! Each
//! connection is served on its own thread, so a held one blocks nobody. Port from `PORT`
//! (default 18789). It ends at once on SIGTERM, unless `TEST_TENANT_SIGTERM=default` leaves
//! the signal's disposition alone, as a Node.js gateway that does not handle it does.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn query<'a>(path: &'a str, key: &str) -> Option<&'a str> {
    path.split_once('?')?
        .1
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// The CPU time this process used so far (user and system, from /proc/self/stat), in ms.
fn cpu_ms() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command (which may hold spaces) start with the state; after it,
    // utime and stime are the 11th and 12th, in clock ticks of 10 ms.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let fields: Vec<u64> = after
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    (fields.get(10).unwrap_or(&0) + fields.get(11).unwrap_or(&0)) * 10
}

fn respond(mut stream: TcpStream, code: u16, body: &str) {
    let _ = write!(
        stream,
        "HTTP/1.1 {code} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// As PID 1 in its container the process ignores SIGTERM unless it handles it; a real gateway
/// does, so `docker stop` ends it at once instead of after the grace period.
extern "C" fn on_sigterm(_: nix::libc::c_int) {
    // SAFETY: _exit is async-signal-safe.
    #[allow(unsafe_code)]
    unsafe {
        nix::libc::_exit(0)
    }
}

fn main() {
    if std::env::var("TEST_TENANT_SIGTERM").as_deref() != Ok("default") {
        // SAFETY: the handler only calls _exit.
        #[allow(unsafe_code)]
        let installed = unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGTERM,
                nix::sys::signal::SigHandler::Handler(on_sigterm),
            )
        };
        installed.expect("SIGTERM handler");
    }
    let port = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(18789u16);
    let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind");
    let hoard: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    for stream in listener.incoming().flatten() {
        let (hoard, held) = (hoard.clone(), held.clone());
        std::thread::spawn(move || serve(stream, &hoard, &held));
    }
}

fn check(stream: &mut TcpStream) -> String {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
    if let Err(e) = stream.write_all(b"GET /healthz HTTP/1.0\r\n\r\n") {
        return format!("broken: {e}\n");
    }
    let mut answer = String::new();
    match stream.read_to_string(&mut answer) {
        Ok(_) if answer.contains("ok") => "alive\n".into(),
        Ok(_) => format!("broken: answered {answer:?}\n"),
        Err(e) => format!("broken: {e}\n"),
    }
}

fn serve(stream: TcpStream, hoard: &Mutex<Vec<Vec<u8>>>, held: &Mutex<Vec<TcpStream>>) {
    let mut line = String::new();
    if BufReader::new(&stream).read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let addr = || query(&path, "addr").and_then(|a| a.parse::<SocketAddr>().ok());
    if path.starts_with("/healthz") {
        respond(stream, 200, "ok\n");
    } else if path.starts_with("/spin") {
        let ms: u64 = query(&path, "ms")
            .and_then(|m| m.parse().ok())
            .unwrap_or(1000);
        let threads: usize = query(&path, "threads")
            .and_then(|t| t.parse().ok())
            .unwrap_or(1);
        let (cpu_before, started) = (cpu_ms(), std::time::Instant::now());
        let spinners: Vec<_> = (0..threads.min(64))
            .map(|_| {
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while started.elapsed() < Duration::from_millis(ms) {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                    }
                })
            })
            .collect();
        for spinner in spinners {
            let _ = spinner.join();
        }
        let wall = started.elapsed().as_millis();
        respond(
            stream,
            200,
            &format!("cpu_ms {} wall_ms {wall}\n", cpu_ms() - cpu_before),
        );
    } else if path.starts_with("/alloc") {
        let mb: usize = query(&path, "mb").and_then(|m| m.parse().ok()).unwrap_or(0);
        let mut hoard = hoard.lock().unwrap_or_else(|p| p.into_inner());
        for _ in 0..mb {
            // Touch every page so the memory is really committed.
            hoard.push(vec![1u8; 1 << 20]);
        }
        respond(stream, 200, &format!("allocated {mb}\n"));
    } else if path.starts_with("/connect") {
        match addr().map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2))) {
            Some(Ok(_)) => respond(stream, 200, "connected\n"),
            Some(Err(e)) => respond(stream, 200, &format!("refused: {e}\n")),
            None => respond(stream, 400, "addr=IP:PORT\n"),
        }
    } else if path.starts_with("/hold") {
        match addr().map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2))) {
            Some(Ok(conn)) => {
                let mut held = held.lock().unwrap_or_else(|p| p.into_inner());
                held.push(conn);
                respond(stream, 200, &format!("held {}\n", held.len() - 1));
            }
            Some(Err(e)) => respond(stream, 200, &format!("refused: {e}\n")),
            None => respond(stream, 400, "addr=IP:PORT\n"),
        }
    } else if path.starts_with("/check") {
        let id: Option<usize> = query(&path, "id").and_then(|i| i.parse().ok());
        let conn = id.and_then(|i| {
            let held = held.lock().unwrap_or_else(|p| p.into_inner());
            held.get(i).and_then(|c| c.try_clone().ok())
        });
        match conn {
            Some(mut c) => {
                let verdict = check(&mut c);
                respond(stream, 200, &verdict)
            }
            None => respond(stream, 404, "no such held connection\n"),
        }
    } else if path.starts_with("/fill") || path.starts_with("/read") || path.starts_with("/write") {
        let inside = |n: &&str| !n.starts_with('/') && n.split('/').all(|part| part != "..");
        let Some(file) = query(&path, "name").filter(inside) else {
            return respond(stream, 400, "name=FILE (a path inside the volume)\n");
        };
        let file = std::path::Path::new(VOLUME).join(file);
        if path.starts_with("/read") {
            return match std::fs::read_to_string(&file) {
                Ok(text) => respond(stream, 200, &text),
                Err(e) => respond(stream, 404, &format!("{e}\n")),
            };
        }
        if path.starts_with("/write") {
            let text = query(&path, "text").unwrap_or_default();
            let written = std::fs::File::create(&file)
                .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|()| f.sync_all()));
            return match written {
                Ok(()) => respond(stream, 200, &format!("wrote {} bytes\n", text.len())),
                Err(e) => respond(stream, 500, &format!("{e}\n")),
            };
        }
        let most: Option<u64> = query(&path, "mb").and_then(|m| m.parse().ok());
        let verdict = fill(&file, most);
        respond(stream, 200, &verdict)
    } else {
        respond(stream, 404, "not found\n");
    }
}

/// Where berth mounts a tenant's volume unless its spec says otherwise.
const VOLUME: &str = "/home/node/.openclaw";

/// Writes 1 MiB blocks to `file` (`most` of them, or until a write fails), each written out.
fn fill(file: &std::path::Path, most: Option<u64>) -> String {
    let mut f = match std::fs::File::create(file) {
        Ok(f) => f,
        Err(e) => return format!("wrote 0 MiB: {e}\n"),
    };
    let block = vec![7u8; 1 << 20];
    let mut written = 0u64;
    while most.is_none_or(|m| written < m) {
        if let Err(e) = f.write_all(&block).and_then(|()| f.sync_data()) {
            return format!("wrote {written} MiB: {e}\n");
        }
        written += 1;
    }
    format!("wrote {written} MiB\n")
}
