//! Predictions on disk: an embedded SQLite database in WAL mode. A prediction is
//! written when it is created, when it starts and when it ends, so a crash (even
//! kill -9) loses no finished prediction; one left in flight is marked failed at the
//! next start.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

use crate::prediction::Record;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored prediction is corrupt: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("the database lock was poisoned")]
    Poisoned,
}

pub struct Store {
    conn: Mutex<Connection>,
}

/// One page of a listing, newest first.
pub struct Page {
    pub records: Vec<Record>,
    /// Cursor for the next (older) page.
    pub next: Option<String>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // NORMAL under WAL: a committed transaction survives a process crash; only a
        // power cut can lose the last few.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS predictions (
                id TEXT PRIMARY KEY,
                created_at TEXT NOT NULL,
                status TEXT NOT NULL,
                record TEXT NOT NULL
             );
             CREATE INDEX IF NOT EXISTS predictions_created ON predictions (created_at DESC, id DESC);",
        )?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>, StoreError> {
        self.conn.lock().map_err(|_| StoreError::Poisoned)
    }

    pub fn put(&self, r: &Record) -> Result<(), StoreError> {
        let json = serde_json::to_string(r)?;
        self.conn()?.execute(
            "INSERT INTO predictions (id, created_at, status, record) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(id) DO UPDATE SET status = excluded.status, record = excluded.record",
            params![
                r.prediction.id,
                r.prediction.created_at,
                r.prediction.status.as_str(),
                json
            ],
        )?;
        Ok(())
    }

    pub fn get(&self, id: &str) -> Result<Option<Record>, StoreError> {
        let json: Option<String> = self
            .conn()?
            .query_row(
                "SELECT record FROM predictions WHERE id = ?1",
                params![id],
                |row| row.get(0),
            )
            .optional()?;
        Ok(match json {
            Some(j) => Some(serde_json::from_str(&j)?),
            None => None,
        })
    }

    /// Newest first, `limit` a page; the cursor is the last row's `created_at|id`.
    pub fn list(
        &self,
        cursor: Option<&str>,
        created_after: Option<&str>,
        created_before: Option<&str>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let (c_at, c_id) = match cursor.and_then(|c| c.split_once('|')) {
            Some((a, b)) => (a.to_string(), b.to_string()),
            None => ("\u{10FFFF}".to_string(), String::new()),
        };
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT record FROM predictions
             WHERE (created_at < ?1 OR (created_at = ?1 AND id < ?2 AND ?2 != ''))
               AND created_at > ?3 AND created_at < ?4
             ORDER BY created_at DESC, id DESC LIMIT ?5",
        )?;
        let rows = stmt.query_map(
            params![
                c_at,
                c_id,
                created_after.unwrap_or(""),
                created_before.unwrap_or("\u{10FFFF}"),
                (limit + 1) as i64
            ],
            |row| row.get::<_, String>(0),
        )?;
        let mut records = Vec::new();
        for r in rows {
            records.push(serde_json::from_str::<Record>(&r?)?);
        }
        let next = if records.len() > limit {
            records.truncate(limit);
            records
                .last()
                .map(|r| format!("{}|{}", r.prediction.created_at, r.prediction.id))
        } else {
            None
        };
        Ok(Page { records, next })
    }

    /// At start: whatever was in flight when the last process died failed.
    pub fn fail_interrupted(&self, now: &str) -> Result<usize, StoreError> {
        let stale: Vec<String> = {
            let conn = self.conn()?;
            let mut stmt = conn.prepare(
                "SELECT record FROM predictions WHERE status IN ('starting', 'processing')",
            )?;
            let rows = stmt.query_map([], |row| row.get::<_, String>(0))?;
            rows.collect::<Result<_, _>>()?
        };
        let n = stale.len();
        for json in stale {
            let mut r: Record = serde_json::from_str(&json)?;
            r.prediction.status = crate::prediction::Status::Failed;
            r.prediction.error = Some(
                "the server stopped while this prediction was running; create it again".into(),
            );
            r.prediction.completed_at = Some(now.to_string());
            r.prediction
                .logs
                .push_str("Server restarted: prediction interrupted.\n");
            self.put(&r)?;
        }
        Ok(n)
    }
}
