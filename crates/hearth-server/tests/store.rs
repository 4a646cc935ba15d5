//! One suite, both stores: every case runs against SQLite and against a real
//! PostgreSQL (started by `support::postgres`). Cases about several replicas run on
//! PostgreSQL only; SQLite's own cases (one process, upgrades) are in store_sqlite.rs.

mod support;

use std::sync::Arc;
use std::time::Duration;

use hearth_server::record::{new_id, now_rfc3339, Status};
use hearth_server::store::{
    Delivery, ListFilter, OutboxItem, PgStore, SharedStore, SqliteStore, StoreError, UpstreamLink,
};
use serde_json::json;
use support::{postgres, record, TempDir};

/// A store of each kind; the SQLite one keeps its folder alive.
struct Backend {
    store: SharedStore,
    _dir: Option<TempDir>,
    /// PostgreSQL: the database, for a second replica on it.
    url: Option<String>,
}

async fn sqlite() -> Backend {
    let dir = TempDir::new("store");
    let store = SqliteStore::open(&dir.0.join("p.sqlite3"), &dir.0)
        .await
        .unwrap();
    std::fs::create_dir_all(dir.0.join("files")).unwrap();
    Backend {
        store: Arc::new(store),
        _dir: Some(dir),
        url: None,
    }
}

async fn pg() -> Option<Backend> {
    let url = postgres::fresh_database().await?;
    let store = PgStore::connect(&url).await.unwrap();
    Some(Backend {
        store: Arc::new(store),
        _dir: None,
        url: Some(url),
    })
}

/// Another replica on the same PostgreSQL database.
async fn replica(b: &Backend) -> SharedStore {
    Arc::new(PgStore::connect(b.url.as_ref().unwrap()).await.unwrap())
}

macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $( #[tokio::test] async fn $name() { super::$name(super::sqlite().await).await } )*
        }
        mod on_postgres {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { if let Some(b) = super::pg().await { super::$name(b).await } } )*
        }
    };
}

macro_rules! postgres_only {
    ($($name:ident),* $(,)?) => {
        mod replicas_on_postgres {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { if let Some(b) = super::pg().await { super::$name(b).await } } )*
        }
    };
}

both!(
    insert_is_atomic_and_never_overwrites,
    put_writes_changes_and_recreates_a_lost_row,
    list_pages_newest_first_with_filters,
    list_filters_by_status_in_the_store,
    list_searches_by_id_prefix_with_filters_and_pages,
    list_filters_by_model_in_the_store,
    outbox_keeps_order_coalesces_and_claims_one_head_per_prediction,
    outbox_events_are_opaque_and_cog_events_never_coalesce,
    outbox_drops_superseded_cog_states_and_keeps_completed_last,
    outbox_hosts_take_turns_under_a_per_host_cap,
    outbox_claims_expire_and_release,
    cancel_requests_reach_the_owner,
    webhook_secret_is_made_once,
    files_round_trip_in_pieces,
    injected_faults_fail_writes_not_reads,
    schema_is_current,
    upstream_links_are_written_and_replaced,
    finish_stores_the_end_and_its_webhooks_together_or_neither,
);

postgres_only!(
    replicas_share_predictions_and_fence_writes,
    orphans_are_claimed_once_and_only_after_the_lease,
    concurrent_outbox_claims_never_share_a_delivery,
    a_newer_schema_is_refused,
    the_status_listing_index_is_made_by_the_migration,
    the_model_listing_index_is_made_by_the_migration,
);

fn item<'a>(p: &'a str, msg: &'a str, event: &'a str, body: &'a str) -> OutboxItem<'a> {
    OutboxItem {
        prediction_id: p,
        msg_id: msg,
        url: "http://h/x",
        event,
        body,
        max_attempts: 3,
    }
}

fn item_to<'a>(
    p: &'a str,
    msg: &'a str,
    event: &'a str,
    body: &'a str,
    url: &'a str,
) -> OutboxItem<'a> {
    OutboxItem {
        url,
        ..item(p, msg, event, body)
    }
}

