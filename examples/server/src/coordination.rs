//! Single-instance or multi-instance session runtime, picked from the
//! environment: `REDIS_URL` (Redis), `COORDINATION=postgres` (the Postgres of
//! DATABASE_URL alone), or neither (one instance, as before).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chat_core::{
    AdaptiveAdmission, ChatSession, CoordinatedSessions, CoordinationSettings, LocalSessions,
    MessageStore, ModelProvider, TurnConfig, TurnCoordinator, TurnRunner,
};
use chat_store_sqlx::SqlStore;
use chat_store_sqlx::sqlx::PgPool;
use clap::{Args, ValueEnum};

/// How instances of one deployment coordinate their turns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CoordinationKind {
    /// One instance: turns live in this process (the default without REDIS_URL).
    None,
    /// Through Redis at REDIS_URL (the default when REDIS_URL is set).
    Redis,
    /// Through the Postgres of DATABASE_URL (lease rows + LISTEN/NOTIFY).
    Postgres,
}

/// Multi-instance settings.
#[derive(Debug, Clone, Args)]
pub struct CoordinationArgs {
    /// Coordinate turns with other instances: none, redis or postgres
    /// (default: redis when REDIS_URL is set, else none).
    #[arg(long, env = "COORDINATION", value_enum)]
    pub coordination: Option<CoordinationKind>,
    /// Redis URL (redis://host:6379) for COORDINATION=redis.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// How long a turn's lease lives without renewal: how soon the chats of a
    /// crashed instance free up and get their last checkpoint finalized.
    #[arg(long, env = "LEASE_TTL_MS", default_value_t = 10_000)]
    pub lease_ttl_ms: u64,
    /// Shared by the instances of one deployment: Redis key prefix, or the
    /// Postgres NOTIFY channel (`<namespace>_coordination`).
    #[arg(long, env = "COORDINATION_NAMESPACE", default_value = "chat")]
    pub coordination_namespace: String,
    /// This instance's name in logs (default: the process id).
    #[arg(long, env = "INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// One instance only: bytes of chat history kept in memory so a turn does
    /// not reload the chat from the database (0 = off).
    #[arg(long, env = "HISTORY_CACHE_BYTES", default_value_t = chat_core::DEFAULT_HISTORY_CACHE_BYTES)]
    pub history_cache_bytes: usize,
    /// One instance only: most answers generating at once (0 = no bound);
    /// the others wait, user message stored, for their first token. Unset:
    /// a bound that follows the machine, from 1,024 per CPU core, between 256
    /// and 1,536 per core.
    #[arg(long, env = "MAX_RUNNING_TURNS")]
    pub max_running_turns: Option<usize>,
}

/// Default admission bound per CPU core: where it starts, and how far it
/// moves. On the 2-core bench machine a fixed 2,048 cut peak RSS at 10,000
/// clients from ~465 to ~375 MB (round 4), but left a faster machine's
/// cores idle at 5,000 clients with turns queued (round 15); 1,536 per
/// core keeps 10,000 clients under 400 MB (`benches/README.md`).
const RUNNING_TURNS_PER_CORE: [usize; 3] = [256, 1024, 1536];

/// The admission control the settings ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdmissionBound {
    /// Every turn generates at once.
    Unbounded,
    /// At most this many at once.
    Fixed(usize),
    /// A bound that follows the machine.
    Adaptive(AdaptiveAdmission),
}

impl CoordinationArgs {
    /// The admission control in effect.
    pub fn running_turns_bound(&self) -> AdmissionBound {
        match self.max_running_turns {
            Some(0) => AdmissionBound::Unbounded,
            Some(n) => AdmissionBound::Fixed(n),
            None => {
                let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
                let [min, initial, max] = RUNNING_TURNS_PER_CORE.map(|n| n * cores);
                AdmissionBound::Adaptive(AdaptiveAdmission::new(min, initial, max))
            }
        }
    }
}

