//! Predictions and webhook deliveries on disk: an embedded SQLite database in WAL mode.
//! A prediction is written when it is created, when it starts and when it ends, so a
//! crash (even kill -9) loses no finished prediction; one left in flight is marked
//! failed at the next start. The schema is versioned and migrated forward at open.

mod outbox;
mod predictions;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use rusqlite::Connection;

pub use outbox::{OutboxItem, OutboxRow};
pub use predictions::Page;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot use the predictions database {}: {reason}. If the file is damaged, stop \
         hearth and move it aside (hearth creates a new one at the next start) or restore \
         it from a backup; if it is a permissions problem, give the server's user read and \
         write access to it and its folder",
        path.display()
    )]
    Open { path: PathBuf, reason: String },
    #[error(
        "the predictions database {} has schema version {found}, newer than this hearth \
         knows ({known}): it was written by a newer release; run that release or restore \
         a backup made by this one",
        path.display()
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored prediction is corrupt: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("prediction {0} already exists")]
    Exists(String),
    #[error("the database lock was poisoned")]
    Poisoned,
    #[error("injected write failure")]
    Injected,
}

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
];

pub struct Store {
    conn: Mutex<Connection>,
    /// Fault injection for tests: every write fails while set.
    fail_writes: AtomicBool,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |e: rusqlite::Error| StoreError::Open {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
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
        migrate(&conn, path)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // Inputs and outputs are the users' data: the server's user alone reads them.
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        Ok(Self {
            conn: Mutex::new(conn),
            fail_writes: AtomicBool::new(false),
        })
    }

    /// Makes every write fail (or not) from now on: for fault tests.
    #[doc(hidden)]
    pub fn inject_write_failures(&self, on: bool) {
        self.fail_writes.store(on, Ordering::SeqCst);
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

    /// The schema version this database is at.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
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

fn migrate(conn: &Connection, path: &Path) -> Result<(), StoreError> {
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
            path: path.to_path_buf(),
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
    Ok(())
}