async fn outbox_drops_superseded_cog_states_and_keeps_completed_last(b: Backend) {
    use hearth_server::store::SUPERSEDED_AFTER;
    let s = b.store;
    let now = 1_000_000;
    // A receiver far behind: the start, then one output row per token (each the whole
    // output so far), then the end.
    let n = SUPERSEDED_AFTER * 4;
    s.outbox_push(&item("c", "start", "cog.start", "s"), false, now)
        .await
        .unwrap();
    let msgs: Vec<String> = (0..n).map(|i| format!("o{i}")).collect();
    for m in &msgs {
        s.outbox_push(&item("c", m, "cog.output", m), false, now)
            .await
            .unwrap();
    }
    s.outbox_push(&item("c", "end", "cog.completed", "done"), false, now)
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("done") {
        let rows = s.outbox_claim(now, 10).await.unwrap();
        assert_eq!(rows.len(), 1, "one at a time per prediction: {seen:?}");
        // Never more queued than the newest states and what is out.
        assert!(s.outbox_len().await.unwrap() <= SUPERSEDED_AFTER + 2);
        seen.push(rows[0].body.clone());
        s.outbox_remove(rows[0].seq).await.unwrap();
    }
    assert_eq!(seen[0], "s", "the start is kept");
    // The states delivered are in order, end with the newest output and `completed`.
    let outputs: Vec<usize> = seen[1..seen.len() - 1]
        .iter()
        .map(|b| b[1..].parse().unwrap())
        .collect();
    assert!(outputs.windows(2).all(|w| w[0] < w[1]), "{outputs:?}");
    assert_eq!(*outputs.last().unwrap(), n - 1);
    assert!(outputs.len() <= SUPERSEDED_AFTER + 1, "{}", outputs.len());
    // A receiver that keeps up (fewer queued than the bound) gets every state.
    for i in 0..4 {
        s.outbox_push(&item("k", &format!("k{i}"), "cog.output", "x"), false, now)
            .await
            .unwrap();
    }
    let mut got = 0;
    while let Some(r) = s.outbox_claim(now, 10).await.unwrap().pop() {
        got += 1;
        s.outbox_remove(r.seq).await.unwrap();
    }
    assert_eq!(got, 4);
}

async fn outbox_hosts_take_turns_under_a_per_host_cap(b: Backend) {
    use hearth_server::store::PER_HOST_IN_FLIGHT;
    let s = b.store;
    let now = 1_000_000;
    // A slow host with many predictions' deliveries queued first, then another host's.
    let slow: Vec<String> = (0..PER_HOST_IN_FLIGHT * 3)
        .map(|i| format!("slow{i}"))
        .collect();
    for p in &slow {
        s.outbox_push(
            &item_to(p, p, "completed", "b", "http://tarpit.example/h"),
            false,
            now,
        )
        .await
        .unwrap();
    }
    s.outbox_push(
        &item_to("fast", "f", "completed", "b", "http://fast.example/h"),
        false,
        now,
    )
    .await
    .unwrap();
    let first = s.outbox_claim(now, 4).await.unwrap();
    assert!(
        first.iter().any(|r| r.prediction_id == "fast"),
        "the other host waits behind the slow one's backlog"
    );
    let more = s.outbox_claim(now, 100).await.unwrap();
    let out_slow = first
        .iter()
        .chain(&more)
        .filter(|r| r.url.contains("tarpit"))
        .count();
    assert_eq!(out_slow, PER_HOST_IN_FLIGHT, "per-host cap");
    // One delivered: one more of that host may go out.
    s.outbox_remove(more[0].seq).await.unwrap();
    assert_eq!(s.outbox_claim(now, 100).await.unwrap().len(), 1);
}

async fn insert_is_atomic_and_never_overwrites(b: Backend) {
    let s = b.store;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = record("same", &now_rfc3339(), Status::Starting);
            r.prediction.logs = format!("writer {i}");
            s.insert(&r).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => ok += 1,
            Err(StoreError::Exists(id)) => assert_eq!(id, "same"),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(ok, 1, "exactly one insert wins");
    let stored = s.get("same").await.unwrap().unwrap();
    assert!(stored.prediction.logs.starts_with("writer "));
    assert!(s.exists("same").await.unwrap());
    assert!(!s.exists("other").await.unwrap());
    assert!(s.get("other").await.unwrap().is_none());
}

async fn put_writes_changes_and_recreates_a_lost_row(b: Backend) {
    let s = b.store;
    let mut r = record("p1", &now_rfc3339(), Status::Starting);
    s.insert(&r).await.unwrap();
    r.prediction.status = Status::Succeeded;
    r.prediction.output = Some(vec!["a".into(), "b".into()]);
    s.put(&r).await.unwrap();
    let got = s.get("p1").await.unwrap().unwrap().prediction;
    assert_eq!(got.status, Status::Succeeded);
    assert_eq!(got.output, Some(vec!["a".into(), "b".into()]));
    // A prediction whose first write was lost is created by the next.
    let lost = record("lost", &now_rfc3339(), Status::Processing);
    s.put(&lost).await.unwrap();
    assert_eq!(
        s.get("lost").await.unwrap().unwrap().prediction.status,
        Status::Processing
    );
}

