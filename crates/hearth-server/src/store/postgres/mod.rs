//! The shared store: PostgreSQL through a connection pool (tokio-postgres +
//! deadpool), TLS with rustls when the server offers it (`sslmode=require` insists).
//! Every replica migrates the schema at start under an advisory lock, so replicas
//! starting together apply each migration once. Leases use the database's clock, so
//! replicas on machines whose clocks disagree still agree on who is alive.

mod api;
mod files;
mod outbox;
mod predictions;
mod upstream;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::config::SslMode;

use super::StoreError;

/// Forward migrations; the n-th entry takes the schema to version n+1. Never edit one
/// that has shipped: add another. Text keys sort bytewise (`COLLATE "C"`), as
/// SQLite's do, so listing cursors mean the same on both.
const MIGRATIONS: &[&str] = &[
    // 1: predictions with owners and cancel requests, replicas and their leases, the
    // webhook outbox with expiring claims, settings (the webhook secret), files.
    r#"CREATE TABLE predictions (
        id TEXT COLLATE "C" PRIMARY KEY,
        created_at TEXT COLLATE "C" NOT NULL,
        status TEXT NOT NULL,
        owner TEXT,
        cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
        record TEXT NOT NULL
     );
     CREATE INDEX predictions_created ON predictions (created_at DESC, id DESC);
     CREATE INDEX predictions_in_flight ON predictions (owner)
        WHERE status IN ('starting', 'processing');
     CREATE TABLE replicas (
        id TEXT PRIMARY KEY,
        started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        lease_until TIMESTAMPTZ NOT NULL
     );
     CREATE TABLE webhook_outbox (
        seq BIGSERIAL PRIMARY KEY,
        prediction_id TEXT NOT NULL,
        msg_id TEXT NOT NULL,
        url TEXT NOT NULL,
        event TEXT NOT NULL,
        body TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL,
        claimed_until_ms BIGINT NOT NULL DEFAULT 0,
        claimed_by TEXT,
        due_unix_ms BIGINT NOT NULL
     );
     CREATE INDEX webhook_outbox_prediction ON webhook_outbox (prediction_id, seq);
     CREATE INDEX webhook_outbox_due ON webhook_outbox (due_unix_ms);
     CREATE TABLE settings (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
     );
     CREATE TABLE files (
        id TEXT COLLATE "C" PRIMARY KEY,
        created_at TEXT COLLATE "C" NOT NULL,
        meta TEXT NOT NULL
     );
     CREATE TABLE file_chunks (
        file_id TEXT NOT NULL REFERENCES files (id) ON DELETE CASCADE,
        n INTEGER NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (file_id, n)
     );"#,
    // 2: listing files a page at a time; each delivery's destination host, for the
    // dispatcher's per-host cap.
    r#"CREATE INDEX files_created ON files (created_at DESC, id DESC);
     ALTER TABLE webhook_outbox ADD COLUMN host TEXT NOT NULL DEFAULT '';"#,
    // 3: which upstream runs a prediction routed there, and its id there.
    r#"CREATE TABLE upstream_links (
        prediction_id TEXT COLLATE "C" PRIMARY KEY,
        upstream TEXT NOT NULL,
        upstream_id TEXT,
        create_sent_ms BIGINT NOT NULL
     );"#,
    // 4: listing by status newest first reads only that status's rows, in order.
    r#"CREATE INDEX predictions_status_created ON predictions (status, created_at DESC, id DESC);"#,
    // 5: listing by model newest first reads only that model's rows, in order (the
    // column filled from the records at the upgrade).
    r#"ALTER TABLE predictions ADD COLUMN model TEXT COLLATE "C" NOT NULL DEFAULT '';
     UPDATE predictions SET model = COALESCE(record::jsonb #>> '{prediction,model}', '');
     CREATE INDEX predictions_model_created ON predictions (model, created_at DESC, id DESC);"#,
];

/// Any number in the advisory-lock space, the same for every replica: the schema's.
const MIGRATION_LOCK: i64 = 0x6865_6172_7468;

