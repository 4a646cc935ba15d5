//! SQLite's own cases: one process per database, the orphans an earlier process
//! left, and an upgrade from the schema of the release before replicas.

mod support;

use std::time::Duration;

use hearth_server::record::{now_rfc3339, Status};
use hearth_server::store::{ListFilter, SqliteStore, Store};
use support::{record, TempDir};

#[tokio::test]
async fn a_second_process_on_one_sqlite_file_is_refused_until_the_first_stops() {
    let dir = TempDir::new("lock");
    let path = dir.0.join("p.sqlite3");
    let first = SqliteStore::open(&path, &dir.0).await.unwrap();
    let e = match SqliteStore::open(&path, &dir.0).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("two stores on one SQLite file"),
    };
    assert!(e.contains("in use by another hearth process"), "{e}");
    assert!(e.contains("postgres://"), "{e}");
    first.retire().await.unwrap();
    // A child process another test forks at this moment holds a copy of the lock's
    // descriptor until it execs: allow it that instant.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while let Err(e) = SqliteStore::open(&path, &dir.0).await {
        assert!(std::time::Instant::now() < deadline, "{e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn sqlite_orphans_of_an_earlier_process_are_claimed_at_open() {
    let dir = TempDir::new("orphans");
    let path = dir.0.join("p.sqlite3");
    let first = SqliteStore::open(&path, &dir.0).await.unwrap();
    first.heartbeat(Duration::from_secs(60)).await.unwrap();
    first
        .insert(&record("left", &now_rfc3339(), Status::Processing))
        .await
        .unwrap();
    assert!(first.claim_orphans(10).await.unwrap().is_empty(), "its own");
    drop(first); // as a crash would: the lease is still on the books
    let second = SqliteStore::open(&path, &dir.0).await.unwrap();
    let got = second.claim_orphans(10).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].prediction.id, "left");
}

#[tokio::test]
async fn a_database_of_the_previous_release_migrates_and_its_interrupted_rows_are_orphans() {
    let dir = TempDir::new("v2");
    let path = dir.0.join("p.sqlite3");
    // Schema version 2, as the release before replicas left it, with a prediction in
    // flight (no owner column yet) and a claimed delivery.
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch(
        "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL);
         INSERT INTO schema_version VALUES (1, 'then'), (2, 'then');
         CREATE TABLE predictions (id TEXT PRIMARY KEY, created_at TEXT NOT NULL,
            status TEXT NOT NULL, record TEXT NOT NULL);
         CREATE INDEX predictions_created ON predictions (created_at DESC, id DESC);
         CREATE TABLE webhook_outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT,
            prediction_id TEXT NOT NULL, msg_id TEXT NOT NULL, url TEXT NOT NULL,
            event TEXT NOT NULL, body TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
            max_attempts INTEGER NOT NULL, claimed INTEGER NOT NULL DEFAULT 0,
            due_unix_ms INTEGER NOT NULL);
         INSERT INTO webhook_outbox (prediction_id, msg_id, url, event, body, attempts,
            max_attempts, claimed, due_unix_ms) VALUES ('old', 'm', 'http://h/x', 'completed', '{}', 1, 12, 1, 0);",
    )
    .unwrap();
    let r = record("old", &now_rfc3339(), Status::Processing);
    c.execute(
        "INSERT INTO predictions VALUES ('old', ?1, 'processing', ?2)",
        rusqlite::params![r.prediction.created_at, serde_json::to_string(&r).unwrap()],
    )
    .unwrap();
    drop(c);
    // An upload of that release: indexed at the upgrade, so it is listed.
    let fid = "a".repeat(26);
    std::fs::create_dir_all(dir.0.join("files")).unwrap();
    std::fs::write(
        dir.0.join("files").join(format!("{fid}.json")),
        format!(r#"{{"id": "{fid}", "created_at": "2025-01-01T00:00:00.000000Z"}}"#),
    )
    .unwrap();
    let s = SqliteStore::open(&path, &dir.0).await.unwrap();
    assert_eq!(s.schema_version().await.unwrap(), 7);
    // The model column is filled from the records at the upgrade: the old row is
    // listed under its model, on the model's index.
    let by_model = ListFilter {
        model: Some("hearth/demo".into()),
        ..ListFilter::default()
    };
    let listed = s.list(None, &by_model, 10).await.unwrap();
    assert_eq!(listed.records.len(), 1);
    let plan = s.explain_list(None, &by_model, 100).await.unwrap();
    assert!(
        plan.iter().any(|l| l.contains("predictions_model_created")),
        "{plan:?}"
    );
    // The listing's index by status came with the upgrade.
    let plan = s
        .explain_list(None, &by_status(&[Status::Failed]), 100)
        .await
        .unwrap();
    assert!(
        plan.iter()
            .any(|l| l.contains("predictions_status_created")),
        "{plan:?}"
    );
    let files = s.file_list(None, 10).await.unwrap().files;
    assert_eq!(files.len(), 1);
    assert_eq!(files[0]["id"], fid.as_str());
    s.heartbeat(Duration::from_secs(60)).await.unwrap();
    let orphans = s.claim_orphans(10).await.unwrap();
    assert_eq!(orphans.len(), 1);
    assert_eq!(orphans[0].prediction.id, "old");
    // The delivery the old process had out is due again after the release at start.
    assert_eq!(s.outbox_release_claims().await.unwrap(), 1);
    assert_eq!(s.outbox_claim(1, 10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_present_but_invalid_webhook_secret_is_an_error_naming_the_file_not_replaced() {
    let dir = TempDir::new("secret");
    let path = dir.0.join("p.sqlite3");
    let secret = dir.0.join("webhook_secret");
    let s = SqliteStore::open(&path, &dir.0).await.unwrap();
    // None yet: made, written whole (no temporary file left beside it).
    let made = s
        .webhook_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
        .await
        .unwrap();
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), made);
    let names: Vec<String> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("webhook_secret"))
        .collect();
    assert_eq!(names, vec!["webhook_secret"]);
    for garbage in ["not a secret\n", "whsec_%%%%\n", ""] {
        std::fs::write(&secret, garbage).unwrap();
        let e = s
            .webhook_secret("whsec_BBBB")
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(&secret.display().to_string()), "{e}");
        assert_eq!(
            std::fs::read_to_string(&secret).unwrap(),
            garbage,
            "replaced"
        );
    }
    // Unreadable (a folder where the file should be): an error too, not a new secret.
    std::fs::remove_file(&secret).unwrap();
    std::fs::create_dir(&secret).unwrap();
    let e = s
        .webhook_secret("whsec_BBBB")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot read it"), "{e}");
    s.retire().await.unwrap();
}

