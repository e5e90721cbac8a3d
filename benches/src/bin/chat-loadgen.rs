//! Load generator for servers speaking the chat HTTP contract (api.md).
//!
//! Each virtual user opens one keep-alive HTTP/1.1 connection, creates a chat
//! (`POST /api/chat`, dev-header auth `x-user-id`), then repeatedly posts a
//! message and reads the UI message stream to `data: [DONE]`. Reports
//! streams/s, time to first text-delta (TTFT) and full-stream latency
//! percentiles, errors by kind and, when it started the server itself
//! (`-- <command>`), the server's peak RSS and CPU time per stream from /proc.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

/// Load generator for the chat HTTP contract.
#[derive(Debug, Parser)]
#[command(name = "chat-loadgen", about)]
struct Args {
    /// Base URL of a running server (http://host:port). Not needed with `-- <command>`.
    #[arg(long)]
    url: Option<String>,
    /// Concurrent virtual users (one connection each).
    #[arg(short, long, default_value_t = 50)]
    concurrency: usize,
    /// Measured window, seconds.
    #[arg(short, long, default_value_t = 10.0)]
    duration: f64,
    /// Load before the measured window, seconds (not counted).
    #[arg(short, long, default_value_t = 2.0)]
    warmup: f64,
    /// Worker threads of the generator.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Connections (and chat creations) in progress at once during setup.
    #[arg(long, default_value_t = 128)]
    connect_parallel: usize,
    /// A stream taking longer than this (seconds) counts as a `timeout` error.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// Text of each user message.
    #[arg(long, default_value = "hello")]
    message: String,
    /// Start a new chat after this many turns (0: one chat per user for the whole run,
    /// so its history grows with every turn).
    #[arg(long, default_value_t = 0)]
    turns_per_chat: u64,
    /// Name of this run in the report.
    #[arg(long, default_value = "run")]
    label: String,
    /// Extra `key=value` pairs copied into the JSON report (e.g. target=sqlite).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Write the JSON report here (it always goes to stdout too).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Seconds to wait for a spawned server to print `listening on http://...`.
    #[arg(long, default_value_t = 60.0)]
    startup_timeout: f64,
    /// Start this server (it must print `listening on http://ADDR` on stdout),
    /// measure it from /proc, and stop it at the end.
    #[arg(last = true)]
    server: Vec<String>,
}

/// What one virtual user measured (microseconds).
#[derive(Debug, Default)]
struct VuStats {
    ttft: Vec<u32>,
    full: Vec<u32>,
    errors: BTreeMap<String, u64>,
}

impl VuStats {
    fn error(&mut self, kind: impl Into<String>) {
        *self.errors.entry(kind.into()).or_default() += 1;
    }
}

/// Shared, read-only settings of a run.
struct Ctx {
    addr: SocketAddr,
    authority: String,
    message: String,
    turns_per_chat: u64,
    timeout: Duration,
    run_id: String,
    setup_gate: Semaphore,
    ready: AtomicUsize,
    setup_failed: AtomicUsize,
    /// Set once every user is ready: when streaming starts.
    go: watch::Receiver<Option<Window>>,
    stop: CancellationToken,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    end: Instant,
}

impl Window {
    fn contains(&self, t: Instant) -> bool {
        t >= self.start && t <= self.end
    }
}

#[derive(Debug)]
enum StreamError {
    /// The connection is unusable: reconnect.
    Conn(String),
    /// The request failed but the connection can be reused.
    Soft(String),
}

async fn connect(ctx: &Ctx) -> Result<SendRequest<Full<Bytes>>, String> {
    let tcp = TcpStream::connect(ctx.addr)
        .await
        .map_err(|e| format!("connect: {}", e.kind()))?;
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|_| "handshake".to_owned())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

