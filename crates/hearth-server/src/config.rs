//! The server's configuration, as the binary's flags and the model-card file give it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::{auth, routes, store, upstream, ServerError};

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    /// Accepted bearer tokens; empty means no authentication.
    pub api_tokens: Vec<String>,
    /// Serve without tokens on a non-loopback address (refused otherwise).
    pub allow_unauthenticated: bool,
    /// Base of the absolute URLs the server hands out; default `http://{Host}`. Its
    /// host is one the server answers to.
    pub public_url: Option<String>,
    /// `Host` names served besides loopback names, IP literals and `public_url`'s
    /// host: a name, `.domain` (it and the names under it) or `*` (any).
    pub allowed_hosts: Vec<String>,
    pub max_body_bytes: usize,
    /// Largest upload to `/v1/files`.
    pub max_file_bytes: u64,
    /// How long SIGTERM waits for predictions in flight before cancelling them.
    pub shutdown_timeout: Duration,
    /// How long a server whose engine went DEFUNCT keeps answering (503, DEFUNCT)
    /// before it shuts down, so probes and load balancers see why.
    pub defunct_hold: Duration,
    /// Serve Cog's container API (`/predictions`, `/shutdown`, ...) on the same port.
    pub cog_api: bool,
    /// `/metrics` without a token, for scrapers.
    pub metrics_public: bool,
    /// Let webhooks target loopback and private addresses.
    pub webhook_allow_private: bool,
    /// A client must send a request's headers within this.
    pub header_read_timeout: Duration,
    /// Open connections at most; past it new ones get a 503 and are closed.
    pub max_connections: usize,
    /// Open connections from one client address at most; past it new ones get a 429
    /// and are closed.
    pub max_connections_per_ip: usize,
    /// A connection that has handled no request for this long is closed (HTTP/1
    /// keep-alive and HTTP/2 alike).
    pub idle_timeout: Duration,
    /// A connection older than this takes no new requests and closes once its
    /// responses are done (HTTP/2: GOAWAY).
    pub max_connection_age: Duration,
    /// Predictions and OpenAI generations one client (an API token, or an address
    /// when the server has no tokens) may have queued or running at once; past it a
    /// create is a 429 with `Retry-After`.
    pub max_queued_per_client: usize,
    /// Cog's prediction slots: Cog-route predictions in flight at most; past it Cog's
    /// `POST`/`PUT /predictions` answer 409 "At capacity", as Cog does.
    pub cog_max_concurrency: usize,
    /// Where predictions live: None is the SQLite file in the data dir.
    pub store: Option<store::StoreSpec>,
    /// How long a replica's predictions stay its own without a renewal; past it
    /// another replica sharing the store ends them.
    pub replica_lease: Duration,
    /// Replicate-compatible APIs models can be routed to (`--upstream`).
    pub upstreams: Vec<upstream::UpstreamSpec>,
    /// Models that do not simply run here (`--route`).
    pub routes: Vec<upstream::ModelRoute>,
    /// Each upstream's circuit breaker.
    pub upstream_breaker: upstream::BreakerConfig,
    /// Shadow routes' bounds on copies sent upstream.
    pub shadow_limits: upstream::shadow::ShadowLimits,
    /// The bytes all upstream answers being read may hold together
    /// (`--upstream-memory-budget`).
    pub upstream_memory_budget: usize,
}

impl ServerConfig {
    /// The defaults `hearth serve` uses, on `addr` with `data_dir`.
    pub fn new(addr: SocketAddr, data_dir: PathBuf) -> Self {
        Self {
            addr,
            data_dir,
            api_tokens: Vec::new(),
            allow_unauthenticated: false,
            public_url: None,
            allowed_hosts: Vec::new(),
            max_body_bytes: 1 << 20,
            max_file_bytes: 100 << 20,
            shutdown_timeout: Duration::from_secs(30),
            defunct_hold: crate::engine_watch::DEFUNCT_HOLD,
            cog_api: true,
            metrics_public: false,
            webhook_allow_private: false,
            header_read_timeout: Duration::from_secs(30),
            max_connections: 4096,
            max_connections_per_ip: 256,
            idle_timeout: Duration::from_secs(120),
            max_connection_age: Duration::from_secs(3600),
            max_queued_per_client: 512,
            cog_max_concurrency: 256,
            store: None,
            replica_lease: Duration::from_secs(15),
            upstreams: Vec::new(),
            routes: Vec::new(),
            upstream_breaker: upstream::BreakerConfig::default(),
            shadow_limits: upstream::shadow::ShadowLimits::default(),
            upstream_memory_budget: upstream::budget::DEFAULT_BUDGET_BYTES,
        }
    }

    /// Refuses settings that would expose the server by accident.
    pub fn check(&self) -> Result<(), ServerError> {
        if self.api_tokens.is_empty()
            && !self.addr.ip().is_loopback()
            && !self.allow_unauthenticated
        {
            return Err(ServerError::Config(format!(
                "refusing to serve on {} without an API token: anyone who can reach that \
                 address could run predictions and read everyone's inputs and outputs. Give \
                 --api-token TOKEN (or HEARTH_API_TOKEN), listen on 127.0.0.1, or pass \
                 --allow-unauthenticated if a proxy in front does the authentication",
                self.addr
            )));
        }
        for (i, t) in self.api_tokens.iter().enumerate() {
            if let Err(why) = auth::check_token(t) {
                return Err(ServerError::Config(format!(
                    "--api-token: token {} of {} {why}",
                    i + 1,
                    self.api_tokens.len()
                )));
            }
        }
        for h in &self.allowed_hosts {
            routes::browser_guard::check_allowed_host(h).map_err(ServerError::Config)?;
        }
        if self.replica_lease < Duration::from_secs(3) {
            return Err(ServerError::Config(
                "--replica-lease: must be at least 3 seconds".into(),
            ));
        }
        if self.max_connections == 0 {
            return Err(ServerError::Config(
                "--max-connections: must be at least 1".into(),
            ));
        }
        if self.max_connections_per_ip == 0 {
            return Err(ServerError::Config(
                "--max-connections-per-ip: must be at least 1".into(),
            ));
        }
        if self.idle_timeout.is_zero() || self.max_connection_age.is_zero() {
            return Err(ServerError::Config(
                "--idle-timeout and --max-connection-age: must be at least 1 second".into(),
            ));
        }
        if self.max_queued_per_client == 0 {
            return Err(ServerError::Config(
                "--max-queued-per-client: must be at least 1".into(),
            ));
        }
        if self.cog_max_concurrency == 0 {
            return Err(ServerError::Config(
                "--cog-max-concurrency: must be at least 1".into(),
            ));
        }
        if self.upstream_breaker.failures == 0 || self.upstream_breaker.cooldown.is_zero() {
            return Err(ServerError::Config(
                "--upstream-failures and --upstream-cooldown: must be at least 1".into(),
            ));
        }
        upstream::Hybrid::new(
            &self.upstreams,
            &self.routes,
            self.upstream_breaker,
            upstream::budget::ByteBudget::new(self.upstream_memory_budget),
        )
        .map_err(ServerError::Config)?;
        Ok(())
    }
}
