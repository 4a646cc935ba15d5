//! The embedded store: one SQLite database in WAL mode, used by one process at a time
//! (an exclusive lock on `PATH.lock` says so to a second one). A prediction is written
//! when it is created, when it starts and when it ends, so a crash (even kill -9)
//! loses no finished prediction; one left in flight is ended at the next start (no
//! other process can own it). Uploaded files and the webhook secret stay in the data
//! dir.
//!
//! The database is synchronous: every call runs on tokio's blocking pool
//! (`SqliteStore`), never on a runtime worker.

mod api;
mod files;
mod outbox;
mod predictions;
mod upstream;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

use super::StoreError;

/// Forward migrations; the n-th entry takes the schema to version n+1. Never edit one
/// that has shipped: add another.
const MIGRATIONS: &[&str] = &[
    // 1: predictions (what the unversioned first release created, hence IF NOT EXISTS).
    "CREATE TABLE IF NOT EXISTS predictions (
        id TEXT PRIMARY KEY,
        created_at TEXT NOT NULL,
        status TEXT NOT NULL,
        record TEXT NOT NULL
     );
     CREATE INDEX IF NOT EXISTS predictions_created ON predictions (created_at DESC, id DESC);",
    // 2: the webhook outbox, delivered at least once, in order per prediction.
    "CREATE TABLE webhook_outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        prediction_id TEXT NOT NULL,
        msg_id TEXT NOT NULL,
        url TEXT NOT NULL,
        event TEXT NOT NULL,
        body TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL,
        claimed INTEGER NOT NULL DEFAULT 0,
        due_unix_ms INTEGER NOT NULL
     );
     CREATE INDEX webhook_outbox_prediction ON webhook_outbox (prediction_id, seq);
     CREATE INDEX webhook_outbox_due ON webhook_outbox (due_unix_ms);",
    // 3: owners, leases and cancel requests (the same model as the shared store), and
    // claims that expire.
    "ALTER TABLE predictions ADD COLUMN owner TEXT;
     ALTER TABLE predictions ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
     CREATE INDEX predictions_in_flight ON predictions (owner)
        WHERE status IN ('starting', 'processing');
     CREATE TABLE replicas (
        id TEXT PRIMARY KEY,
        started_at TEXT NOT NULL,
        lease_until_ms INTEGER NOT NULL
     );
     ALTER TABLE webhook_outbox ADD COLUMN claimed_until_ms INTEGER NOT NULL DEFAULT 0;",
    // 4: an index of uploaded files, so a listing reads a page, not every description
    // (filled from the descriptions at the upgrade); each delivery's destination host,
    // for the dispatcher's per-host cap.
    "CREATE TABLE files (
        id TEXT PRIMARY KEY,
        created_at TEXT NOT NULL
     );
     CREATE INDEX files_created ON files (created_at DESC, id DESC);
     ALTER TABLE webhook_outbox ADD COLUMN host TEXT NOT NULL DEFAULT '';",
    // 5: which upstream runs a prediction routed there, and its id there.
    "CREATE TABLE upstream_links (
        prediction_id TEXT PRIMARY KEY,
        upstream TEXT NOT NULL,
        upstream_id TEXT,
        create_sent_ms INTEGER NOT NULL
     );",
    // 6: listing by status newest first reads only that status's rows, in order.
    "CREATE INDEX predictions_status_created ON predictions (status, created_at DESC, id DESC);",
    // 7: listing by model newest first reads only that model's rows, in order (the
    // column filled from the records at the upgrade).
    "ALTER TABLE predictions ADD COLUMN model TEXT NOT NULL DEFAULT '';
     UPDATE predictions SET model = COALESCE(json_extract(record, '$.prediction.model'), '');
     CREATE INDEX predictions_model_created ON predictions (model, created_at DESC, id DESC);",
];

/// The schema version that added the files index (`files::index_existing` fills it).
const FILES_INDEXED: i64 = 4;

/// The synchronous database; `SqliteStore` runs it on the blocking pool.
pub(super) struct SqliteDb {
    conn: Mutex<Connection>,
    path: PathBuf,
    data_dir: PathBuf,
    replica: String,
    /// Fault injection for tests: every write fails while set.
    fail_writes: AtomicBool,
    /// Held until the store retires (a clean stop) or the process ends: one process
    /// per database.
    lock: Mutex<Option<std::fs::File>>,
}