/// The Postgres pool of the store, when it is on Postgres.
pub fn pg_pool(store: &SqlStore) -> Option<PgPool> {
    if let SqlStore::Postgres(p) = store {
        Some(p.pool().clone())
    } else {
        None
    }
}

/// The session runtime in use.
#[derive(Debug, Clone)]
pub enum Sessions {
    /// One instance.
    Local(Arc<LocalSessions>),
    /// One of several instances.
    Coordinated(CoordinatedSessions),
}

impl Sessions {
    /// Builds the runtime the settings ask for.
    pub async fn build(
        args: &CoordinationArgs,
        pg: Option<PgPool>,
        store: Arc<dyn MessageStore>,
        model: Arc<dyn ModelProvider>,
        config: TurnConfig,
    ) -> anyhow::Result<Self> {
        let kind = args.coordination.unwrap_or(if args.redis_url.is_some() {
            CoordinationKind::Redis
        } else {
            CoordinationKind::None
        });
        let instance = args
            .instance_id
            .clone()
            .unwrap_or_else(|| std::process::id().to_string());
        let coord: Arc<dyn TurnCoordinator> = match kind {
            CoordinationKind::None => {
                let mut local = LocalSessions::new(store, model, config)
                    .with_history_cache(args.history_cache_bytes);
                let bound = args.running_turns_bound();
                local = match bound {
                    AdmissionBound::Unbounded => local,
                    AdmissionBound::Fixed(max) => local.with_max_running_turns(max),
                    AdmissionBound::Adaptive(settings) => local.with_adaptive_admission(settings),
                };
                tracing::info!(?bound, "admission control");
                return Ok(Sessions::Local(Arc::new(local)));
            }
            CoordinationKind::Redis => {
                let url = args
                    .redis_url
                    .as_deref()
                    .context("COORDINATION=redis needs REDIS_URL")?;
                let settings = chat_bus_redis::RedisSettings {
                    prefix: args.coordination_namespace.clone(),
                    ..chat_bus_redis::RedisSettings::default()
                };
                Arc::new(
                    chat_bus_redis::RedisCoordinator::connect(url, settings)
                        .await
                        .context("cannot connect to Redis (REDIS_URL)")?,
                )
            }
            CoordinationKind::Postgres => {
                let pool = pg.context("COORDINATION=postgres needs a postgres:// DATABASE_URL")?;
                let settings = chat_store_sqlx::PgCoordinatorSettings {
                    channel: format!("{}_coordination", args.coordination_namespace),
                    ..chat_store_sqlx::PgCoordinatorSettings::default()
                };
                Arc::new(
                    chat_store_sqlx::PgCoordinator::new(pool, settings)
                        .await
                        .context("cannot start Postgres coordination")?,
                )
            }
        };
        let lease_ttl = Duration::from_millis(args.lease_ttl_ms.max(300));
        let settings = CoordinationSettings {
            lease_ttl,
            renew_every: lease_ttl / 3,
            ..CoordinationSettings::default()
        };
        tracing::info!(
            ?kind,
            instance,
            lease_ttl_ms = lease_ttl.as_millis() as u64,
            "multi-instance coordination on"
        );
        let runner = TurnRunner::new(store, model, config);
        Ok(Sessions::Coordinated(CoordinatedSessions::new(
            runner, coord, settings,
        )?))
    }

    /// The runtime as the HTTP service takes it.
    pub fn as_dyn(&self) -> Arc<dyn ChatSession> {
        match self {
            Sessions::Local(s) => s.clone(),
            Sessions::Coordinated(s) => Arc::new(s.clone()),
        }
    }

    /// Turns running in this process.
    pub fn running(&self) -> usize {
        match self {
            Sessions::Local(s) => s.running(),
            Sessions::Coordinated(s) => s.running_here(),
        }
    }

    /// Lets this process's turns finish for up to `grace`, then stops and stores them.
    pub async fn shutdown(&self, grace: Duration) {
        match self {
            Sessions::Local(s) => s.shutdown(grace).await,
            Sessions::Coordinated(s) => s.shutdown(grace).await,
        }
    }
}
