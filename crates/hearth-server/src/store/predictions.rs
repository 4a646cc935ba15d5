//! The predictions table: one JSON record per prediction, with the columns that
//! listing and recovery query.

use rusqlite::{params, OptionalExtension};
use serde_json::json;

use super::{Store, StoreError};
use crate::record::{Record, Status};

/// One page of a listing, newest first.
pub struct Page {
    pub records: Vec<Record>,
    /// Cursor for the next (older) page.
    pub next: Option<String>,
}

impl Store {
    /// Creates a prediction; an id that exists already is `Exists`, never overwritten,
    /// and of two concurrent inserts with one id exactly one succeeds.
    pub fn insert(&self, r: &Record) -> Result<(), StoreError> {
        let n = self.write(
            r,
            "INSERT INTO predictions (id, created_at, status, record) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(id) DO NOTHING",
        )?;
        if n == 0 {
            return Err(StoreError::Exists(r.prediction.id.clone()));
        }
        Ok(())
    }

    /// Writes a change to a prediction that exists (or, when its first write was lost,
    /// creates it).
    pub fn put(&self, r: &Record) -> Result<(), StoreError> {
        self.write(
            r,
            "INSERT INTO predictions (id, created_at, status, record) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(id) DO UPDATE SET status = excluded.status, record = excluded.record",
        )?;
        Ok(())
    }

    fn write(&self, r: &Record, sql: &str) -> Result<usize, StoreError> {
        let json = serde_json::to_string(r)?;
        Ok(self.writer()?.execute(
            sql,
            params![
                r.prediction.id,
                r.prediction.created_at,
                r.prediction.status.as_str(),
                json
            ],
        )?)
    }

    pub fn exists(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()?
            .query_row(
                "SELECT 1 FROM predictions WHERE id = ?1",
                params![id],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
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

    /// Newest first, `limit` a page; the cursor is the last row's `created_at|id`. A
    /// row that cannot be decoded is skipped with a warning rather than failing the page.
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
            "SELECT created_at, id, record FROM predictions
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
            |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                ))
            },
        )?;
        let mut records = Vec::new();
        let mut last_key = None;
        let mut more = false;
        for (i, row) in rows.enumerate() {
            let (created_at, id, json) = row?;
            if i == limit {
                more = true;
                break;
            }
            match serde_json::from_str::<Record>(&json) {
                Ok(r) => records.push(r),
                Err(e) => {
                    tracing::warn!(prediction = %id, error = %e, "skipping a stored prediction that cannot be decoded")
                }
            }
            last_key = Some(format!("{created_at}|{id}"));
        }
        Ok(Page {
            records,
            next: if more { last_key } else { None },
        })
    }

    /// At start: whatever was in flight when the last process died failed.
    pub fn fail_interrupted(&self, now: &str) -> Result<usize, StoreError> {
        let stale: Vec<(String, String)> = {
            let conn = self.conn()?;
            let mut stmt = conn.prepare(
                "SELECT id, record FROM predictions WHERE status IN ('starting', 'processing')",
            )?;
            let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let n = stale.len();
        for (id, json) in stale {
            let mut r: Record = match serde_json::from_str(&json) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(prediction = %id, error = %e, "an interrupted prediction cannot be decoded; marking its row failed");
                    self.writer()?.execute(
                        "UPDATE predictions SET status = 'failed' WHERE id = ?1",
                        params![id],
                    )?;
                    continue;
                }
            };
            let p = &mut r.prediction;
            p.error = Some(
                "the server stopped while this prediction was running; create it again".into(),
            );
            p.logs
                .push_str("Server restarted: prediction interrupted.\n");
            p.finish(Status::Failed, now);
            let total = p.seconds_since_created(now);
            let mut m = p.metrics.take().unwrap_or_else(|| json!({}));
            m["total_time"] = json!(total);
            if m.get("predict_time").is_none() {
                m["predict_time"] = json!(0.0);
            }
            p.metrics = Some(m);
            self.put(&r)?;
        }
        Ok(n)
    }
}