async fn list_pages_newest_first_with_filters(b: Backend) {
    let s = b.store;
    for i in 0..7 {
        let at = format!("2026-01-01T00:00:0{i}.000000Z");
        s.insert(&record(&format!("id{i}"), &at, Status::Succeeded))
            .await
            .unwrap();
    }
    // Two with the same time: the id breaks the tie.
    s.insert(&record(
        "id7b",
        "2026-01-01T00:00:06.000000Z",
        Status::Succeeded,
    ))
    .await
    .unwrap();
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = s
            .list(cursor.as_deref(), &ListFilter::default(), 3)
            .await
            .unwrap();
        assert!(page.records.len() <= 3);
        seen.extend(page.records.iter().map(|r| r.prediction.id.clone()));
        match page.next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(
        seen,
        ["id7b", "id6", "id5", "id4", "id3", "id2", "id1", "id0"]
    );
    let mid = s
        .list(
            None,
            &ListFilter {
                created_after: Some("2026-01-01T00:00:01.000000Z".into()),
                created_before: Some("2026-01-01T00:00:04.000000Z".into()),
                ..ListFilter::default()
            },
            100,
        )
        .await
        .unwrap();
    let ids: Vec<_> = mid
        .records
        .iter()
        .map(|r| r.prediction.id.as_str())
        .collect();
    assert_eq!(ids, ["id3", "id2"]);
    assert!(mid.next.is_none());
}

