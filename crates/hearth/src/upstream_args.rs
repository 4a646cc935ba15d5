//! `hearth serve`'s upstream flags: `--upstream NAME=URL`, its token from
//! `--upstream-token-file NAME=PATH` or `HEARTH_UPSTREAM_TOKEN_<NAME>`, and
//! `--route OWNER/NAME=ROUTE`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use hearth_server::upstream::{self, BreakerConfig, ModelRoute, Secret, UpstreamSpec};

#[derive(Args, Debug)]
pub struct UpstreamArgs {
    /// A Replicate-compatible API models can be routed to, NAME=URL (repeatable; e.g.
    /// hosted=https://api.replicate.com or another hearth). Its token comes from
    /// --upstream-token-file or HEARTH_UPSTREAM_TOKEN_<NAME>.
    #[arg(long = "upstream", env = "HEARTH_UPSTREAM", value_delimiter = ',', value_parser = parse_upstream)]
    pub upstreams: Vec<UpstreamSpec>,
    /// NAME=PATH: the file holding the upstream's API token (repeatable).
    #[arg(long = "upstream-token-file", value_parser = parse_token_file)]
    pub token_files: Vec<(String, PathBuf)>,
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

impl UpstreamArgs {
    /// The upstreams with their tokens (a file's first non-blank line, else the
    /// env), the routes and the breaker settings.
    pub fn resolve(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<(Vec<UpstreamSpec>, Vec<ModelRoute>, BreakerConfig)> {
        let mut files: HashMap<&str, &PathBuf> = HashMap::new();
        for (name, path) in &self.token_files {
            if !self.upstreams.iter().any(|u| &u.name == name) {
                bail!("--upstream-token-file {name}=...: no --upstream called {name}");
            }
            if files.insert(name, path).is_some() {
                bail!("--upstream-token-file: two files for upstream {name}");
            }
        }
        let mut out = Vec::new();
        for u in &self.upstreams {
            let mut u = u.clone();
            let token = match files.get(u.name.as_str()) {
                Some(path) => {
                    let text = std::fs::read_to_string(path).with_context(|| {
                        format!("--upstream-token-file {}={}", u.name, path.display())
                    })?;
                    let t = text.lines().map(str::trim).find(|l| !l.is_empty());
                    match t {
                        Some(t) => Some(t.to_string()),
                        None => bail!(
                            "--upstream-token-file {}={}: the file has no token",
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
        Ok((out, self.routes.clone(), breaker))
    }
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
            .resolve(|k| (k == "HEARTH_UPSTREAM_TOKEN_MY_PEER").then(|| "r8_env".to_string()))
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
        assert!(e.contains("not supported"), "{e}");
        let cli = Cli::try_parse_from(["hearth", "--upstream-token-file", "nope=/x"]).unwrap();
        assert!(cli.up.resolve(|_| None).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
