//! Where predictions, webhook deliveries and uploaded files are kept: one `Store`
//! trait, two backends. SQLite (the default) is one file in the data dir, used by one
//! process at a time. PostgreSQL is shared by any number of replicas behind a load
//! balancer: each prediction records the replica that runs it (its owner), owners
//! renew a lease, and a replica whose lease runs out has its predictions ended by the
//! others (`claim_orphans`).
//!
//! Both backends pass the same suite (`tests/store.rs`), migrate their schema forward
//! at open, and refuse a schema newer than they know.

mod postgres;
mod sqlite;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::record::Record;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

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
        "the predictions database {} is in use by another hearth process ({holder}). \
         SQLite serves one process: stop the other one, give this one its own --data-dir, \
         or run replicas on a shared PostgreSQL store (--store postgres://...)",
        path.display()
    )]
    Locked { path: PathBuf, holder: String },
    #[error(
        "the predictions database {what} has schema version {found}, newer than this \
         hearth knows ({known}): it was written by a newer release; run that release or \
         restore a backup made by this one"
    )]
    TooNew {
        what: String,
        found: i64,
        known: i64,
    },
    #[error("cannot connect to PostgreSQL at {target}: {reason}")]
    Connect { target: String, reason: String },
    #[error("--store {0:?}: expected sqlite:PATH or postgres://USER@HOST:PORT/DB")]
    BadSpec(String),
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database: {0}")]
    Postgres(String),
    #[error("stored prediction is corrupt: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("prediction {0} already exists")]
    Exists(String),
    /// Another replica took the prediction over (this one's lease had run out): this
    /// replica must not write it any more.
    #[error("prediction {0} is owned by another replica now")]
    NotOwner(String),
    #[error("the database lock was poisoned")]
    Poisoned,
    #[error("a database task failed: {0}")]
    Task(String),
    #[error("file storage: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "the webhook signing secret {}: {reason}. Receivers check signatures with it, so \
         hearth will not replace it: fix its permissions or contents (whsec_ and base64), \
         or remove it to have a new secret made (receivers then need the new one)",
        path.display()
    )]
    Secret { path: PathBuf, reason: String },
    #[error("injected write failure")]
    Injected,
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        // The database's own message (constraint, column) is what helps; the Display
        // of a server error is only "db error".
        match e.as_db_error() {
            Some(db) => StoreError::Postgres(format!("{}: {}", db.code().code(), db.message())),
            None => StoreError::Postgres(e.to_string()),
        }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => StoreError::Postgres(format!("connection pool: {other}")),
        }
    }
}

/// Which predictions a listing keeps: created strictly between the two times (RFC 3339
/// as stored), with one of `statuses` (empty: any), whose id starts with `id_prefix`
/// (case-sensitive, as ids are; the route bounds its length: `MIN_ID_PREFIX`), of
/// `model` (`owner/name` exactly, as the record names it).
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub created_after: Option<String>,
    pub created_before: Option<String>,
    pub statuses: Vec<crate::record::Status>,
    pub id_prefix: Option<String>,
    pub model: Option<String>,
}

/// The shortest id prefix a listing searches by: with a shorter one nearly every id
/// would match, and the page would be the unfiltered list (an exact id of any length
/// is still found by `GET /v1/predictions/{id}`).
pub const MIN_ID_PREFIX: usize = 4;

/// An id prefix as both stores match it: `id LIKE pattern ESCAPE '\'` (the prefix with
/// `%`, `_` and `\` escaped, then `%`) within the index range `[low, high)`, which
/// holds exactly the ids that start with the prefix byte for byte (keys compare
/// bytewise in both stores), so the primary key's index finds them.
pub(crate) struct IdPrefix {
    pub low: String,
    pub high: String,
    pub pattern: String,
}

impl IdPrefix {
    pub(crate) fn new(prefix: &str) -> Self {
        let mut pattern = String::with_capacity(prefix.len() + 1);
        for c in prefix.chars() {
            if matches!(c, '%' | '_' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push('%');
        IdPrefix {
            low: prefix.to_string(),
            // Above every id that starts with the prefix: no id holds U+10FFFF.
            high: format!("{prefix}\u{10FFFF}"),
            pattern,
        }
    }
}

/// One page of a listing, newest first.
pub struct Page {
    pub records: Vec<Record>,
    /// Cursor for the next (older) page.
    pub next: Option<String>,
}

/// A delivery to make.
pub struct OutboxItem<'a> {
    pub prediction_id: &'a str,
    /// The `webhook-id`: the same on every attempt.
    pub msg_id: &'a str,
    pub url: &'a str,
    pub event: &'a str,
    pub body: &'a str,
    pub max_attempts: u32,
}

/// A delivery decided but not yet queued (`Store::finish` queues it with the final
/// state); `coalesce` as in `Store::outbox_push`.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub prediction_id: String,
    pub msg_id: String,
    pub url: String,
    pub event: String,
    pub body: String,
    pub max_attempts: u32,
    pub coalesce: bool,
}

