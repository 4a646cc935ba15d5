//! The `hearth` command.

mod args;
mod bench;
mod bench_constrained;
mod bench_http;
mod bench_plot;
mod bench_workload;
mod compare;
mod generate;
mod serve;
mod shadow_args;
mod upstream_args;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "hearth",
    version,
    about = "A self-hosted inference server that speaks Replicate's API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Serve models over Replicate's HTTP API (and Cog's).
    Serve(serve::ServeArgs),
    /// Generate a completion for one prompt, streamed to stdout.
    Generate(generate::GenerateArgs),
    /// Measure throughput and latency under load (vLLM's field names).
    Bench(bench::BenchArgs),
    /// Print how the two sides of a server's canary and shadow routes compare.
    Compare(compare::CompareArgs),
}

fn main() -> anyhow::Result<()> {
    // Before any thread or buffer exists: prefill chunks free and re-allocate tens of MB
    // per layer, which glibc's defaults would return to the kernel and fault in again.
    hearth_runtime::heap::keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HEARTH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve(a) => serve::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Compare(a) => compare::run(a),
    }
}
