//! `hearth serve`'s upstream flags: `--upstream NAME=URL`, its token from
//! `--upstream-token-file NAME=PATH` or `HEARTH_UPSTREAM_TOKEN_<NAME>`, and
//! `--route OWNER/NAME=ROUTE`; merged with what the model cards say (a flag wins,
//! `hearth_server::upstream::card`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use hearth_server::upstream::card::CardConfig;
use hearth_server::upstream::stream_origin::{parse_origin, Origin};
use hearth_server::upstream::{self, BreakerConfig, ModelRoute, Secret, UpstreamSpec};

#[derive(Args, Debug)]
pub struct UpstreamArgs {
    /// A Replicate-compatible API models can be routed to, NAME=URL (repeatable; e.g.
    /// hosted=https://api.replicate.com or another hearth), or NAME=cog+URL for a plain
    /// Cog container's /predictions API. Its token comes from --upstream-token-file or
    /// HEARTH_UPSTREAM_TOKEN_<NAME>.
    #[arg(long = "upstream", env = "HEARTH_UPSTREAM", value_delimiter = ',', value_parser = parse_upstream)]
    pub upstreams: Vec<UpstreamSpec>,
    /// NAME=PATH: the file holding the upstream's API token (repeatable).
    #[arg(long = "upstream-token-file", value_parser = parse_token_file)]
    pub token_files: Vec<(String, PathBuf)>,
    /// NAME=ORIGIN (repeatable): another origin (scheme://host[:port]) where the
    /// upstream's prediction streams may be followed, beyond its own origin and its
    /// sibling https hosts (stream.example.com beside api.example.com). The token is
    /// never sent there.
    #[arg(long = "upstream-stream-origin", env = "HEARTH_UPSTREAM_STREAM_ORIGIN", value_delimiter = ',', value_parser = parse_stream_origin)]
    pub stream_origins: Vec<(String, Origin)>,
    /// Where a model's predictions run, OWNER/NAME=ROUTE (repeatable): local,
    /// upstream:UP (only there; no local weights needed), fallback:UP (here first;
    /// there when the engine is not running, its queue is full or the local create
    /// fails), canary:UP:PCT (PCT% of creates, by prediction id, go there),
    /// shadow:UP:PCT (all run here; PCT% are also copied there, for the comparison).
    #[arg(long = "route", env = "HEARTH_ROUTE", value_delimiter = ',', value_parser = parse_route)]
    pub routes: Vec<ModelRoute>,
    /// Consecutive failed calls after which an upstream's circuit opens.
    #[arg(long, env = "HEARTH_UPSTREAM_FAILURES", default_value_t = 5)]
    pub upstream_failures: u32,
    /// Seconds an open circuit stays open before one probe is let through.
    #[arg(long, env = "HEARTH_UPSTREAM_COOLDOWN", default_value_t = 30)]
    pub upstream_cooldown: u64,
    /// Copy upstream predictions' file outputs (http(s) URLs) into hearth's file store
    /// and point the output there, so they outlive the upstream's expiry. Fetched
    /// through the webhook guard: public addresses only unless --webhook-allow-private.
    #[arg(long, env = "HEARTH_MIRROR_UPSTREAM_FILES")]
    pub mirror_upstream_files: bool,
    /// The largest file --mirror-upstream-files copies; larger ones keep their URL.
    #[arg(long, env = "HEARTH_MIRROR_UPSTREAM_MAX_BYTES", default_value = "100MiB", value_parser = hearth_runtime::device::parse_bytes)]
    pub mirror_upstream_max_bytes: u64,
    /// The most output one prediction may bring back from an upstream (bytes, or
    /// 64MiB-style; whichever way it arrives: polled, streamed, from Cog); past it
    /// the prediction fails, saying so, and is canceled upstream.
    #[arg(long, env = "HEARTH_UPSTREAM_MAX_OUTPUT_BYTES", default_value = "64MiB", value_parser = parse_intake_bytes)]
    pub upstream_max_output_bytes: u64,
    /// The same for its logs.
    #[arg(long, env = "HEARTH_UPSTREAM_MAX_LOG_BYTES", default_value = "8MiB", value_parser = parse_intake_bytes)]
    pub upstream_max_log_bytes: u64,
    /// The most memory all upstream answers being read may hold together (polls,
    /// creates, event streams, of every upstream): a read waits up to 10 s for its
    /// bytes, then fails (a poll is tried again; an answer larger than this always
    /// fails). 1MiB to 4GiB.
    #[arg(long, env = "HEARTH_UPSTREAM_MEMORY_BUDGET", default_value = "512MiB", value_parser = parse_budget_bytes)]
    pub upstream_memory_budget: u64,
}

