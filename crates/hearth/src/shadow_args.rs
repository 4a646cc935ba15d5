//! `hearth serve`'s bounds on shadow copies (`--route OWNER/NAME=shadow:UP:PCT`).

use clap::Args;
use hearth_server::upstream::shadow::ShadowLimits;

#[derive(Args, Debug)]
pub struct ShadowArgs {
    /// Shadow copies running upstream at once, per shadow route; past it a copy is
    /// skipped (and counted in /v1/hearth/compare), never queued.
    #[arg(long, env = "HEARTH_SHADOW_MAX_CONCURRENT", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub shadow_max_concurrent: u32,
    /// Shadow copies sent upstream in any minute, per shadow route (a hosted upstream
    /// bills each one); past it a copy is skipped and counted.
    #[arg(long, env = "HEARTH_SHADOW_MAX_PER_MINUTE", default_value_t = 120,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub shadow_max_per_minute: u32,
}

impl ShadowArgs {
    pub fn limits(&self) -> ShadowLimits {
        ShadowLimits {
            max_concurrent: self.shadow_max_concurrent as usize,
            max_per_minute: self.shadow_max_per_minute as usize,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        s: ShadowArgs,
    }

    #[test]
    fn shadow_bounds_have_defaults_and_refuse_zero() {
        let c = Cli::try_parse_from(["hearth"]).unwrap();
        assert_eq!(c.s.limits(), ShadowLimits::default());
        let c = Cli::try_parse_from(["hearth", "--shadow-max-concurrent", "2"]).unwrap();
        assert_eq!(c.s.limits().max_concurrent, 2);
        let e = Cli::try_parse_from(["hearth", "--shadow-max-per-minute", "0"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("shadow-max-per-minute"), "{e}");
    }
}