fn request(ctx: &Ctx, path: &str, user: &str, body: String) -> Request<Full<Bytes>> {
    // Building a request from valid static parts cannot fail; fall back to a default one if it did.
    Request::builder()
        .method(Method::POST)
        .uri(path)
        .header("host", &ctx.authority)
        .header("content-type", "application/json")
        .header("x-user-id", user)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

async fn create_chat(
    ctx: &Ctx,
    sender: &mut SendRequest<Full<Bytes>>,
    user: &str,
) -> Result<String, String> {
    sender
        .ready()
        .await
        .map_err(|_| "create: closed".to_owned())?;
    let res = sender
        .send_request(request(ctx, "/api/chat", user, "{}".to_owned()))
        .await
        .map_err(|e| format!("create: {e}"))?;
    let status = res.status();
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("create body: {e}"))?
        .to_bytes();
    if status != StatusCode::OK {
        return Err(format!("create: http {}", status.as_u16()));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&body).map_err(|_| "create: bad json".to_owned())?;
    v.get("chatId")
        .and_then(|c| c.as_str())
        .map(str::to_owned)
        .ok_or_else(|| "create: no chatId".to_owned())
}

const TEXT_DELTA: &[u8] = br#""type":"text-delta""#;
const ERROR_CHUNK: &[u8] = br#""type":"error""#;
const DONE: &[u8] = b"data: [DONE]\n\n";

