//! The predictions table: one JSON record per prediction, with the columns that
//! listing, ownership and recovery query.

use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension};

use super::{now_ms, SqliteDb};
use crate::record::Record;
use crate::store::{Delivery, IdPrefix, ListFilter, Page, StoreError};

impl SqliteDb {
    pub(super) fn insert(&self, r: &Record) -> Result<(), StoreError> {
        let json = serde_json::to_string(r)?;
        let n = self.writer()?.execute(
            "INSERT INTO predictions (id, created_at, status, record, owner, model)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT(id) DO NOTHING",
            params![
                r.prediction.id,
                r.prediction.created_at,
                r.prediction.status.as_str(),
                json,
                self.replica,
                r.prediction.model
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
        let (sql, args) = list_query(cursor, filter, limit);
        let conn = self.conn()?;
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(params_from_iter(args), |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })?;
        let rows = rows.collect::<Result<Vec<(String, String, String)>, _>>()?;
        Ok(crate::store::page_from_rows(rows, limit))
    }

    /// SQLite's plan for `list` with these arguments, a line per step.
    pub(super) fn explain_list(
        &self,
        cursor: Option<&str>,
        filter: &ListFilter,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let (sql, args) = list_query(cursor, filter, limit);
        let conn = self.conn()?;
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
        let rows = stmt.query_map(params_from_iter(args), |row| row.get::<_, String>(3))?;
        Ok(rows.collect::<Result<_, _>>()?)
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
        "INSERT INTO predictions (id, created_at, status, record, owner, model)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT(id) DO UPDATE SET status = excluded.status, record = excluded.record
         WHERE predictions.owner IS excluded.owner",
        params![
            r.prediction.id,
            r.prediction.created_at,
            r.prediction.status.as_str(),
            json,
            replica,
            r.prediction.model
        ],
    )?;
    if n == 0 {
        return Err(StoreError::NotOwner(r.prediction.id.clone()));
    }
    Ok(())
}

/// The listing's statement and its arguments, with a condition only for what is asked,
/// each one an index can serve: the cursor as a row value (a seek into the order, not a
/// walk from the newest), `status IN (...)` on `predictions_status_created` (status,
/// created_at, id: a status's rows already in the listing's order) and an id prefix as
/// a range of the primary key, a model on `predictions_model_created` (model,
/// created_at, id: likewise in order).
fn list_query(cursor: Option<&str>, filter: &ListFilter, limit: usize) -> (String, Vec<Value>) {
    let mut args: Vec<Value> = vec![((limit + 1) as i64).into()];
    let mut conds: Vec<String> = Vec::new();
    if let Some((at, id)) = cursor.and_then(|c| c.split_once('|')) {
        let (at, id) = (arg(&mut args, at.into()), arg(&mut args, id.into()));
        conds.push(format!("(created_at, id) < ({at}, {id})"));
    }
    if let Some(after) = &filter.created_after {
        conds.push(format!("created_at > {}", arg(&mut args, after.clone())));
    }
    if let Some(before) = &filter.created_before {
        conds.push(format!("created_at < {}", arg(&mut args, before.clone())));
    }
    if !filter.statuses.is_empty() {
        let marks: Vec<String> = filter
            .statuses
            .iter()
            .map(|st| arg(&mut args, st.as_str().into()))
            .collect();
        // With an id prefix too, the prefix's range of the primary key is the one to
        // read (a few rows), not every row of the status: `+` keeps this term off an
        // index.
        let plus = if filter.id_prefix.is_some() || filter.model.is_some() {
            "+"
        } else {
            ""
        };
        conds.push(format!("{plus}status IN ({})", marks.join(", ")));
    }
    if let Some(model) = &filter.model {
        // With an id prefix too, the prefix's range is the smaller read.
        let plus = if filter.id_prefix.is_some() { "+" } else { "" };
        conds.push(format!("{plus}model = {}", arg(&mut args, model.clone())));
    }
    if let Some(prefix) = &filter.id_prefix {
        let p = IdPrefix::new(prefix);
        let (low, high) = (arg(&mut args, p.low), arg(&mut args, p.high));
        let pattern = arg(&mut args, p.pattern);
        conds.push(format!(
            "id >= {low} AND id < {high} AND id LIKE {pattern} ESCAPE '\\'"
        ));
    }
    let filter = if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    };
    let sql = format!(
        "SELECT created_at, id, record FROM predictions{filter} \
         ORDER BY created_at DESC, id DESC LIMIT ?1"
    );
    (sql, args)
}

/// Binds `v` as the next argument: its placeholder.
fn arg(args: &mut Vec<Value>, v: String) -> String {
    args.push(v.into());
    format!("?{}", args.len())
}
