//! The links of predictions routed to an upstream: hearth id → upstream id.

use rusqlite::{params, OptionalExtension};

use super::SqliteDb;
use crate::store::{StoreError, UpstreamLink};

impl SqliteDb {
    pub(super) fn upstream_link_put(&self, l: &UpstreamLink) -> Result<(), StoreError> {
        self.writer()?.execute(
            "INSERT INTO upstream_links (prediction_id, upstream, upstream_id, create_sent_ms)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(prediction_id) DO UPDATE SET upstream = excluded.upstream,
                upstream_id = excluded.upstream_id, create_sent_ms = excluded.create_sent_ms",
            params![l.prediction_id, l.upstream, l.upstream_id, l.create_sent_ms],
        )?;
        Ok(())
    }

    pub(super) fn upstream_link(&self, id: &str) -> Result<Option<UpstreamLink>, StoreError> {
        Ok(self
            .conn()?
            .query_row(
                "SELECT prediction_id, upstream, upstream_id, create_sent_ms
                 FROM upstream_links WHERE prediction_id = ?1",
                params![id],
                |r| {
                    Ok(UpstreamLink {
                        prediction_id: r.get(0)?,
                        upstream: r.get(1)?,
                        upstream_id: r.get(2)?,
                        create_sent_ms: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }
}