/// Posts one message and reads its stream to the end: (ttft, full).
async fn one_stream(
    ctx: &Ctx,
    sender: &mut SendRequest<Full<Bytes>>,
    user: &str,
    chat: &str,
    seq: u64,
    buf: &mut Vec<u8>,
) -> Result<(Duration, Duration), StreamError> {
    let body = json!({
        "id": chat,
        "trigger": "submit-message",
        "message": {
            "id": format!("m-{}-{user}-{seq}", ctx.run_id),
            "role": "user",
            "parts": [{"type": "text", "text": ctx.message}],
        },
    })
    .to_string();
    sender
        .ready()
        .await
        .map_err(|_| StreamError::Conn("closed".into()))?;
    let t0 = Instant::now();
    let res = sender
        .send_request(request(
            ctx,
            &format!("/api/chat/{chat}/messages"),
            user,
            body,
        ))
        .await
        .map_err(|e| {
            StreamError::Conn(if e.is_incomplete_message() {
                "closed".into()
            } else {
                "send".into()
            })
        })?;
    let status = res.status();
    let mut body = res.into_body();
    if status != StatusCode::OK {
        // Drain so the connection can be reused.
        let _ = body.collect().await;
        return Err(StreamError::Soft(format!("http {}", status.as_u16())));
    }
    buf.clear();
    let mut ttft = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| StreamError::Conn("body".into()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        // Search only the new bytes (plus an overlap for a pattern split across reads).
        let from = buf.len().saturating_sub(TEXT_DELTA.len());
        buf.extend_from_slice(&data);
        if ttft.is_none() && memchr::memmem::find(&buf[from..], TEXT_DELTA).is_some() {
            ttft = Some(t0.elapsed());
        }
    }
    let full = t0.elapsed();
    if memchr::memmem::find(buf, ERROR_CHUNK).is_some() {
        return Err(StreamError::Soft("error chunk".into()));
    }
    if !buf.ends_with(DONE) {
        return Err(StreamError::Soft("no [DONE]".into()));
    }
    let Some(ttft) = ttft else {
        return Err(StreamError::Soft("no text-delta".into()));
    };
    Ok((ttft, full))
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

async fn virtual_user(ctx: Arc<Ctx>, i: usize) -> VuStats {
    let mut stats = VuStats::default();
    let user = format!("bench-{}-{i}", ctx.run_id);
    // Setup: connect and create the chat, a bounded number at a time.
    let setup = async {
        let _permit = ctx.setup_gate.acquire().await.ok()?;
        for attempt in 0..5u64 {
            match connect(&ctx).await {
                Ok(mut s) => match create_chat(&ctx, &mut s, &user).await {
                    Ok(chat) => return Some((s, chat)),
                    Err(e) => stats.error(format!("setup {e}")),
                },
                Err(e) => stats.error(format!("setup {e}")),
            }
            tokio::time::sleep(Duration::from_millis(100 * (attempt + 1))).await;
        }
        None
    }
    .await;
    let Some((mut sender, mut chat)) = setup else {
        ctx.setup_failed.fetch_add(1, Ordering::Relaxed);
        return stats;
    };
    ctx.ready.fetch_add(1, Ordering::Relaxed);
    let mut go = ctx.go.clone();
    let Ok(window) = go.wait_for(Option::is_some).await.map(|w| *w) else {
        return stats;
    };
    let Some(window) = window else {
        return stats;
    };
    let mut buf = Vec::with_capacity(8192);
    let mut seq = 0u64;
    loop {
        if ctx.turns_per_chat > 0 && seq > 0 && seq % ctx.turns_per_chat == 0 {
            let created = tokio::select! {
                () = ctx.stop.cancelled() => break,
                r = create_chat(&ctx, &mut sender, &user) => r,
            };
            match created {
                Ok(c) => chat = c,
                Err(e) => {
                    if window.contains(Instant::now()) {
                        stats.error(e);
                    }
                    match reconnect(&ctx).await {
                        Some(s) => sender = s,
                        None => break,
                    }
                    continue;
                }
            }
        }
        seq += 1;
        let result = tokio::select! {
            () = ctx.stop.cancelled() => break,
            r = tokio::time::timeout(ctx.timeout, one_stream(&ctx, &mut sender, &user, &chat, seq, &mut buf)) => r,
        };
        let now = Instant::now();
        let counted = window.contains(now);
        match result {
            Ok(Ok((ttft, full))) => {
                if counted {
                    stats.ttft.push(micros(ttft));
                    stats.full.push(micros(full));
                }
            }
            Ok(Err(StreamError::Soft(kind))) => {
                if counted {
                    stats.error(kind);
                }
            }
            Ok(Err(StreamError::Conn(kind))) => {
                if ctx.stop.is_cancelled() {
                    break;
                }
                if counted {
                    stats.error(kind);
                }
                match reconnect(&ctx).await {
                    Some(s) => sender = s,
                    None => {
                        stats.error("reconnect failed");
                        break;
                    }
                }
            }
            Err(_) => {
                if counted {
                    stats.error("timeout");
                }
                match reconnect(&ctx).await {
                    Some(s) => sender = s,
                    None => {
                        stats.error("reconnect failed");
                        break;
                    }
                }
            }
        }
        if now > window.end {
            break;
        }
    }
    stats
}

async fn reconnect(ctx: &Ctx) -> Option<SendRequest<Full<Bytes>>> {
    for attempt in 0..5u64 {
        if ctx.stop.is_cancelled() {
            return None;
        }
        if let Ok(s) = connect(ctx).await {
            return Some(s);
        }
        tokio::time::sleep(Duration::from_millis(50 * (attempt + 1))).await;
    }
    None
}

/// CPU time (user + system) and peak RSS of a process, from /proc.
#[derive(Debug, Clone, Copy, Default)]
struct ProcSample {
    cpu_ticks: u64,
    peak_rss_kb: u64,
    rss_kb: u64,
}

fn proc_sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some(ProcSample {
        cpu_ticks: utime + stime,
        peak_rss_kb: kb("VmHWM:"),
        rss_kb: kb("VmRSS:"),
    })
}

fn clock_ticks_per_sec() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

fn percentile(sorted: &[u32], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let idx = rank.clamp(1, sorted.len()) - 1;
    Some(f64::from(sorted[idx]) / 1000.0)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Raises the soft open-file limit to the hard limit (10k users need 10k sockets).
fn raise_nofile() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("chat-loadgen: cannot raise RLIMIT_NOFILE: {e}");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(0, |(soft, _)| soft)
        }
    }
}

struct Spawned {
    child: tokio::process::Child,
    pid: u32,
}