/// The status filter is the store's: pages of the wanted statuses only, full pages
/// (not a page of everything thinned out afterwards), the cursor across them, and
/// with the time bounds at once.
async fn list_filters_by_status_in_the_store(b: Backend) {
    let s = b.store;
    let statuses = [
        Status::Succeeded,
        Status::Failed,
        Status::Processing,
        Status::Canceled,
        Status::Starting,
    ];
    for i in 0..20 {
        let at = format!("2026-01-01T00:00:{i:02}.000000Z");
        s.insert(&record(&format!("p{i:02}"), &at, statuses[i % 5]))
            .await
            .unwrap();
    }
    let pages = |wanted: Vec<Status>, after: Option<&str>| {
        let s = s.clone();
        let after = after.map(str::to_string);
        async move {
            let filter = ListFilter {
                statuses: wanted,
                created_after: after,
                ..ListFilter::default()
            };
            let (mut seen, mut sizes, mut cursor) = (Vec::new(), Vec::new(), None::<String>);
            loop {
                let page = s.list(cursor.as_deref(), &filter, 3).await.unwrap();
                sizes.push(page.records.len());
                seen.extend(page.records.iter().map(|r| r.prediction.id.clone()));
                match page.next {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
            (seen, sizes)
        }
    };
    let (failed, sizes) = pages(vec![Status::Failed], None).await;
    assert_eq!(failed, ["p16", "p11", "p06", "p01"]);
    assert_eq!(sizes, [3, 1], "full pages of failed ones only");
    let (running, _) = pages(vec![Status::Starting, Status::Processing], None).await;
    assert_eq!(
        running,
        ["p19", "p17", "p14", "p12", "p09", "p07", "p04", "p02"]
    );
    let (late, _) = pages(
        vec![Status::Succeeded, Status::Canceled],
        Some("2026-01-01T00:00:10.000000Z"),
    )
    .await;
    assert_eq!(late, ["p18", "p15", "p13"]);
    // A status changed by a later write is listed under the new one only.
    let mut r = s.get("p16").await.unwrap().unwrap();
    r.prediction.status = Status::Succeeded;
    s.put(&r).await.unwrap();
    let (failed, _) = pages(vec![Status::Failed], None).await;
    assert_eq!(failed, ["p11", "p06", "p01"]);
    let (all, _) = pages(Vec::new(), None).await;
    assert_eq!(all.len(), 20);
}

/// The console's filter by model: one model's predictions only (exact, case-sensitive:
/// `a/b` is not `a/bc` nor `A/b`), newest first, full pages across the cursor, with
/// the status filter and the id prefix at once.
async fn list_filters_by_model_in_the_store(b: Backend) {
    let s = b.store;
    let models = ["acme/chat", "acme/chatty", "ACME/chat", "hearth/demo"];
    for i in 0..16 {
        let at = format!("2026-01-01T00:00:{i:02}.000000Z");
        let status = if i % 3 == 0 {
            Status::Failed
        } else {
            Status::Succeeded
        };
        let mut r = record(&format!("m{i:02}"), &at, status);
        r.prediction.model = models[i % 4].into();
        s.insert(&r).await.unwrap();
    }
    let listed = |model: &str, statuses: Vec<Status>, prefix: Option<&str>, limit: usize| {
        let s = s.clone();
        let filter = ListFilter {
            model: Some(model.to_string()),
            statuses,
            id_prefix: prefix.map(str::to_string),
            ..ListFilter::default()
        };
        async move {
            let (mut seen, mut sizes, mut cursor) = (Vec::new(), Vec::new(), None::<String>);
            loop {
                let page = s.list(cursor.as_deref(), &filter, limit).await.unwrap();
                sizes.push(page.records.len());
                for r in &page.records {
                    assert_eq!(r.prediction.model, filter.model.clone().unwrap());
                    seen.push(r.prediction.id.clone());
                }
                match page.next {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
            (seen, sizes)
        }
    };
    let (chat, sizes) = listed("acme/chat", Vec::new(), None, 3).await;
    assert_eq!(chat, ["m12", "m08", "m04", "m00"]);
    assert_eq!(sizes, [3, 1], "full pages of the model's only");
    assert_eq!(
        listed("hearth/demo", Vec::new(), None, 10).await.0,
        ["m15", "m11", "m07", "m03"]
    );
    assert_eq!(
        listed("ACME/chat", Vec::new(), None, 10).await.0,
        ["m14", "m10", "m06", "m02"]
    );
    let (failed, _) = listed("acme/chat", vec![Status::Failed], None, 1).await;
    assert_eq!(failed, ["m12", "m00"]);
    assert_eq!(
        listed("acme/chatty", Vec::new(), Some("m0"), 10).await.0,
        ["m09", "m05", "m01"]
    );
    assert!(listed("acme/none", Vec::new(), None, 10).await.0.is_empty());
    // The model is the record's: a later write keeps it listed under it.
    let mut r = s.get("m04").await.unwrap().unwrap();
    r.prediction.status = Status::Canceled;
    s.put(&r).await.unwrap();
    assert_eq!(
        listed("acme/chat", vec![Status::Canceled], None, 10)
            .await
            .0,
        ["m04"]
    );
}

/// The console's search by id: ids that start with the prefix (case-sensitive, `_` and
/// `%` in it literal, not LIKE's wildcards), newest first, full pages across the
/// cursor, with the status filter at once.
async fn list_searches_by_id_prefix_with_filters_and_pages(b: Backend) {
    let s = b.store;
    let mut n = 0;
    let mut add = |id: String, status: Status| {
        n += 1;
        let at = format!("2026-01-01T00:00:{n:02}.000000Z");
        let s = s.clone();
        async move { s.insert(&record(&id, &at, status)).await.unwrap() }
    };
    for i in 0..7 {
        let st = if i % 2 == 0 {
            Status::Succeeded
        } else {
            Status::Failed
        };
        add(format!("abcd-{i}"), st).await;
    }
    for id in [
        "abce-0", "ABCD-0", "abc-d", "ab_d-0", "abxd-0", "abc%-0", "abcX-0",
    ] {
        add(id.to_string(), Status::Failed).await;
    }
    let search = |prefix: &str, statuses: Vec<Status>, limit: usize| {
        let s = s.clone();
        let filter = ListFilter {
            id_prefix: Some(prefix.to_string()),
            statuses,
            ..ListFilter::default()
        };
        async move {
            let (mut seen, mut sizes, mut cursor) = (Vec::new(), Vec::new(), None::<String>);
            loop {
                let page = s.list(cursor.as_deref(), &filter, limit).await.unwrap();
                sizes.push(page.records.len());
                seen.extend(page.records.iter().map(|r| r.prediction.id.clone()));
                match page.next {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
            (seen, sizes)
        }
    };
    let (all, sizes) = search("abcd", Vec::new(), 3).await;
    assert_eq!(
        all,
        ["abcd-6", "abcd-5", "abcd-4", "abcd-3", "abcd-2", "abcd-1", "abcd-0"]
    );
    assert_eq!(sizes, [3, 3, 1]);
    let (failed, sizes) = search("abcd", vec![Status::Failed], 2).await;
    assert_eq!(failed, ["abcd-5", "abcd-3", "abcd-1"]);
    assert_eq!(sizes, [2, 1], "full pages of the prefix's failed ones");
    assert_eq!(search("abcd-3", Vec::new(), 3).await.0, ["abcd-3"]);
    assert_eq!(search("ab_d", Vec::new(), 3).await.0, ["ab_d-0"]);
    assert_eq!(search("abc%", Vec::new(), 3).await.0, ["abc%-0"]);
    assert_eq!(search("ABCD", Vec::new(), 3).await.0, ["ABCD-0"]);
    assert_eq!(search("zzzz", Vec::new(), 3).await, (Vec::new(), vec![0]));
    let (none, _) = search("abce", vec![Status::Succeeded], 3).await;
    assert!(none.is_empty(), "{none:?}");
}

async fn outbox_keeps_order_coalesces_and_claims_one_head_per_prediction(b: Backend) {
    let s = b.store;
    let now = 1_000_000;
    s.outbox_push(&item("a", "m1", "start", "s"), false, now)
        .await
        .unwrap();
    s.outbox_push(&item("a", "m2", "output", "o1"), true, now)
        .await
        .unwrap();
    // Replaces the untried output rather than queueing behind it.
    s.outbox_push(&item("a", "m3", "output", "o2"), true, now)
        .await
        .unwrap();
    s.outbox_push(&item("a", "m4", "completed", "c"), false, now)
        .await
        .unwrap();
    s.outbox_push(&item("b", "n1", "completed", "bc"), false, now)
        .await
        .unwrap();
    assert_eq!(s.outbox_len().await.unwrap(), 4);
    // Not due yet.
    assert!(s.outbox_claim(now - 1, 10).await.unwrap().is_empty());
    let first = s.outbox_claim(now, 10).await.unwrap();
    let got: Vec<_> = first
        .iter()
        .map(|r| (r.prediction_id.as_str(), r.event.as_str()))
        .collect();
    assert_eq!(got, [("a", "start"), ("b", "completed")]);
    assert!(first.iter().all(|r| r.attempts == 1));
    // Heads are out: nothing more of a or b.
    assert!(s.outbox_claim(now, 10).await.unwrap().is_empty());
    // Due and not out: a's output and completed, waiting behind its start.
    assert_eq!(s.outbox_due(now).await.unwrap(), 2);
    s.outbox_remove(first[0].seq).await.unwrap();
    let next = s.outbox_claim(now, 10).await.unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(
        (next[0].event.as_str(), next[0].body.as_str()),
        ("output", "o2")
    );
    // A failed attempt is retried later, with the same message id.
    s.outbox_retry_at(next[0].seq, now + 500).await.unwrap();
    assert!(s.outbox_claim(now + 499, 10).await.unwrap().is_empty());
    let again = s.outbox_claim(now + 500, 10).await.unwrap();
    assert_eq!(again[0].msg_id, next[0].msg_id);
    assert_eq!(again[0].attempts, 2);
    s.outbox_remove(again[0].seq).await.unwrap();
    let last = s.outbox_claim(now + 500, 10).await.unwrap();
    assert_eq!(last[0].event, "completed");
    s.outbox_remove(last[0].seq).await.unwrap();
    s.outbox_remove(first[1].seq).await.unwrap();
    assert_eq!(s.outbox_len().await.unwrap(), 0);
}

/// The `event` column is the sender's string, kept as given: Cog-style deliveries
/// (`cog.output`, ...) are each delivered, so a push never replaces one, and a
/// Cog-style push asked to coalesce does not replace a Replicate-style one either.
async fn outbox_events_are_opaque_and_cog_events_never_coalesce(b: Backend) {
    let s = b.store;
    let now = 1_000_000;
    for (msg, body) in [("m1", "o1"), ("m2", "o2")] {
        s.outbox_push(&item("c", msg, "cog.output", body), true, now)
            .await
            .unwrap();
    }
    s.outbox_push(&item("c", "m3", "cog.logs", "l1"), true, now)
        .await
        .unwrap();
    s.outbox_push(&item("c", "m4", "cog.completed", "done"), false, now)
        .await
        .unwrap();
    // A Replicate-style output after a queued Cog one is a row of its own.
    s.outbox_push(&item("d", "n1", "cog.output", "x"), false, now)
        .await
        .unwrap();
    s.outbox_push(&item("d", "n2", "output", "y"), true, now)
        .await
        .unwrap();
    assert_eq!(s.outbox_len().await.unwrap(), 6);
    let mut seen = Vec::new();
    for _ in 0..6 {
        let rows = s.outbox_claim(now, 10).await.unwrap();
        assert!(!rows.is_empty(), "deliveries left: {seen:?}");
        for r in rows {
            seen.push((r.prediction_id.clone(), r.event.clone(), r.body.clone()));
            s.outbox_remove(r.seq).await.unwrap();
        }
        if seen.len() == 6 {
            break;
        }
    }
    let of = |p: &str| -> Vec<(String, String)> {
        seen.iter()
            .filter(|(id, _, _)| id == p)
            .map(|(_, e, b)| (e.clone(), b.clone()))
            .collect()
    };
    let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(e, b)| (e.to_string(), b.to_string()))
            .collect()
    };
    assert_eq!(
        of("c"),
        pairs(&[
            ("cog.output", "o1"),
            ("cog.output", "o2"),
            ("cog.logs", "l1"),
            ("cog.completed", "done")
        ])
    );
    assert_eq!(of("d"), pairs(&[("cog.output", "x"), ("output", "y")]));
}

async fn outbox_claims_expire_and_release(b: Backend) {
    let s = b.store;
    let now = 5_000_000;
    s.outbox_push(&item("p", "m1", "completed", "c"), false, now)
        .await
        .unwrap();
    assert_eq!(s.outbox_claim(now, 10).await.unwrap().len(), 1);
    assert!(s.outbox_claim(now + 1000, 10).await.unwrap().is_empty());
    // A claim whose replica died expires.
    let later = now + hearth_server::store::CLAIM_FOR.as_millis() as i64;
    let re = s.outbox_claim(later, 10).await.unwrap();
    assert_eq!(re.len(), 1);
    assert_eq!(re[0].attempts, 2);
    // Released: due again at once.
    assert_eq!(s.outbox_release_claims().await.unwrap(), 1);
    assert_eq!(s.outbox_claim(later, 10).await.unwrap().len(), 1);
}

async fn cancel_requests_reach_the_owner(b: Backend) {
    let s = b.store;
    s.insert(&record("run", &now_rfc3339(), Status::Processing))
        .await
        .unwrap();
    s.insert(&record("done", &now_rfc3339(), Status::Succeeded))
        .await
        .unwrap();
    assert!(s.cancel_requests().await.unwrap().is_empty());
    assert!(s.request_cancel("run").await.unwrap());
    assert!(
        !s.request_cancel("done").await.unwrap(),
        "finished: nothing to cancel"
    );
    assert!(!s.request_cancel("nope").await.unwrap());
    assert_eq!(s.cancel_requests().await.unwrap(), ["run"]);
    let mut r = s.get("run").await.unwrap().unwrap();
    r.prediction.status = Status::Canceled;
    s.put(&r).await.unwrap();
    assert!(s.cancel_requests().await.unwrap().is_empty());
}

async fn webhook_secret_is_made_once(b: Backend) {
    let s = b.store;
    let first = s.webhook_secret("whsec_AAAA").await.unwrap();
    assert_eq!(first, "whsec_AAAA");
    assert_eq!(s.webhook_secret("whsec_BBBB").await.unwrap(), "whsec_AAAA");
}

async fn files_round_trip_in_pieces(b: Backend) {
    use futures_util::StreamExt;
    let s = b.store;
    let tmp = std::env::temp_dir().join(format!("hearth-file-{}", new_id()));
    // Larger than one PostgreSQL chunk (1 MiB), not a multiple of it.
    let bytes: Vec<u8> = (0..2_500_000u32).map(|i| (i % 251) as u8).collect();
    let dir = match &b._dir {
        Some(d) => d.0.join("files").join(".upload-test"),
        None => tmp.clone(),
    };
    std::fs::write(&dir, &bytes).unwrap();
    let id = new_id();
    let meta = json!({"id": id, "name": "x.bin", "size": bytes.len(), "created_at": now_rfc3339()});
    s.file_put(&meta, &dir).await.unwrap();
    assert_eq!(s.file_meta(&id).await.unwrap().unwrap()["name"], "x.bin");
    assert!(s.file_meta("../../etc/passwd").await.unwrap().is_none());
    let mut got = Vec::new();
    let mut stream = s.file_read(&id).await.unwrap().unwrap();
    while let Some(chunk) = stream.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(got.len(), bytes.len());
    assert!(got == bytes, "the bytes come back as they went in");
    // Listed a page at a time, newest first, every file once.
    let mut ids = vec![id.clone()];
    for i in 0..4 {
        let path = match &b._dir {
            Some(d) => d.0.join("files").join(format!(".upload-{i}")),
            None => std::env::temp_dir().join(format!("hearth-file-{}", new_id())),
        };
        std::fs::write(&path, b"x").unwrap();
        let other = new_id();
        let at = format!("2030-01-01T00:00:0{i}.000000Z");
        s.file_put(&json!({"id": other, "created_at": at}), &path)
            .await
            .unwrap();
        ids.push(other);
    }
    let (mut seen, mut cursor, mut pages) = (Vec::new(), None::<String>, 0);
    loop {
        let page = s.file_list(cursor.as_deref(), 2).await.unwrap();
        assert!(page.files.len() <= 2);
        seen.extend(
            page.files
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_string()),
        );
        pages += 1;
        match page.next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let mut newest_first = ids[1..].to_vec();
    newest_first.reverse();
    newest_first.push(id.clone());
    assert_eq!(seen, newest_first);
    for other in &ids[1..] {
        assert!(s.file_delete(other).await.unwrap());
    }
    assert_eq!(s.file_list(None, 10).await.unwrap().files.len(), 1);
    assert!(s.file_delete(&id).await.unwrap());
    assert!(!s.file_delete(&id).await.unwrap());
    assert!(s.file_read(&id).await.unwrap().is_none());
    let _ = std::fs::remove_file(&tmp);
}

async fn injected_faults_fail_writes_not_reads(b: Backend) {
    let s = b.store;
    s.insert(&record("before", &now_rfc3339(), Status::Starting))
        .await
        .unwrap();
    s.inject_write_failures(true);
    let r = record("during", &now_rfc3339(), Status::Starting);
    assert!(matches!(s.insert(&r).await, Err(StoreError::Injected)));
    assert!(matches!(s.put(&r).await, Err(StoreError::Injected)));
    assert!(matches!(
        s.outbox_push(&item("x", "m", "start", "b"), false, 0).await,
        Err(StoreError::Injected)
    ));
    assert!(s.get("before").await.unwrap().is_some());
    s.inject_write_failures(false);
    s.put(&r).await.unwrap();
}

async fn upstream_links_are_written_and_replaced(b: Backend) {
    let s = &b.store;
    assert_eq!(s.upstream_link("p1").await.unwrap(), None);
    let mut link = UpstreamLink {
        prediction_id: "p1".into(),
        upstream: "hosted".into(),
        upstream_id: None,
        create_sent_ms: 1_700_000_000_123,
    };
    s.upstream_link_put(&link).await.unwrap();
    assert_eq!(s.upstream_link("p1").await.unwrap().as_ref(), Some(&link));
    link.upstream_id = Some("up-1".into());
    s.upstream_link_put(&link).await.unwrap();
    assert_eq!(s.upstream_link("p1").await.unwrap(), Some(link));
    assert_eq!(s.upstream_link("p2").await.unwrap(), None);
}

async fn schema_is_current(b: Backend) {
    let v = b.store.schema_version().await.unwrap();
    assert!(v >= 1, "{v}");
}

async fn replicas_share_predictions_and_fence_writes(b: Backend) {
    let a = b.store.clone();
    let other = replica(&b).await;
    assert_ne!(a.replica_id(), other.replica_id());
    a.heartbeat(Duration::from_secs(30)).await.unwrap();
    other.heartbeat(Duration::from_secs(30)).await.unwrap();
    let mut r = record("shared", &now_rfc3339(), Status::Processing);
    a.insert(&r).await.unwrap();
    // The other replica reads it, output as of the owner's last write.
    r.prediction.output = Some(vec!["tok".into()]);
    a.put(&r).await.unwrap();
    let seen = other.get("shared").await.unwrap().unwrap();
    assert_eq!(seen.prediction.output, Some(vec!["tok".into()]));
    // Only the owner writes it.
    assert!(matches!(other.put(&r).await, Err(StoreError::NotOwner(_))));
    // A cancel asked on the other replica reaches the owner, not the asker.
    assert!(other.request_cancel("shared").await.unwrap());
    assert!(other.cancel_requests().await.unwrap().is_empty());
    assert_eq!(a.cancel_requests().await.unwrap(), ["shared"]);
    // Live owner: nothing to claim.
    assert!(other.claim_orphans(10).await.unwrap().is_empty());
}

async fn orphans_are_claimed_once_and_only_after_the_lease(b: Backend) {
    let dead = b.store.clone();
    dead.heartbeat(Duration::from_millis(600)).await.unwrap();
    for i in 0..20 {
        let status = if i % 2 == 0 {
            Status::Processing
        } else {
            Status::Starting
        };
        dead.insert(&record(&format!("o{i}"), &now_rfc3339(), status))
            .await
            .unwrap();
    }
    dead.insert(&record("finished", &now_rfc3339(), Status::Succeeded))
        .await
        .unwrap();
    let s1 = replica(&b).await;
    let s2 = replica(&b).await;
    s1.heartbeat(Duration::from_secs(60)).await.unwrap();
    s2.heartbeat(Duration::from_secs(60)).await.unwrap();
    assert!(
        s1.claim_orphans(100).await.unwrap().is_empty(),
        "the lease is alive"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Two survivors sweep at once: each orphan goes to exactly one.
    let (x, y) = tokio::join!(s1.claim_orphans(7), s2.claim_orphans(7));
    let (mut x, mut y) = (x.unwrap(), y.unwrap());
    loop {
        let (more_x, more_y) = tokio::join!(s1.claim_orphans(7), s2.claim_orphans(7));
        let (more_x, more_y) = (more_x.unwrap(), more_y.unwrap());
        if more_x.is_empty() && more_y.is_empty() {
            break;
        }
        x.extend(more_x);
        y.extend(more_y);
    }

    let mut ids: Vec<String> = x
        .iter()
        .chain(y.iter())
        .map(|r| r.prediction.id.clone())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        x.len() + y.len(),
        20,
        "each orphan claimed once: {:?} / {:?}",
        x.iter().map(|r| &r.prediction.id).collect::<Vec<_>>(),
        y.iter().map(|r| &r.prediction.id).collect::<Vec<_>>()
    );
    assert_eq!(ids.len(), 20);
    // The dead replica, back from a pause, may not write them any more.
    let mut r = x.first().or(y.first()).unwrap().clone();
    r.prediction.status = Status::Succeeded;
    assert!(matches!(dead.put(&r).await, Err(StoreError::NotOwner(_))));
    // Its new owner may.
    let owner = if x.iter().any(|o| o.prediction.id == r.prediction.id) {
        &s1
    } else {
        &s2
    };
    owner.put(&r).await.unwrap();
}

async fn concurrent_outbox_claims_never_share_a_delivery(b: Backend) {
    let a = b.store.clone();
    let other = replica(&b).await;
    let now = 9_000_000;
    for p in 0..40 {
        for e in 0..5 {
            let (pid, msg) = (format!("p{p}"), format!("m{p}_{e}"));
            a.outbox_push(&item(&pid, &msg, "completed", "x"), false, now)
                .await
                .unwrap();
        }
    }
    let drain = |s: SharedStore| async move {
        let mut got = Vec::new();
        loop {
            let rows = s.outbox_claim(now, 8).await.unwrap();
            if rows.is_empty() && s.outbox_len().await.unwrap() == 0 {
                return got;
            }
            for r in rows {
                got.push(r.msg_id.clone());
                s.outbox_remove(r.seq).await.unwrap();
            }
            tokio::task::yield_now().await;
        }
    };
    let (x, y) = tokio::join!(drain(a.clone()), drain(other.clone()));
    let mut all: Vec<String> = x.iter().chain(y.iter()).cloned().collect();
    assert_eq!(all.len(), 200, "every delivery claimed");
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 200, "no delivery claimed twice");
    // Per prediction, in order.
    for list in [&x, &y] {
        for p in 0..40 {
            let mine: Vec<&String> = list
                .iter()
                .filter(|m| m.starts_with(&format!("m{p}_")))
                .collect();
            let mut sorted = mine.clone();
            sorted.sort();
            assert_eq!(mine, sorted);
        }
    }
}

async fn a_newer_schema_is_refused(b: Backend) {
    let url = b.url.clone().unwrap();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .execute(
            "INSERT INTO schema_version (version, applied_at) VALUES (99, 'future')",
            &[],
        )
        .await
        .unwrap();
    match PgStore::connect(&url).await {
        Err(e @ StoreError::TooNew { .. }) => {
            let m = e.to_string();
            assert!(m.contains("99") && m.contains("newer"), "{m}");
            assert!(!m.contains("password"), "{m}");
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("opened a newer schema"),
    }
}

/// The listing's index by status is made by a migration, so a database made before
/// it has it after the upgrade too.
async fn the_status_listing_index_is_made_by_the_migration(b: Backend) {
    let (client, conn) = tokio_postgres::connect(b.url.as_ref().unwrap(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let def: String = client
        .query_one(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'predictions_status_created'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(def.contains("(status, created_at DESC, id DESC)"), "{def}");
}

/// The listing's index by model, likewise.
async fn the_model_listing_index_is_made_by_the_migration(b: Backend) {
    let (client, conn) = tokio_postgres::connect(b.url.as_ref().unwrap(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let def: String = client
        .query_one(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'predictions_model_created'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(def.contains("(model, created_at DESC, id DESC)"), "{def}");
}

fn delivery(p: &str, msg: &str, event: &str, coalesce: bool) -> Delivery {
    Delivery {
        prediction_id: p.into(),
        msg_id: msg.into(),
        url: "http://h/x".into(),
        event: event.into(),
        body: format!("{{\"event\": \"{event}\"}}"),
        max_attempts: 3,
        coalesce,
    }
}

async fn finish_stores_the_end_and_its_webhooks_together_or_neither(b: Backend) {
    let s = b.store.clone();
    let mut r = record("fin", &now_rfc3339(), Status::Processing);
    s.insert(&r).await.unwrap();
    s.outbox_push(&item("fin", "m1", "output", "{}"), false, 0)
        .await
        .unwrap();
    r.prediction.status = Status::Succeeded;
    let hooks = [
        delivery("fin", "m2", "logs", true),
        delivery("fin", "m3", "completed", false),
    ];
    let unchanged = |s: SharedStore| async move {
        let stored = s.get("fin").await.unwrap().unwrap();
        assert_eq!(stored.prediction.status, Status::Processing);
        assert_eq!(s.outbox_len().await.unwrap(), 1);
    };
    // A failed write leaves both as they were.
    s.inject_write_failures(true);
    assert!(matches!(
        s.finish(&r, &hooks, 0).await,
        Err(StoreError::Injected)
    ));
    s.inject_write_failures(false);
    unchanged(s.clone()).await;
    // So does a replica that does not own the prediction: its webhooks are not queued.
    if b.url.is_some() {
        let other = replica(&b).await;
        assert!(matches!(
            other.finish(&r, &hooks, 0).await,
            Err(StoreError::NotOwner(_))
        ));
        unchanged(s.clone()).await;
    }
    s.finish(&r, &hooks, 0).await.unwrap();
    let stored = s.get("fin").await.unwrap().unwrap();
    assert_eq!(stored.prediction.status, Status::Succeeded);
    // The logs event replaced the untried output one; completed comes after it.
    let mut events = Vec::new();
    while let Some(row) = s.outbox_claim(i64::MAX / 2, 10).await.unwrap().pop() {
        events.push((row.msg_id.clone(), row.event.clone()));
        s.outbox_remove(row.seq).await.unwrap();
    }
    assert_eq!(
        events,
        [
            ("m1".to_string(), "logs".to_string()),
            ("m3".to_string(), "completed".to_string())
        ]
    );
}
