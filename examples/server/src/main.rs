//! The example chat server: the whole HTTP contract on SQLite (default) or
//! Postgres, with the offline demo model or an OpenAI-compatible one, and a
//! small chat page at `/`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::response::Html;
use axum::routing::get;
use chat_core::{DemoModel, MessageStore, ModelProvider, TurnConfig};
use chat_http::axum::RouterOptions;
use chat_http::{Authenticator, ChatService, DevHeaderAuth, JwtAuth};
use clap::{Parser, ValueEnum};
use tracing_subscriber::EnvFilter;

mod coordination;

/// jemalloc instead of glibc malloc: fewer CPU ms per stream (see Cargo.toml).
/// Its options come from `_RJEM_MALLOC_CONF` at startup. For example,
/// `thp:always,metadata_thp:always` puts its arenas on huge pages: ~5% less
/// CPU per stream for ~20-25% more peak RSS (benches/README.md, Round 12).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The built-in chat page (plain HTML + JS, no build step).
const INDEX_HTML: &str = include_str!("../static/index.html");

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AuthKind {
    /// Trust the `x-user-id` header (local use and benchmarks).
    DevHeader,
    /// HS256 bearer tokens signed with CHAT_JWT_SECRET; user = `sub`.
    Jwt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ModelKind {
    /// Offline: TOKENS tokens `tok{i} `, TOKEN_DELAY_MS apart.
    Demo,
    /// An OpenAI-compatible server (OPENAI_API_KEY, OPENAI_BASE_URL, OPENAI_MODEL).
    Openai,
}

/// Streaming multi-session chat server (the chat-rs example).
#[derive(Debug, Parser)]
#[command(name = "chat-server-example", version, about)]
struct Settings {
    /// Port to listen on.
    #[arg(long, env = "PORT", default_value_t = 3000)]
    port: u16,
    /// Address to bind.
    #[arg(long, env = "BIND", default_value = "127.0.0.1")]
    bind: IpAddr,
    /// sqlite://path, sqlite::memory: or postgres://...
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite://chat.db")]
    database_url: String,
    /// How requests are authenticated.
    #[arg(long, env = "AUTH", value_enum, default_value = "dev-header")]
    auth: AuthKind,
    /// HS256 secret for AUTH=jwt.
    #[arg(long, env = "CHAT_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Which model answers (default: openai when OPENAI_API_KEY is set, else demo).
    #[arg(long, env = "MODEL", value_enum)]
    model: Option<ModelKind>,
    /// API key of the OpenAI-compatible server.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    openai_api_key: Option<String>,
    /// Demo model: tokens per answer.
    #[arg(long, env = "TOKENS", default_value_t = 64)]
    tokens: u32,
    /// Demo model: milliseconds between tokens.
    #[arg(long, env = "TOKEN_DELAY_MS", default_value_t = 20)]
    token_delay_ms: u64,
    /// Checkpoint interval of a streaming answer, in milliseconds.
    #[arg(long, env = "CHECKPOINT_MS", default_value_t = 500)]
    checkpoint_ms: u64,
    /// A checkpoint due by time also waits for this many tokens since the last (0 = off).
    #[arg(long, env = "CHECKPOINT_MIN_TOKENS", default_value_t = 16)]
    checkpoint_min_tokens: u32,
    /// ...unless this many milliseconds passed since the last checkpoint.
    #[arg(long, env = "CHECKPOINT_MAX_MS", default_value_t = 2000)]
    checkpoint_max_ms: u64,
    /// Serve this directory (e.g. a built web app) for paths outside the API.
    #[arg(long, env = "WEB_DIR")]
    web_dir: Option<PathBuf>,
    /// Comma-separated origins allowed by CORS (default: same-origin only).
    #[arg(long, env = "CORS_ORIGINS")]
    cors_origins: Option<String>,
    /// How long a shutdown waits for running answers before stopping them.
    #[arg(long, env = "SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    shutdown_grace_ms: u64,
    #[command(flatten)]
    coordination: coordination::CoordinationArgs,
}

fn model(settings: &Settings) -> anyhow::Result<Arc<dyn ModelProvider>> {
    let kind = settings
        .model
        .unwrap_or(if settings.openai_api_key.is_some() {
            ModelKind::Openai
        } else {
            ModelKind::Demo
        });
    match kind {
        ModelKind::Demo => Ok(Arc::new(
            DemoModel::new(settings.tokens)
                .with_delay(Duration::from_millis(settings.token_delay_ms)),
        )),
        ModelKind::Openai => openai_model(settings),
    }
}

/// OPENAI_BASE_URL, OPENAI_MODEL, OPENAI_ORGANIZATION, OPENAI_PROJECT from the
/// environment; the key from `--openai-api-key` / OPENAI_API_KEY.
fn openai_model(settings: &Settings) -> anyhow::Result<Arc<dyn ModelProvider>> {
    let key = settings.openai_api_key.clone();
    let provider = chat_llm_openai::OpenAiProvider::from_vars(|name| {
        if name == "OPENAI_API_KEY" {
            key.clone()
        } else {
            std::env::var(name).ok()
        }
    })
    .context("MODEL=openai")?;
    Ok(Arc::new(provider))
}

fn authenticator(settings: &Settings) -> anyhow::Result<Arc<dyn Authenticator>> {
    Ok(match settings.auth {
        AuthKind::DevHeader => Arc::new(DevHeaderAuth::new()),
        AuthKind::Jwt => {
            let secret = settings
                .jwt_secret
                .as_deref()
                .filter(|s| s.len() >= 16)
                .context("AUTH=jwt needs CHAT_JWT_SECRET (at least 16 bytes)")?;
            Arc::new(JwtAuth::hs256(secret.as_bytes()))
        }
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        // Logs on stderr; stdout carries only the `listening on` line.
        .with_writer(std::io::stderr)
        .init();
    let settings = Settings::parse();

    let store = chat_store_sqlx::connect(&settings.database_url)
        .await
        .with_context(|| {
            format!(
                "cannot open the database {}",
                redact(&settings.database_url)
            )
        })?;
    store.migrate().await.context("migrations failed")?;
    tracing::info!(backend = store.backend(), "store ready");
    let pg_pool = coordination::pg_pool(&store);
    let store: Arc<dyn MessageStore> = store.into_dyn();

    let model = model(&settings)?;
    let config = TurnConfig {
        checkpoint_interval: Duration::from_millis(settings.checkpoint_ms),
        checkpoint_min_events: settings.checkpoint_min_tokens,
        checkpoint_max_interval: Duration::from_millis(settings.checkpoint_max_ms),
        tools: chat_core::demo::demo_tools(),
        ..TurnConfig::default()
    };
    let sessions = coordination::Sessions::build(
        &settings.coordination,
        pg_pool,
        store.clone(),
        model.clone(),
        config,
    )
    .await?;
    let service = ChatService::new(store, sessions.as_dyn(), authenticator(&settings)?);

    let mut options = RouterOptions::default();
    if let Some(origins) = &settings.cors_origins {
        let origins: Vec<_> = origins
            .split(',')
            .filter_map(|o| o.trim().parse().ok())
            .collect();
        options.cors = Some(
            tower_http::cors::CorsLayer::new()
                .allow_origin(origins)
                .allow_methods(tower_http::cors::Any)
                .allow_headers(tower_http::cors::Any),
        );
    }
    let mut app = chat_http::axum::router_with(service, options);
    app = match &settings.web_dir {
        Some(dir) => app.fallback_service(tower_http::services::ServeDir::new(dir)),
        None => app
            .route("/", get(|| async { Html(INDEX_HTML) }))
            .fallback(chat_http::axum::not_found),
    };

    let addr = SocketAddr::new(settings.bind, settings.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let addr = listener.local_addr()?;
    // Machine-readable for scripts and tests (PORT=0 picks a free port).
    println!("listening on http://{addr}");
    tracing::info!(url = %format!("http://{addr}"), model = model.name(), "chat server listening");
    let grace = Duration::from_millis(settings.shutdown_grace_ms);
    // Finish the router once: each connection then clones one `Arc`ed route
    // table instead of rebuilding it (~4.6 KB per connection, 46 MB at
    // 10,000 clients, when `axum::serve` did that per connection).
    // chat-http's `serve` also keeps each connection's read buffer at 8 KiB
    // and sets TCP_NODELAY.
    let app = app.with_state(());
    chat_http::axum::serve(listener, app, async move {
        shutdown_signal().await;
        tracing::info!(
            running = sessions.running(),
            "shutting down: letting running answers finish"
        );
        sessions.shutdown(grace).await;
    })
    .await?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// The URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or_default();
            format!("{}://{user}:***{}", &url[..s], &url[at..])
        }
        _ => url.to_owned(),
    }
}