impl Delivery {
    pub fn item(&self) -> OutboxItem<'_> {
        OutboxItem {
            prediction_id: &self.prediction_id,
            msg_id: &self.msg_id,
            url: &self.url,
            event: &self.event,
            body: &self.body,
            max_attempts: self.max_attempts,
        }
    }
}

/// A delivery claimed for an attempt.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub seq: i64,
    pub prediction_id: String,
    pub msg_id: String,
    pub url: String,
    pub event: String,
    pub body: String,
    /// Attempts so far, this one included.
    pub attempts: u32,
    pub max_attempts: u32,
}

/// Where a prediction routed to an upstream runs there: written before its create is
/// sent (`upstream_id` None: the create may be in flight) and again once the upstream
/// has named it, so a restart resumes polling it (or resolves a create whose answer
/// was lost) instead of failing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamLink {
    pub prediction_id: String,
    /// The upstream's name (`--upstream NAME=URL`), never its URL or token.
    pub upstream: String,
    pub upstream_id: Option<String>,
    /// Unix milliseconds when the create was (about to be) sent: the window an
    /// ambiguous create is looked for in.
    pub create_sent_ms: i64,
}

/// An uploaded file's description, as `/v1/files` answers it (without `urls`).
pub type FileMeta = serde_json::Value;

/// One page of uploaded files, newest first.
#[derive(Default)]
pub struct FilePage {
    pub files: Vec<FileMeta>,
    /// Cursor for the next (older) page: the last file's `created_at|id`.
    pub next: Option<String>,
}

impl FilePage {
    /// A page from `(created_at, id, description)` rows, newest first, fetched with
    /// one row more than `limit`. A description that cannot be read is left out, not
    /// the page.
    pub(crate) fn from_rows(
        rows: impl IntoIterator<Item = (String, String, Option<FileMeta>)>,
        limit: usize,
    ) -> Self {
        let mut page = FilePage::default();
        let mut last_key = None;
        for (i, (created_at, id, meta)) in rows.into_iter().enumerate() {
            if i == limit {
                page.next = last_key;
                break;
            }
            page.files.extend(meta);
            last_key = Some(format!("{created_at}|{id}"));
        }
        page
    }
}

/// A listing cursor `created_at|id`, or the start.
pub(crate) fn split_cursor(cursor: Option<&str>) -> (String, String) {
    match cursor.and_then(|c| c.split_once('|')) {
        Some((a, b)) => (a.to_string(), b.to_string()),
        None => ("\u{10FFFF}".to_string(), String::new()),
    }
}

/// How long a claimed webhook delivery stays claimed. Past it (its replica died
/// mid-attempt) another replica may claim it again: longer than an attempt can take.
pub const CLAIM_FOR: Duration = Duration::from_secs(30);

/// Deliveries to one host (`host:port`) out at once at most, so a few slow receivers
/// cannot hold every dispatcher slot; hosts take turns for the rest.
pub const PER_HOST_IN_FLIGHT: usize = 8;

/// An intermediate delivery (output, logs) with this many newer ones of its
/// prediction queued is dropped at the next claim: each carries the prediction's whole
/// state so far, so a receiver far behind gets the latest state (and `completed`
/// last), while one that keeps up still gets every chunk.
pub const SUPERSEDED_AFTER: usize = 32;

#[async_trait]
pub trait Store: Send + Sync {
    /// For logs and errors: the file, or the server and database (never a password).
    fn describe(&self) -> String;
    /// Shared by several replicas: running predictions' output is written as it
    /// streams, cancels and orphans go through the store.
    fn is_shared(&self) -> bool;
    /// This process, as the owner of the predictions it runs.
    fn replica_id(&self) -> &str;
    /// Makes every write fail (or not) from now on: for fault tests.
    #[doc(hidden)]
    fn inject_write_failures(&self, on: bool);
    async fn schema_version(&self) -> Result<i64, StoreError>;