/// The embedded store.
pub struct SqliteStore {
    db: Arc<SqliteDb>,
    replica: String,
}

impl SqliteStore {
    pub async fn open(path: &Path, data_dir: &Path) -> Result<Self, StoreError> {
        let (path, data_dir) = (path.to_path_buf(), data_dir.to_path_buf());
        let replica = crate::record::new_id();
        let r = replica.clone();
        let db = tokio::task::spawn_blocking(move || SqliteDb::open(&path, &data_dir, r))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        Ok(Self {
            db: Arc::new(db),
            replica,
        })
    }

    /// SQLite's query plan for a listing (`EXPLAIN QUERY PLAN`, a line per step): for
    /// tests that the listing's indexes are used.
    #[doc(hidden)]
    pub async fn explain_list(
        &self,
        cursor: Option<&str>,
        filter: &super::ListFilter,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let (c, f) = (cursor.map(str::to_string), filter.clone());
        self.run(move |db| db.explain_list(c.as_deref(), &f, limit))
            .await
    }

    /// Runs `f` on the blocking pool.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&SqliteDb) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

fn take_lock(path: &Path) -> Result<std::fs::File, StoreError> {
    use fs2::FileExt;
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)
        .map_err(|e| StoreError::Open {
            path: lock_path.clone(),
            reason: e.to_string(),
        })?;
    if file.try_lock_exclusive().is_err() {
        let holder = std::fs::read_to_string(&lock_path)
            .ok()
            .filter(|s| !s.trim().is_empty())
            .map(|s| format!("pid {}", s.trim()))
            .unwrap_or_else(|| "unknown pid".into());
        return Err(StoreError::Locked {
            path: path.to_path_buf(),
            holder,
        });
    }
    let _ = file.set_len(0);
    let _ = std::io::Write::write_all(&mut &file, std::process::id().to_string().as_bytes());
    Ok(file)
}

impl SqliteDb {
    fn open(path: &Path, data_dir: &Path, replica: String) -> Result<Self, StoreError> {
        let open_err = |e: rusqlite::Error| StoreError::Open {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let lock = take_lock(path)?;
        let conn = Connection::open(path).map_err(open_err)?;
        // The first statements are what notice a file that is not a database.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        // NORMAL under WAL: a committed transaction survives a process crash; only a
        // power cut can lose the last few.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        let found = migrate(&conn, path)?;
        if found < FILES_INDEXED {
            files::index_existing(&conn, &data_dir.join("files"))?;
        }
        // We hold the lock: no replica but this one is alive, so whatever an earlier
        // process left in flight is an orphan now.
        conn.execute("DELETE FROM replicas", []).map_err(open_err)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // Inputs and outputs are the users' data: the server's user alone reads them.
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        Ok(Self {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            replica,
            fail_writes: AtomicBool::new(false),
            lock: Mutex::new(Some(lock)),
        })
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>, StoreError> {
        self.conn.lock().map_err(|_| StoreError::Poisoned)
    }

    /// The connection, for a write.
    fn writer(&self) -> Result<std::sync::MutexGuard<'_, Connection>, StoreError> {
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(StoreError::Injected);
        }
        self.conn()
    }

    fn schema_version(&self) -> Result<i64, StoreError> {
        let conn = self.conn()?;
        Ok(current_version(&conn)?)
    }
}

fn current_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_version",
        [],
        |r| r.get(0),
    )
}

/// Migrates forward; returns the version the database had.
fn migrate(conn: &Connection, path: &Path) -> Result<i64, StoreError> {
    let open_err = |e: rusqlite::Error| StoreError::Open {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_version (
            version INTEGER PRIMARY KEY,
            applied_at TEXT NOT NULL
         );",
    )
    .map_err(open_err)?;
    let found = current_version(conn).map_err(open_err)?;
    let known = MIGRATIONS.len() as i64;
    if found > known {
        return Err(StoreError::TooNew {
            what: path.display().to_string(),
            found,
            known,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let version = i as i64 + 1;
        let apply = || -> rusqlite::Result<()> {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(sql)?;
            tx.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (?1, ?2)",
                rusqlite::params![version, crate::record::now_rfc3339()],
            )?;
            tx.commit()
        };
        apply().map_err(|e| StoreError::Open {
            path: path.to_path_buf(),
            reason: format!("migrating to schema version {version}: {e}"),
        })?;
        tracing::info!(version, "predictions database migrated");
    }
    Ok(found)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