fn by_status(statuses: &[Status]) -> ListFilter {
    ListFilter {
        statuses: statuses.to_vec(),
        ..ListFilter::default()
    }
}

/// The listing's filters are ones SQLite's indexes serve, as its query plan shows: a
/// status on `predictions_status_created` (one status: already in the listing's order,
/// no sort), the cursor a seek into it, an id prefix a range of the primary key, a
/// model on `predictions_model_created` (likewise in order); no
/// filter ever scans the whole table.
#[tokio::test]
async fn the_listing_filters_use_indexes() {
    let dir = TempDir::new("plan");
    let s = SqliteStore::open(&dir.0.join("p.sqlite3"), &dir.0)
        .await
        .unwrap();
    for i in 0..50 {
        let status = [Status::Succeeded, Status::Failed, Status::Processing][i % 3];
        let at = format!("2026-01-01T00:00:{i:02}.000000Z");
        s.insert(&record(&format!("p{i:02}"), &at, status))
            .await
            .unwrap();
    }
    let plan = |cursor: Option<&'static str>, filter: ListFilter| {
        let s = &s;
        async move {
            let plan = s.explain_list(cursor, &filter, 100).await.unwrap();
            assert!(
                !plan.iter().any(|l| l.starts_with("SCAN predictions")),
                "a full scan: {plan:?}"
            );
            plan
        }
    };
    let one = plan(None, by_status(&[Status::Failed])).await;
    assert!(
        one.iter()
            .any(|l| l.contains("USING INDEX predictions_status_created (status=?")),
        "{one:?}"
    );
    assert!(!one.iter().any(|l| l.contains("TEMP B-TREE")), "{one:?}");
    let paged = plan(
        Some("2026-01-01T00:00:30.000000Z|p30"),
        by_status(&[Status::Failed]),
    )
    .await;
    assert!(
        paged
            .iter()
            .any(|l| l.contains("predictions_status_created (status=? AND")),
        "the cursor seeks: {paged:?}"
    );
    let two = plan(None, by_status(&[Status::Starting, Status::Processing])).await;
    assert!(
        two.iter().any(|l| l.contains("predictions_status_created")),
        "{two:?}"
    );
    let prefix = plan(
        None,
        ListFilter {
            id_prefix: Some("p1_x".into()),
            ..by_status(&[Status::Failed])
        },
    )
    .await;
    assert!(
        prefix
            .iter()
            .any(|l| l.contains("USING INDEX sqlite_autoindex_predictions_1 (id>? AND id<?)")),
        "{prefix:?}"
    );
    // A model: its own index, in the listing's order (no sort), with a status too.
    let model = |statuses: &[Status]| ListFilter {
        model: Some("hearth/demo".into()),
        ..by_status(statuses)
    };
    for f in [model(&[]), model(&[Status::Failed])] {
        let p = plan(None, f).await;
        assert!(
            p.iter()
                .any(|l| l.contains("USING INDEX predictions_model_created (model=?")),
            "{p:?}"
        );
        assert!(!p.iter().any(|l| l.contains("TEMP B-TREE")), "{p:?}");
    }
    let paged = plan(Some("2026-01-01T00:00:30.000000Z|p30"), model(&[])).await;
    assert!(
        paged
            .iter()
            .any(|l| l.contains("predictions_model_created (model=? AND")),
        "the cursor seeks: {paged:?}"
    );
    // And the plans answer what they should.
    let page = s
        .list(
            Some("2026-01-01T00:00:30.000000Z|p30"),
            &by_status(&[Status::Failed]),
            3,
        )
        .await
        .unwrap();
    let ids: Vec<&str> = page
        .records
        .iter()
        .map(|r| r.prediction.id.as_str())
        .collect();
    assert_eq!(ids, ["p28", "p25", "p22"]);
}