    /// Creates a prediction owned by this replica; an id that exists already is
    /// `Exists`, never overwritten, and of two concurrent inserts exactly one succeeds.
    async fn insert(&self, r: &Record) -> Result<(), StoreError>;
    /// Writes a change to a prediction this replica owns (or, when its first write
    /// was lost, creates it). `NotOwner` when another replica has taken it over.
    async fn put(&self, r: &Record) -> Result<(), StoreError>;
    /// `put` of a prediction's final state and the queueing of its last webhooks in one
    /// transaction: a crash between the two can lose neither the `completed` webhook of
    /// a stored end nor store an end whose webhook is queued.
    async fn finish(
        &self,
        r: &Record,
        deliveries: &[Delivery],
        now_ms: i64,
    ) -> Result<(), StoreError>;
    async fn exists(&self, id: &str) -> Result<bool, StoreError>;
    async fn get(&self, id: &str) -> Result<Option<Record>, StoreError>;
    /// Newest first, `limit` a page of those `filter` keeps; the cursor is the last
    /// row's `created_at|id`. A row that cannot be decoded is skipped with a warning
    /// rather than failing the page.
    async fn list(
        &self,
        cursor: Option<&str>,
        filter: &ListFilter,
        limit: usize,
    ) -> Result<Page, StoreError>;

    /// Registers this replica or renews its lease for `lease` from now.
    async fn heartbeat(&self, lease: Duration) -> Result<(), StoreError>;
    /// A clean stop: this replica's lease ends now (and SQLite lets another process
    /// open the database).
    async fn retire(&self) -> Result<(), StoreError>;
    /// Takes over (up to `limit`) predictions in flight whose owner's lease has run
    /// out, or that have no live owner: they are this replica's to end now.
    async fn claim_orphans(&self, limit: usize) -> Result<Vec<Record>, StoreError>;
    /// Asks the owner of a prediction in flight to cancel it. False when there is no
    /// such prediction in flight.
    async fn request_cancel(&self, id: &str) -> Result<bool, StoreError>;
    /// Predictions of this replica that another one asked to cancel.
    async fn cancel_requests(&self) -> Result<Vec<String>, StoreError>;

    /// Queues a delivery due at `now_ms`. With `coalesce`, an intermediate event
    /// replaces the prediction's last queued delivery when that is an intermediate one
    /// not yet tried.
    async fn outbox_push(
        &self,
        item: &OutboxItem<'_>,
        coalesce: bool,
        now_ms: i64,
    ) -> Result<(), StoreError>;
    /// Claims up to `limit` due deliveries for `CLAIM_FOR`: only the oldest of each
    /// prediction, and none of a prediction whose oldest is out; hosts in turn, none
    /// with more than `PER_HOST_IN_FLIGHT` out. First drops superseded intermediate
    /// deliveries (`SUPERSEDED_AFTER`). Claiming counts the attempt. Across replicas a
    /// delivery is claimed by one at a time.
    async fn outbox_claim(&self, now_ms: i64, limit: usize) -> Result<Vec<OutboxRow>, StoreError>;
    /// Delivered, or given up on.
    async fn outbox_remove(&self, seq: i64) -> Result<(), StoreError>;
    /// Failed for now: try again at `due_ms`.
    async fn outbox_retry_at(&self, seq: i64, due_ms: i64) -> Result<(), StoreError>;
    /// At start, with a store no other process uses: attempts the last process had out
    /// when it stopped are due again. (Shared stores let claims expire instead.)
    async fn outbox_release_claims(&self) -> Result<usize, StoreError>;
    /// Deliveries not yet made (claimed ones included).
    async fn outbox_len(&self) -> Result<usize, StoreError>;
    /// Deliveries due by `now_ms` and not out.
    async fn outbox_due(&self, now_ms: i64) -> Result<usize, StoreError>;

    /// The webhook signing secret every replica shares: the stored one, or `fresh`
    /// stored now when there is none.
    async fn webhook_secret(&self, fresh: &str) -> Result<String, StoreError>;

    /// Writes (or replaces) a prediction's link to the upstream that runs it.
    async fn upstream_link_put(&self, link: &UpstreamLink) -> Result<(), StoreError>;
    async fn upstream_link(&self, prediction_id: &str) -> Result<Option<UpstreamLink>, StoreError>;

    /// Keeps an uploaded file (its bytes at `path`, which the store may move) under
    /// `meta["id"]`.
    async fn file_put(&self, meta: &FileMeta, path: &std::path::Path) -> Result<(), StoreError>;
    async fn file_meta(&self, id: &str) -> Result<Option<FileMeta>, StoreError>;
    /// Newest first, `limit` a page; the cursor is the last file's `created_at|id`.
    async fn file_list(&self, cursor: Option<&str>, limit: usize) -> Result<FilePage, StoreError>;
    /// The file's bytes in order, a piece at a time.
    async fn file_read(&self, id: &str) -> Result<Option<FileStream>, StoreError>;
    async fn file_delete(&self, id: &str) -> Result<bool, StoreError>;
}

/// A file's bytes, streamed.
pub type FileStream =
    futures_util::stream::BoxStream<'static, Result<axum::body::Bytes, StoreError>>;

pub type SharedStore = Arc<dyn Store>;

