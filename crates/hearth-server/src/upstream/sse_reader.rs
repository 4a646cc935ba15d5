//! Reads server-sent events from an HTTP response, one block at a time: the
//! upstream's prediction stream (`stream_follower`) and a Cog container's (`cog`).
//! The format is small enough that a crate would add little, and the one thing this
//! reader needs that the common crates lack is a bound: bytes are buffered only up to
//! the end of the current event, and an event larger than the reader's cap ends the
//! stream with an error instead of growing the buffer. The buffer's bytes come from
//! the process-wide budget (`budget`) before they are taken in.

use super::budget::{ByteBudget, Held};

/// A buffer holding this much more of the budget than it needs gives it back.
const GIVE_BACK: usize = 1 << 20;

/// One block of the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Block {
    Event(SseEvent),
    /// A comment or empty block (a heartbeat): the stream is alive.
    Comment,
}

/// One event: its name (`message` when the block names none), its `id:` if any, and
/// its `data:` lines joined with `\n`.
#[derive(Debug, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

pub struct SseReader {
    resp: reqwest::Response,
    buf: Vec<u8>,
    /// How much of `buf` is known to hold no block end.
    scanned: usize,
    max_event: usize,
    /// At most one read from the connection this often (`pace`), and the last one.
    pace: Option<std::time::Duration>,
    last_read: Option<tokio::time::Instant>,
    budget: ByteBudget,
    held: Held,
    /// Bytes read from the connection and not yet in `buf` (waiting for the budget).
    pending: Option<axum::body::Bytes>,
}

impl SseReader {
    /// Reads `resp`; an event over `max_event` bytes is an error, and so is a buffer
    /// `budget` cannot cover within its wait.
    pub fn new(resp: reqwest::Response, max_event: usize, budget: &ByteBudget) -> Self {
        Self {
            resp,
            buf: Vec::new(),
            scanned: 0,
            max_event,
            pace: None,
            last_read: None,
            budget: budget.clone(),
            held: Held::default(),
            pending: None,
        }
    }

    /// From now on, reads from the connection at most once every `every`: a reader
    /// that needs no event the moment it is sent (a shadow copy's, once its output
    /// began) then takes what arrived meanwhile in one wake-up and one read, rather
    /// than one per event.
    pub fn pace(&mut self, every: std::time::Duration) {
        self.pace = Some(every);
    }

    /// The next block; `None` when the stream ended. Cancel-safe: bytes are taken from
    /// the connection only when a read completes.
    pub async fn next(&mut self) -> Result<Option<Block>, String> {
        loop {
            // A separator may straddle the last read: look back 3 bytes.
            let from = self.scanned.saturating_sub(3);
            if let Some((end, skip)) = block_end(&self.buf[from..]) {
                let block: Vec<u8> = self
                    .buf
                    .drain(..from + end + skip)
                    .take(from + end)
                    .collect();
                self.scanned = 0;
                if self.held.bytes() > self.buf.len() + GIVE_BACK {
                    self.held.shrink_to(self.buf.len());
                }
                return Ok(Some(parse_block(&String::from_utf8_lossy(&block))));
            }
            self.scanned = self.buf.len();
            if self.buf.len() > self.max_event {
                return Err(format!(
                    "an event over {} KiB, the most one may carry",
                    self.max_event >> 10
                ));
            }
            // Kept aside while the budget is awaited: a canceled wait loses nothing.
            if let Some(len) = self.pending.as_ref().map(|b| b.len()) {
                let need = self.buf.len() + len;
                self.budget.reserve(&mut self.held, need).await?;
                if let Some(bytes) = self.pending.take() {
                    self.buf.extend_from_slice(&bytes);
                }
                continue;
            }
            if let (Some(every), Some(last)) = (self.pace, self.last_read) {
                // Only a wait still ahead: a timer rounds up to the driver's next tick.
                if last + every > tokio::time::Instant::now() {
                    tokio::time::sleep_until(last + every).await;
                }
            }
            let read = self.resp.chunk().await;
            if self.pace.is_some() {
                self.last_read = Some(tokio::time::Instant::now());
            }
            match read {
                Ok(Some(bytes)) => self.pending = Some(bytes),
                Ok(None) => return Ok(None),
                Err(e) => return Err(e.without_url().to_string()),
            }
        }
    }
}

/// Where the first event block in `buf` ends, and the length of its separator.
pub fn block_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 < b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// One block's fields (`event:`, `id:`, `data:`; comments and other fields ignored).
pub fn parse_block(block: &str) -> Block {
    let mut event = None;
    let mut id = None;
    let mut data: Vec<&str> = Vec::new();
    for line in block.lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => event = Some(value.trim().to_string()),
            "id" => id = Some(value.to_string()),
            "data" => data.push(value),
            _ => {}
        }
    }
    if data.is_empty() && event.is_none() {
        return Block::Comment;
    }
    Block::Event(SseEvent {
        event: event.unwrap_or_else(|| "message".into()),
        id,
        data: data.join("\n"),
    })
}

/// The numeric tail of an event id (`1690212292:7` → `("1690212292", 7)`), which
/// Replicate's and hearth's streams count up: what a reconnect uses to skip a replay.
pub fn id_sequence(id: &str) -> Option<(&str, u64)> {
    let (prefix, n) = id.rsplit_once(':')?;
    Some((prefix, n.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event: &str, id: Option<&str>, data: &str) -> Block {
        Block::Event(SseEvent {
            event: event.into(),
            id: id.map(str::to_string),
            data: data.into(),
        })
    }

    #[test]
    fn blocks_parse_as_the_format_says() {
        assert_eq!(
            parse_block("event: output\nid: 17:3\ndata: two\ndata:  lines"),
            ev("output", Some("17:3"), "two\n lines")
        );
        assert_eq!(
            parse_block("event: output\r\nid: 1:0\r\ndata:\r"),
            ev("output", Some("1:0"), "")
        );
        assert_eq!(parse_block("data: x"), ev("message", None, "x"));
        assert_eq!(parse_block(": keep-alive"), Block::Comment);
        assert_eq!(parse_block(""), Block::Comment);
        assert_eq!(block_end(b"a\r\n\r\nb\n\n"), Some((1, 4)));
        assert_eq!(block_end(b"a\n\nb"), Some((1, 2)));
        assert_eq!(block_end(b"a\n"), None);
        assert_eq!(id_sequence("1690212292:12"), Some(("1690212292", 12)));
        assert_eq!(id_sequence("abc"), None);
        assert_eq!(id_sequence("a:b"), None);
    }

    fn reader(body: &str, max: usize) -> SseReader {
        let resp = axum::http::Response::new(body.to_string());
        SseReader::new(reqwest::Response::from(resp), max, &ByteBudget::default())
    }

    #[tokio::test]
    async fn a_stream_reads_block_by_block_and_an_oversized_event_is_refused() {
        let mut r = reader(
            "id: 1:0\nevent: output\ndata: a\n\n: keep-alive\n\nevent: done\ndata: {}\n\n",
            1024,
        );
        assert_eq!(
            r.next().await.unwrap(),
            Some(ev("output", Some("1:0"), "a"))
        );
        assert_eq!(r.next().await.unwrap(), Some(Block::Comment));
        assert_eq!(r.next().await.unwrap(), Some(ev("done", None, "{}")));
        assert_eq!(r.next().await.unwrap(), None);
        let big = format!("event: output\ndata: {}", "x".repeat(2048));
        let err = reader(&big, 1024).next().await.unwrap_err();
        assert!(err.contains("over 1 KiB"), "{err}");
    }
}
