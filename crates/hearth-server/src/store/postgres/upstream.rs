//! The links of predictions routed to an upstream: hearth id → upstream id.

use super::PgStore;
use crate::store::{StoreError, UpstreamLink};

impl PgStore {
    pub(super) async fn upstream_link_put(&self, l: &UpstreamLink) -> Result<(), StoreError> {
        let c = self.writer().await?;
        let st = c
            .prepare_cached(
                "INSERT INTO upstream_links (prediction_id, upstream, upstream_id, create_sent_ms)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (prediction_id) DO UPDATE SET upstream = excluded.upstream,
                    upstream_id = excluded.upstream_id, create_sent_ms = excluded.create_sent_ms",
            )
            .await?;
        c.execute(
            &st,
            &[
                &l.prediction_id,
                &l.upstream,
                &l.upstream_id,
                &l.create_sent_ms,
            ],
        )
        .await?;
        Ok(())
    }

    pub(super) async fn upstream_link(&self, id: &str) -> Result<Option<UpstreamLink>, StoreError> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "SELECT prediction_id, upstream, upstream_id, create_sent_ms
                 FROM upstream_links WHERE prediction_id = $1",
            )
            .await?;
        Ok(c.query_opt(&st, &[&id]).await?.map(|r| UpstreamLink {
            prediction_id: r.get(0),
            upstream: r.get(1),
            upstream_id: r.get(2),
            create_sent_ms: r.get(3),
        }))
    }
}
