//! The predictions table: one JSON record per prediction, with the columns that
//! listing, ownership and recovery query.

use rusqlite::{params, Connection, OptionalExtension};

use super::{now_ms, SqliteDb};
use crate::record::Record;
use crate::store::{Delivery, ListFilter, Page, StoreError};

impl SqliteDb {
    pub(super) fn insert(&self, r: &Record) -> Result<(), StoreError> {
        let json = serde_json::to_string(r)?;
        let n = self.writer()?.execute(
            "INSERT INTO predictions (id, created_at, status, record, owner) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(id) DO NOTHING",
            params![
                r.prediction.id,
                r.prediction.created_at,
                r.prediction.status.as_str(),
                json,
                self.replica
            ],
        )?;
        if n == 0 {
            return Err(StoreError::Exists(r.prediction.id.clone()));
        }
        Ok(())
    }

    pub(super) fn put(&self, r: &Record) -> Result<(), StoreError> {
        put_on(&*self.writer()?, &self.replica, r)
    }

    pub(super) fn finish(
        &self,
        r: &Record,
        deliveries: &[Delivery],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let conn = self.writer()?;
        let tx = conn.unchecked_transaction()?;
        put_on(&tx, &self.replica, r)?;
        for d in deliveries {
            super::outbox::push_on(&tx, &d.item(), d.coalesce, now_ms)?;
        }
        tx.commit()?;
        Ok(())
    }

    pub(super) fn exists(&self, id: &str) -> Result<bool, StoreError> {
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

    pub(super) fn get(&self, id: &str) -> Result<Option<Record>, StoreError> {
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

    pub(super) fn list(
        &self,
        cursor: Option<&str>,
        filter: &ListFilter,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let (c_at, c_id) = match cursor.and_then(|c| c.split_once('|')) {
            Some((a, b)) => (a.to_string(), b.to_string()),
            None => ("\u{10FFFF}".to_string(), String::new()),
        };
        // ",succeeded,failed," (statuses hold no commas); empty keeps every status.
        let statuses: String = if filter.statuses.is_empty() {
            String::new()
        } else {
            filter
                .statuses
                .iter()
                .fold(",".to_string(), |s, st| s + st.as_str() + ",")
        };
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT created_at, id, record FROM predictions
             WHERE (created_at < ?1 OR (created_at = ?1 AND id < ?2 AND ?2 != ''))
               AND created_at > ?3 AND created_at < ?4
               AND (?6 = '' OR instr(?6, ',' || status || ',') > 0)
             ORDER BY created_at DESC, id DESC LIMIT ?5",
        )?;
        let rows = stmt.query_map(
            params![
                c_at,
                c_id,
                filter.created_after.as_deref().unwrap_or(""),
                filter.created_before.as_deref().unwrap_or("\u{10FFFF}"),
                (limit + 1) as i64,
                statuses
            ],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )?;
        let rows = rows.collect::<Result<Vec<(String, String, String)>, _>>()?;
        Ok(crate::store::page_from_rows(rows, limit))
    }

    pub(super) fn heartbeat(&self, lease_ms: i64) -> Result<(), StoreError> {
        self.writer()?.execute(
            "INSERT INTO replicas (id, started_at, lease_until_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT(id) DO UPDATE SET lease_until_ms = excluded.lease_until_ms",
            params![
                self.replica,
                crate::record::now_rfc3339(),
                now_ms() + lease_ms
            ],
        )?;
        Ok(())
    }

    /// Also lets another process open the database: this one has stopped.
    pub(super) fn retire(&self) -> Result<(), StoreError> {
        self.writer()?
            .execute("DELETE FROM replicas WHERE id = ?1", params![self.replica])?;
        if let Ok(mut lock) = self.lock.lock() {
            lock.take();
        }
        Ok(())
    }

    pub(super) fn claim_orphans(&self, limit: usize) -> Result<Vec<Record>, StoreError> {
        let conn = self.writer()?;
        let tx = conn.unchecked_transaction()?;
        let rows: Vec<(String, String)> = {
            let mut stmt = tx.prepare(
                "SELECT id, record FROM predictions
                 WHERE status IN ('starting', 'processing') AND owner IS NOT ?3
                   AND (owner IS NULL OR owner NOT IN
                        (SELECT id FROM replicas WHERE lease_until_ms > ?1))
                 LIMIT ?2",
            )?;
            let it = stmt.query_map(params![now_ms(), limit as i64, self.replica], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
            it.collect::<Result<_, _>>()?
        };
        let mut out = Vec::new();
        for (id, json) in rows {
            tx.execute(
                "UPDATE predictions SET owner = ?2 WHERE id = ?1",
                params![id, self.replica],
            )?;
            match serde_json::from_str::<Record>(&json) {
                Ok(r) => out.push(r),
                Err(e) => {
                    tracing::warn!(prediction = %id, error = %e, "an orphaned prediction cannot be decoded; marking its row failed");
                    tx.execute(
                        "UPDATE predictions SET status = 'failed' WHERE id = ?1",
                        params![id],
                    )?;
                }
            }
        }
        tx.commit()?;
        Ok(out)
    }

    pub(super) fn request_cancel(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.writer()?.execute(
            "UPDATE predictions SET cancel_requested = 1
             WHERE id = ?1 AND status IN ('starting', 'processing')",
            params![id],
        )? > 0)
    }

    pub(super) fn cancel_requests(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT id FROM predictions WHERE owner = ?1 AND cancel_requested = 1
               AND status IN ('starting', 'processing')",
        )?;
        let it = stmt.query_map(params![self.replica], |r| r.get(0))?;
        Ok(it.collect::<Result<_, _>>()?)
    }
}

/// Writes a prediction this replica owns, on the connection or inside a transaction.
fn put_on(conn: &Connection, replica: &str, r: &Record) -> Result<(), StoreError> {
    let json = serde_json::to_string(r)?;
    let n = conn.execute(
        "INSERT INTO predictions (id, created_at, status, record, owner) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(id) DO UPDATE SET status = excluded.status, record = excluded.record
         WHERE predictions.owner IS excluded.owner",
        params![
            r.prediction.id,
            r.prediction.created_at,
            r.prediction.status.as_str(),
            json,
            replica
        ],
    )?;
    if n == 0 {
        return Err(StoreError::NotOwner(r.prediction.id.clone()));
    }
    Ok(())
}
