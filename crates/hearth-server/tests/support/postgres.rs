//! A real PostgreSQL for the tests: Debian's binaries, `initdb` in a temp dir, a free
//! port on loopback (another if it was taken before PostgreSQL bound it), run as an unprivileged user (`postgres` when the tests run as
//! root, since PostgreSQL refuses root). One server per test binary, a fresh database
//! per test. The server lives as long as the test process: a shell between them stops
//! it and removes its folder when the test process's end closes its stdin, however
//! the process ends.
//!
//! `HEARTH_TEST_POSTGRES=postgres://...` uses a server you run instead. Without
//! PostgreSQL installed the Postgres cases are skipped with a note, except under CI
//! (`CI` set), where they fail: CI must run them.
#![allow(dead_code)]

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

#[path = "ports.rs"]
pub mod ports;

pub struct Postgres {
    /// `postgres://postgres@127.0.0.1:PORT` (add `/DB`).
    pub base: String,
    _child: Option<Child>,
}

static SERVER: OnceLock<Result<Postgres, String>> = OnceLock::new();

const SCRIPT: &str = r#"
set -e
bin=$1 port=$2
dir=$(mktemp -d "${TMPDIR:-/tmp}/hearth-pg.XXXXXX")
trap 'rm -rf "$dir"' EXIT
"$bin/initdb" -D "$dir/data" -A trust -U postgres -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 \
  || { cat "$dir/initdb.log" >&2; exit 1; }
"$bin/postgres" -D "$dir/data" -p "$port" -k "$dir" -c listen_addresses=127.0.0.1 \
  -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300 \
  >"$dir/server.log" 2>&1 &
pid=$!
i=0
# Asked on its socket in our own folder, made after its TCP port is bound: never
# another server that holds the port.
until "$bin/pg_isready" -q -h "$dir" -p "$port"; do
  i=$((i + 1))
  if [ $i -gt 300 ] || ! kill -0 $pid 2>/dev/null; then cat "$dir/server.log" >&2; exit 1; fi
  sleep 0.1
done
echo ready
read -r _ || true
kill -INT $pid 2>/dev/null || true
wait $pid 2>/dev/null || true
"#;

/// Where Debian keeps the server binaries: `HEARTH_PG_BINDIR`, else the newest
/// `/usr/lib/postgresql/N/bin`, else `pg_config --bindir`.
pub fn bindir() -> Option<std::path::PathBuf> {
    if let Ok(d) = std::env::var("HEARTH_PG_BINDIR") {
        return Some(d.into());
    }
    let mut found: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    if let Some((_, b)) = found.pop() {
        return Some(b);
    }
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    let d = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    d.join("postgres").exists().then_some(d)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn start() -> Result<Postgres, String> {
    if let Ok(url) = std::env::var("HEARTH_TEST_POSTGRES") {
        return Ok(Postgres {
            base: url.trim_end_matches('/').to_string(),
            _child: None,
        });
    }
    let bin = bindir().ok_or(
        "PostgreSQL's server binaries were not found (install Debian's postgresql package: \
         apt-get install -y postgresql; or set HEARTH_PG_BINDIR or HEARTH_TEST_POSTGRES)",
    )?;
    ports::with_free_port(|port| start_on(&bin, port))
}

/// The server on `port`, or what it said when it did not start.
fn start_on(bin: &std::path::Path, port: u16) -> Result<Postgres, String> {
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", "sh", "-c", SCRIPT, "sh"]);
        c
    } else {
        let mut c = Command::new("sh");
        c.args(["-c", SCRIPT, "sh"]);
        c
    };
    cmd.arg(bin)
        .arg(port.to_string())
        .env("TMPDIR", "/tmp")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("could not start PostgreSQL from {}: {e}", bin.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    if line.trim() != "ready" {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        return Err(format!(
            "PostgreSQL from {} did not start (as root the tests run it as the `postgres` \
             user, which Debian's package creates): {err}",
            bin.display()
        ));
    }
    Ok(Postgres {
        base: format!("postgres://postgres@127.0.0.1:{port}"),
        _child: Some(child),
    })
}

/// The server, or None (with a note) when PostgreSQL is not installed outside CI.
pub fn server() -> Option<&'static Postgres> {
    match SERVER.get_or_init(start) {
        Ok(p) => Some(p),
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!("the PostgreSQL tests must run in CI: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPING a PostgreSQL case: {e}");
            None
        }
    }
}

/// A new, empty database on the server: its URL.
pub async fn fresh_database() -> Option<String> {
    let pg = server()?;
    let name = format!("t_{}", hearth_server::record::new_id());
    let (client, conn) =
        tokio_postgres::connect(&format!("{}/postgres", pg.base), tokio_postgres::NoTls)
            .await
            .expect("connecting to the test PostgreSQL");
    let task = tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("creating a test database");
    drop(client);
    let _ = task.await;
    Some(format!("{}/{name}", pg.base))
}