/// A page from `(created_at, id, record JSON)` rows, newest first, fetched with one
/// row more than `limit` to tell whether there is a next page. A row that cannot be
/// decoded is skipped with a warning rather than failing the page.
fn page_from_rows(rows: Vec<(String, String, String)>, limit: usize) -> Page {
    let mut records = Vec::new();
    let mut last_key = None;
    let mut more = false;
    for (i, (created_at, id, json)) in rows.into_iter().enumerate() {
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
    Page {
        records,
        next: if more { last_key } else { None },
    }
}

/// Where the store is: `--store`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    Sqlite(PathBuf),
    Postgres(String),
}

impl StoreSpec {
    pub fn parse(s: &str) -> Result<Self, StoreError> {
        if let Some(p) = s.strip_prefix("sqlite:") {
            let p = p.strip_prefix("//").unwrap_or(p);
            if p.is_empty() {
                return Err(StoreError::BadSpec(s.into()));
            }
            return Ok(StoreSpec::Sqlite(PathBuf::from(p)));
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(StoreSpec::Postgres(s.into()));
        }
        Err(StoreError::BadSpec(s.into()))
    }
}

/// The outbox's `host` column: a delivery's destination as the dispatcher's per-host
/// cap counts it (`host:port`).
pub(crate) fn outbox_host(url: &str) -> String {
    reqwest::Url::parse(url)
        .ok()
        .and_then(|u| {
            let host = u.host_str()?.to_ascii_lowercase();
            Some(match u.port_or_known_default() {
                Some(p) => format!("{host}:{p}"),
                None => host,
            })
        })
        .unwrap_or_default()
}

/// Opens (and migrates) the store; `data_dir` is where SQLite keeps uploads (`files/`)
/// and the webhook secret.
pub async fn open(spec: &StoreSpec, data_dir: &std::path::Path) -> Result<SharedStore, StoreError> {
    Ok(match spec {
        StoreSpec::Sqlite(path) => Arc::new(SqliteStore::open(path, data_dir).await?),
        StoreSpec::Postgres(url) => Arc::new(PgStore::connect(url).await?),
    })
}

/// Writes a file only the server's user can read.
pub(crate) fn write_private(path: &std::path::Path, contents: &str) -> std::io::Result<()> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    std::io::Write::write_all(&mut o.open(path)?, contents.as_bytes())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Writes a private file whole or not at all: a temporary file beside it, synced to
/// disk, then renamed over it (and the folder synced), so a crash leaves the old
/// contents or the new, never a truncated file.
pub(crate) fn write_private_atomic(path: &std::path::Path, contents: &str) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", crate::record::new_id()));
    let written = (|| {
        write_private(&tmp, contents)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        #[cfg(unix)]
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// A webhook secret as Standard Webhooks has it: `whsec_` and the key in base64.
pub(crate) fn check_secret(s: &str) -> Result<(), &'static str> {
    use base64::Engine as _;
    let Some(key) = s.strip_prefix("whsec_") else {
        return Err("it does not start with whsec_");
    };
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(k) if !k.is_empty() => Ok(()),
        Ok(_) => Err("its key is empty"),
        Err(_) => Err("its key after whsec_ is not base64"),
    }
}

/// File ids are ours: 26 lowercase letters and digits (no path can hide in one).
pub fn valid_file_id(id: &str) -> bool {
    id.len() == 26
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

/// The id in a file's description; only ids the server made.
pub(crate) fn file_id(meta: &FileMeta) -> Result<String, StoreError> {
    meta["id"]
        .as_str()
        .filter(|id| valid_file_id(id))
        .map(str::to_string)
        .ok_or_else(|| StoreError::Io(std::io::Error::other("a file needs a valid id")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_prefixes_escape_like_wildcards() {
        let p = IdPrefix::new("a_b%c\\d");
        assert_eq!(p.pattern, "a\\_b\\%c\\\\d%");
        assert_eq!(p.low, "a_b%c\\d");
        assert!(p.high.starts_with("a_b%c\\d") && p.high.as_str() > "a_b%c\\dzzzz");
    }

    #[test]
    fn store_specs() {
        assert_eq!(
            StoreSpec::parse("sqlite:/x/p.db").unwrap(),
            StoreSpec::Sqlite("/x/p.db".into())
        );
        assert_eq!(
            StoreSpec::parse("sqlite:rel.db").unwrap(),
            StoreSpec::Sqlite("rel.db".into())
        );
        assert!(matches!(
            StoreSpec::parse("postgres://u@h:5432/d").unwrap(),
            StoreSpec::Postgres(_)
        ));
        for bad in ["", "sqlite:", "mysql://x", "/tmp/x.db"] {
            assert!(StoreSpec::parse(bad).is_err(), "{bad}");
        }
    }
}