/// A byte count from 1 MiB to 4 GiB - 1.
fn parse_budget_bytes(s: &str) -> Result<u64, String> {
    let n = hearth_runtime::device::parse_bytes(s)?;
    if !((1 << 20)..(1 << 32)).contains(&n) {
        return Err(format!("{s:?}: expected 1MiB to 4GiB"));
    }
    Ok(n)
}

/// A byte count from 1 to 1 GiB.
fn parse_intake_bytes(s: &str) -> Result<u64, String> {
    let n = hearth_runtime::device::parse_bytes(s)?;
    if n == 0 || n > 1 << 30 {
        return Err(format!("{s:?}: expected 1 byte to 1GiB"));
    }
    Ok(n)
}

fn parse_upstream(s: &str) -> Result<UpstreamSpec, String> {
    UpstreamSpec::parse(s)
}

fn parse_route(s: &str) -> Result<ModelRoute, String> {
    ModelRoute::parse(s)
}

fn parse_token_file(s: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=PATH"))?;
    upstream::check_name(name)?;
    Ok((name.to_string(), PathBuf::from(path)))
}

fn parse_stream_origin(s: &str) -> Result<(String, Origin), String> {
    let (name, origin) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=ORIGIN"))?;
    upstream::check_name(name)?;
    Ok((name.to_string(), parse_origin(origin)?))
}

impl UpstreamArgs {
    /// The upstreams with their tokens (a file's first non-blank line, else the
    /// env), the routes and the breaker settings: the flags', then the cards' that no
    /// flag overrides.
    pub fn resolve(
        &self,
        env: impl Fn(&str) -> Option<String>,
        cards: &CardConfig,
    ) -> anyhow::Result<(Vec<UpstreamSpec>, Vec<ModelRoute>, BreakerConfig)> {
        let mut upstreams: Vec<(UpstreamSpec, Option<&PathBuf>)> =
            self.upstreams.iter().map(|u| (u.clone(), None)).collect();
        for c in &cards.upstreams {
            if !upstreams.iter().any(|(u, _)| u.name == c.spec.name) {
                upstreams.push((c.spec.clone(), c.token_file.as_ref()));
            }
        }
        let mut files: HashMap<&str, &PathBuf> = HashMap::new();
        for (name, path) in &self.token_files {
            if !upstreams.iter().any(|(u, _)| &u.name == name) {
                bail!("--upstream-token-file {name}=...: no --upstream called {name}");
            }
            if files.insert(name, path).is_some() {
                bail!("--upstream-token-file: two files for upstream {name}");
            }
        }
        for (name, _) in &self.stream_origins {
            if !upstreams.iter().any(|(u, _)| &u.name == name) {
                bail!("--upstream-stream-origin {name}=...: no --upstream called {name}");
            }
        }
        let mut out = Vec::new();
        for (u, card_file) in upstreams {
            let mut u = u.clone();
            for (name, origin) in &self.stream_origins {
                if *name == u.name && !u.stream_origins.contains(origin) {
                    u.stream_origins.push(origin.clone());
                }
            }
            let token = match files.get(u.name.as_str()).copied().or(card_file) {
                Some(path) => {
                    let text = std::fs::read_to_string(path).with_context(|| {
                        format!("the token file of upstream {}: {}", u.name, path.display())
                    })?;
                    let t = text.lines().map(str::trim).find(|l| !l.is_empty());
                    match t {
                        Some(t) => Some(t.to_string()),
                        None => bail!(
                            "the token file of upstream {}: {}: the file has no token",
                            u.name,
                            path.display()
                        ),
                    }
                }
                None => env(&format!(
                    "HEARTH_UPSTREAM_TOKEN_{}",
                    upstream::env_suffix(&u.name)
                ))
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty()),
            };
            u.token = token.map(Secret::new);
            out.push(u);
        }
        let breaker = BreakerConfig {
            failures: self.upstream_failures,
            cooldown: Duration::from_secs(self.upstream_cooldown),
        };
        let mut routes = self.routes.clone();
        for r in &cards.routes {
            if !self.routes.iter().any(|f| f.model == r.model) {
                routes.push(r.clone());
            }
        }
        Ok((out, routes, breaker))
    }
}