async fn spawn_server(cmd: &[String], timeout: Duration) -> anyhow::Result<(Spawned, String)> {
    let (prog, args) = cmd.split_first().context("empty server command")?;
    let mut child = tokio::process::Command::new(prog)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {prog}"))?;
    let pid = child.id().context("server exited at once")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let url = tokio::time::timeout(timeout, async {
        while let Some(line) = lines.next_line().await? {
            if let Some(url) = line.trim().strip_prefix("listening on ") {
                return Ok(url.to_owned());
            }
        }
        bail!("server exited before listening")
    })
    .await
    .context("server did not start in time")??;
    // Keep draining stdout so the server never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((Spawned { child, pid }, url))
}

async fn stop_server(mut s: Spawned) {
    let _ = tokio::process::Command::new("kill")
        .args(["-TERM", &s.pid.to_string()])
        .status()
        .await;
    if tokio::time::timeout(Duration::from_secs(15), s.child.wait())
        .await
        .is_err()
    {
        let _ = s.child.kill().await;
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let nofile = raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    let report = rt.block_on(run(&args, nofile))?;
    let text = serde_json::to_string_pretty(&report)?;
    if let Some(path) = &args.json {
        std::fs::write(path, &text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!("{text}");
    Ok(())
}

async fn run(args: &Args, nofile: u64) -> anyhow::Result<serde_json::Value> {
    let (server, url) = if args.server.is_empty() {
        (
            None,
            args.url
                .clone()
                .context("give --url or a server command after --")?,
        )
    } else {
        let (s, url) =
            spawn_server(&args.server, Duration::from_secs_f64(args.startup_timeout)).await?;
        (Some(s), url)
    };
    let authority = url
        .trim_end_matches('/')
        .strip_prefix("http://")
        .context("only http:// URLs")?
        .to_owned();
    let addr = tokio::net::lookup_host(&authority)
        .await?
        .next()
        .context("cannot resolve the server address")?;
    let result = drive(
        args,
        addr,
        authority,
        server.as_ref().map(|s| s.pid),
        nofile,
    )
    .await;
    if let Some(s) = server {
        stop_server(s).await;
    }
    let mut report = result?;
    report["url"] = json!(url);
    Ok(report)
}

async fn drive(
    args: &Args,
    addr: SocketAddr,
    authority: String,
    server_pid: Option<u32>,
    nofile: u64,
) -> anyhow::Result<serde_json::Value> {
    let (go_tx, go_rx) = watch::channel(None);
    let ctx = Arc::new(Ctx {
        addr,
        authority,
        message: args.message.clone(),
        turns_per_chat: args.turns_per_chat,
        timeout: Duration::from_secs_f64(args.timeout),
        run_id: uuid::Uuid::new_v4().simple().to_string()[..8].to_owned(),
        setup_gate: Semaphore::new(args.connect_parallel.max(1)),
        ready: AtomicUsize::new(0),
        setup_failed: AtomicUsize::new(0),
        go: go_rx,
        stop: CancellationToken::new(),
    });
    let setup_started = Instant::now();
    let users: Vec<_> = (0..args.concurrency)
        .map(|i| tokio::spawn(virtual_user(ctx.clone(), i)))
        .collect();
    while ctx.ready.load(Ordering::Relaxed) + ctx.setup_failed.load(Ordering::Relaxed)
        < args.concurrency
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let setup_s = setup_started.elapsed().as_secs_f64();
    let ready = ctx.ready.load(Ordering::Relaxed);
    eprintln!(
        "chat-loadgen [{}]: {ready}/{} users ready in {setup_s:.1}s; warming up {}s, measuring {}s",
        args.label, args.concurrency, args.warmup, args.duration
    );
    let start = Instant::now() + Duration::from_secs_f64(args.warmup);
    let end = start + Duration::from_secs_f64(args.duration);
    go_tx.send_replace(Some(Window { start, end }));
    let own_pid = std::process::id();

    tokio::time::sleep_until(start.into()).await;
    let before = server_pid.and_then(proc_sample);
    let own_before = proc_sample(own_pid);
    // Sample the RSS now and then: VmHWM also covers setup, the samples only the load.
    let mut max_rss_kb = 0;
    while Instant::now() < end {
        if let Some(s) = server_pid.and_then(proc_sample) {
            max_rss_kb = max_rss_kb.max(s.rss_kb);
        }
        tokio::time::sleep_until(end.min(Instant::now() + Duration::from_millis(250)).into()).await;
    }
    let after = server_pid.and_then(proc_sample);
    let own_after = proc_sample(own_pid);
    ctx.stop.cancel();

    let mut ttft = Vec::new();
    let mut full = Vec::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for u in users {
        let s = u.await.unwrap_or_default();
        ttft.extend(s.ttft);
        full.extend(s.full);
        for (k, n) in s.errors {
            *errors.entry(k).or_default() += n;
        }
    }
    ttft.sort_unstable();
    full.sort_unstable();
    let streams = full.len();
    let window_s = args.duration;
    let streams_per_s = streams as f64 / window_s;
    let ticks = clock_ticks_per_sec() as f64;
    let cpu_ms = |b: Option<ProcSample>, a: Option<ProcSample>| {
        b.zip(a)
            .map(|(b, a)| (a.cpu_ticks.saturating_sub(b.cpu_ticks)) as f64 * 1000.0 / ticks)
    };
    let server_cpu_ms = cpu_ms(before, after);
    let error_total: u64 = errors.values().sum();
    let tags: serde_json::Map<String, serde_json::Value> = args
        .tags
        .iter()
        .filter_map(|t| t.split_once('='))
        .map(|(k, v)| (k.to_owned(), json!(v)))
        .collect();
    let p = |v: &[u32], q| percentile(v, q).map(round2);
    let report = json!({
        "label": args.label,
        "tags": tags,
        "concurrency": args.concurrency,
        "turns_per_chat": args.turns_per_chat,
        "users_ready": ready,
        "setup_s": round2(setup_s),
        "warmup_s": args.warmup,
        "duration_s": window_s,
        "streams": streams,
        "streams_per_s": round2(streams_per_s),
        "ttft_ms": {"p50": p(&ttft, 50.0), "p99": p(&ttft, 99.0)},
        "full_ms": {"p50": p(&full, 50.0), "p99": p(&full, 99.0)},
        "errors": errors,
        "error_total": error_total,
        "server": server_pid.map(|pid| json!({
            "pid": pid,
            "peak_rss_mb": after.map(|a| round2(a.peak_rss_kb as f64 / 1024.0)),
            "max_rss_under_load_mb": round2(max_rss_kb as f64 / 1024.0),
            "cpu_ms": server_cpu_ms.map(round2),
            "cpu_ms_per_stream": server_cpu_ms.filter(|_| streams > 0).map(|c| round2(c / streams as f64)),
        })),
        "loadgen_cpu_ms": cpu_ms(own_before, own_after).map(round2),
        "nofile_limit": nofile,
        // Other work on the machine skews absolute numbers; ratios to the ceiling hold better.
        "loadavg": std::fs::read_to_string("/proc/loadavg").ok().map(|l| l.trim().to_owned()),
    });
    let ms = |v: &serde_json::Value| {
        v.as_f64()
            .map_or_else(|| "-".to_owned(), |x| format!("{x:.1}"))
    };
    eprintln!(
        "chat-loadgen [{}]: {streams} streams, {streams_per_s:.0}/s, ttft p50/p99 {}/{} ms, full p50/p99 {}/{} ms, errors {error_total}",
        args.label,
        ms(&report["ttft_ms"]["p50"]),
        ms(&report["ttft_ms"]["p99"]),
        ms(&report["full_ms"]["p50"]),
        ms(&report["full_ms"]["p99"]),
    );
    Ok(report)
}