/// Connections per replica: a few for the runners' writes, the pollers and the
/// dispatcher; a request waits for one at most `POOL_WAIT`.
const POOL_SIZE: usize = 16;
const POOL_WAIT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// No statement may hold a connection longer than this.
const STATEMENT_TIMEOUT_MS: u64 = 30_000;

pub struct PgStore {
    pool: Pool,
    target: String,
    replica: String,
    /// Fault injection for tests: every write fails while set.
    fail_writes: AtomicBool,
}

impl PgStore {
    /// Connects (the first connection is made now, so a wrong URL fails the start),
    /// migrates, and names this replica.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let mut cfg: tokio_postgres::Config = url.parse().map_err(|e| StoreError::Connect {
            target: redact(url),
            reason: format!("not a PostgreSQL URL: {e}"),
        })?;
        let target = describe(&cfg);
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(CONNECT_TIMEOUT);
        }
        let options = format!(
            "{} -c statement_timeout={STATEMENT_TIMEOUT_MS}",
            cfg.get_options().unwrap_or("")
        );
        cfg.options(options.trim());
        if cfg.get_application_name().is_none() {
            cfg.application_name("hearth");
        }
        let tls = tls_connector(cfg.get_ssl_mode())?;
        let manager = Manager::from_config(
            cfg,
            tls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT + Duration::from_secs(1)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Connect {
                target: target.clone(),
                reason: e.to_string(),
            })?;
        let store = Self {
            pool,
            target,
            replica: crate::record::new_id(),
            fail_writes: AtomicBool::new(false),
        };
        store.migrate().await?;
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => StoreError::Connect {
                target: self.target.clone(),
                reason: e.to_string(),
            },
            other => StoreError::Postgres(format!("connection pool: {other}")),
        })
    }

    /// A connection, for a write.
    async fn writer(&self) -> Result<deadpool_postgres::Object, StoreError> {
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(StoreError::Injected);
        }
        self.client().await
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_version (
                version BIGINT PRIMARY KEY,
                applied_at TEXT NOT NULL
             )",
        )
        .await?;
        let found: i64 = tx
            .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])
            .await?
            .get(0);
        let known = MIGRATIONS.len() as i64;
        if found > known {
            return Err(StoreError::TooNew {
                what: self.target.clone(),
                found,
                known,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            let version = i as i64 + 1;
            tx.batch_execute(sql).await.map_err(|e| {
                StoreError::Postgres(format!(
                    "migrating to schema version {version}: {}",
                    StoreError::from(e)
                ))
            })?;
            tx.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)",
                &[&version, &crate::record::now_rfc3339()],
            )
            .await?;
            tracing::info!(version, store = %self.target, "predictions database migrated");
        }
        tx.commit().await?;
        Ok(())
    }

    async fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .client()
            .await?
            .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])
            .await?
            .get(0))
    }
}

/// TLS for the connections: rustls with the web's root certificates, plus those in
/// `PGSSLROOTCERT` (a PEM file, libpq's variable) for a private CA.
fn tls_connector(mode: SslMode) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Ok(path) = std::env::var("PGSSLROOTCERT") {
        use rustls::pki_types::pem::PemObject;
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(&path).map_err(|e| {
            StoreError::Connect {
                target: format!("PGSSLROOTCERT={path}"),
                reason: e.to_string(),
            }
        })?;
        for c in certs.flatten() {
            let _ = roots.add(c);
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Connect {
            target: format!("TLS ({mode:?})"),
            reason: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// `host:port/db as user`, for logs: never the password.
fn describe(cfg: &tokio_postgres::Config) -> String {
    let host = cfg
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(s) => s.clone(),
            #[cfg(unix)]
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{}@{host}:{port}/{}",
        cfg.get_user().unwrap_or(""),
        cfg.get_dbname().unwrap_or("")
    )
}

/// A URL that did not parse, with anything between `://` and `@` hidden.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(a), Some(b)) if b > a => format!("{}://***{}", &url[..a], &url[b..]),
        _ => url.to_string(),
    }
}