impl UpstreamArgs {
    /// `--upstream-max-output-bytes` and `--upstream-max-log-bytes`.
    pub fn intake(&self) -> upstream::intake::IntakeLimits {
        upstream::intake::IntakeLimits {
            max_output_bytes: self.upstream_max_output_bytes as usize,
            max_log_bytes: self.upstream_max_log_bytes as usize,
        }
    }

    /// `--mirror-upstream-files`' settings, files staged in the store's `files_dir`.
    pub fn mirror(
        &self,
        files_dir: PathBuf,
        allow_private: bool,
    ) -> Option<upstream::files::Mirror> {
        self.mirror_upstream_files
            .then_some(upstream::files::Mirror {
                max_bytes: self.mirror_upstream_max_bytes,
                allow_private,
                temp_dir: files_dir,
            })
    }
}

/// The upstreams and routes the model cards in `dir` declare.
pub fn card_config(dir: &std::path::Path) -> anyhow::Result<CardConfig> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    let mut cards = Vec::new();
    for p in paths {
        let card = hearth_server::ModelCard::load(&p).map_err(anyhow::Error::msg)?;
        cards.push((p, card));
    }
    upstream::card::from_cards(&cards).map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        up: super::UpstreamArgs,
    }

    #[test]
    fn tokens_come_from_a_file_or_the_env_and_routes_are_checked() {
        let dir = std::env::temp_dir().join(format!("hearth-up-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("tok");
        std::fs::write(&f, "\n  r8_fromfile \n").unwrap();
        let cli = Cli::try_parse_from([
            "hearth",
            "--upstream",
            "hosted=https://api.example.com",
            "--upstream",
            "my-peer=http://127.0.0.1:9",
            "--upstream-token-file",
            &format!("hosted={}", f.display()),
            "--route",
            "acme/llm=upstream:my-peer",
        ])
        .unwrap();
        let (ups, routes, _) = cli
            .up
            .resolve(
                |k| (k == "HEARTH_UPSTREAM_TOKEN_MY_PEER").then(|| "r8_env".to_string()),
                &Default::default(),
            )
            .unwrap();
        assert_eq!(
            ups[0].token.as_ref().map(|t| format!("{t:?}")),
            Some("Secret(redacted)".into())
        );
        assert!(!format!("{ups:?}").contains("r8_"));
        assert!(ups[1].token.is_some());
        assert_eq!(routes[0].model, "acme/llm");
        let e = Cli::try_parse_from(["hearth", "--route", "a/b=shadow:local:10"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("write shadow-local:UP:PCT"), "{e}");
        let cli = Cli::try_parse_from(["hearth", "--upstream-token-file", "nope=/x"]).unwrap();
        assert!(cli.up.resolve(|_| None, &Default::default()).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn cards_declare_upstreams_and_routes_and_flags_win() {
        let dir = std::env::temp_dir().join(format!("hearth-cards-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tok"), "r8_cardfile\n").unwrap();
        std::fs::write(dir.join("a.toml"), "name = \"hearth/demo\"\nmodel = \"demo\"\nroute = \"fallback:hosted\"\n[upstream.hosted]\nurl = \"https://api.example.com\"\ntoken_file = \"tok\"\nstream_origins = [\"https://events.example.net\"]\n[upstream.box]\nurl = \"cog+http://127.0.0.1:5000\"\n").unwrap();
        std::fs::write(
            dir.join("b.toml"),
            "name = \"acme/image\"\nroute = \"upstream:box\"\n",
        )
        .unwrap();
        let cards = super::card_config(&dir).unwrap();
        assert_eq!(cards.upstreams.len(), 2);
        assert_eq!(cards.routes.len(), 2);

        // Cards alone: the token from the card's file (relative to the card), or the env.
        let cli = Cli::try_parse_from(["hearth"]).unwrap();
        let (ups, routes, _) = cli
            .up
            .resolve(
                |k| (k == "HEARTH_UPSTREAM_TOKEN_BOX").then(|| "r8_env".into()),
                &cards,
            )
            .unwrap();
        let hosted = ups.iter().find(|u| u.name == "hosted").unwrap();
        assert_eq!(hosted.url, "https://api.example.com");
        assert!(hosted.token.is_some());
        let origins = |u: &hearth_server::upstream::UpstreamSpec| {
            u.stream_origins
                .iter()
                .map(|o| o.ascii_serialization())
                .collect::<Vec<_>>()
        };
        assert_eq!(origins(hosted), ["https://events.example.net"]);

        // --upstream-stream-origin adds to a card's upstream; it must name one, and
        // take an origin only.
        let cli = Cli::try_parse_from([
            "hearth",
            "--upstream-stream-origin",
            "hosted=https://s2.example.net",
            "--upstream-stream-origin",
            "box=http://127.0.0.1:7000",
        ])
        .unwrap();
        let (added, _, _) = cli.up.resolve(|_| None, &cards).unwrap();
        let with = |name: &str| added.iter().find(|u| u.name == name).unwrap();
        assert_eq!(
            origins(with("hosted")),
            ["https://events.example.net", "https://s2.example.net"]
        );
        assert_eq!(origins(with("box")), ["http://127.0.0.1:7000"]);
        let cli = Cli::try_parse_from([
            "hearth",
            "--upstream-stream-origin",
            "nope=https://s.example",
        ])
        .unwrap();
        let e = cli.up.resolve(|_| None, &cards).unwrap_err().to_string();
        assert!(e.contains("no --upstream called nope"), "{e}");
        for bad in [
            "hosted",
            "hosted=https://s.example/path",
            "bad name=https://s",
        ] {
            assert!(
                Cli::try_parse_from(["hearth", "--upstream-stream-origin", bad]).is_err(),
                "{bad}"
            );
        }
        let boxed = ups.iter().find(|u| u.name == "box").unwrap();
        assert!(boxed.cog && boxed.token.is_some());
        assert!(routes
            .iter()
            .any(|r| r.model == "acme/image" && r.route.describe() == "upstream:box"));

        // A flag wins over the card: the upstream's URL and the model's route.
        let cli = Cli::try_parse_from([
            "hearth",
            "--upstream",
            "hosted=https://other.example.com",
            "--route",
            "hearth/demo=local",
        ])
        .unwrap();
        let (ups, routes, _) = cli.up.resolve(|_| None, &cards).unwrap();
        let hosted = ups.iter().find(|u| u.name == "hosted").unwrap();
        assert_eq!(hosted.url, "https://other.example.com");
        assert!(
            hosted.token.is_none(),
            "the card's token file is the card's upstream's"
        );
        assert!(
            hosted.stream_origins.is_empty(),
            "and so are its stream origins"
        );
        let demo: Vec<_> = routes.iter().filter(|r| r.model == "hearth/demo").collect();
        assert_eq!(demo.len(), 1);
        assert_eq!(demo[0].route.describe(), "local");

        // A token in a card is refused without being quoted; a card without a model
        // must route upstream only.
        std::fs::write(dir.join("c.toml"), "name = \"x/y\"\nroute = \"upstream:z\"\n[upstream.z]\nurl = \"https://h\"\ntoken = \"r8_incard\"\n").unwrap();
        let e = super::card_config(&dir).unwrap_err().to_string();
        assert!(
            e.contains("upstream.z.token") && !e.contains("r8_incard"),
            "{e}"
        );
        std::fs::write(
            dir.join("c.toml"),
            "name = \"x/y\"\nroute = \"fallback:hosted\"\n",
        )
        .unwrap();
        let e = super::card_config(&dir).unwrap_err().to_string();
        assert!(e.contains("model: required"), "{e}");
        std::fs::write(
            dir.join("c.toml"),
            "name = \"x/y\"\nmodel = \"demo\"\n[upstream.hosted]\nurl = \"https://h\"\n",
        )
        .unwrap();
        let e = super::card_config(&dir).unwrap_err().to_string();
        assert!(e.contains("also declared in"), "{e}");
        std::fs::write(
            dir.join("c.toml"),
            "name = \"x/y\"\nmodel = \"demo\"\nroute = 'r8_\"broken\n",
        )
        .unwrap();
        let e = super::card_config(&dir).unwrap_err().to_string();
        assert!(e.contains("line 3") && !e.contains("r8_"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
