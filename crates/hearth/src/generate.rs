//! `hearth generate`: one prompt, streamed to stdout.

use std::io::Write;

use anyhow::{bail, Context};
use clap::Args;
use hearth_runtime::{
    FinishReason, GenerationEvent, GenerationRequest, PromptSpec, SamplingParams,
};

use crate::args::{EngineArgs, ModelArgs};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[arg(long)]
    pub prompt: String,
    #[arg(long)]
    pub system_prompt: Option<String>,
    /// Replicate-style template with {prompt} and {system_prompt}.
    #[arg(long)]
    pub prompt_template: Option<String>,
    /// Send the prompt as it is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub min_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Repeatable.
    #[arg(long)]
    pub stop: Vec<String>,
    #[arg(long)]
    pub ignore_eos: bool,
    /// Constrain the output to the JSON Schema in this file.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["regex", "grammar"])]
    pub json_schema: Option<std::path::PathBuf>,
    /// Constrain the output to match this regular expression.
    #[arg(long, conflicts_with = "grammar")]
    pub regex: Option<String>,
    /// Constrain the output to the Lark grammar (llguidance's syntax) in this file.
    #[arg(long, value_name = "FILE")]
    pub grammar: Option<std::path::PathBuf>,
}

/// The constraint the flags ask for, compiled for the engine's vocabulary.
fn constraint(
    a: &GenerateArgs,
    engine: &hearth_runtime::EngineHandle,
) -> anyhow::Result<Option<hearth_runtime::Constraint>> {
    use hearth_runtime::ConstraintSpec;
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
    };
    let (spec, field) = if let Some(p) = &a.json_schema {
        let schema = serde_json::from_str(&read(p)?)
            .with_context(|| format!("{}: not JSON", p.display()))?;
        (ConstraintSpec::JsonSchema(schema), "json_schema")
    } else if let Some(rx) = &a.regex {
        (ConstraintSpec::Regex(rx.clone()), "regex")
    } else if let Some(p) = &a.grammar {
        (ConstraintSpec::Lark(read(p)?), "grammar")
    } else {
        return Ok(None);
    };
    Ok(Some(engine.constraints().compile(&spec, field)?))
}

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    let loaded =
        hearth_runtime::load(&a.model.spec(), &a.engine.config()).context("loading the model")?;
    let engine = loaded.engine;
    let prompt = engine.tokenizer().prompt_tokens(&PromptSpec {
        prompt: a.prompt.clone(),
        system_prompt: a.system_prompt.clone(),
        prompt_template: a.prompt_template.clone(),
        raw: a.raw,
        ..Default::default()
    })?;
    let params = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
        presence_penalty: a.presence_penalty,
        frequency_penalty: a.frequency_penalty,
        seed: a.seed,
        max_tokens: a.max_tokens,
        min_tokens: a.min_tokens,
        stop: a.stop.clone(),
        ignore_eos: a.ignore_eos,
        logprobs: None,
        constraint: constraint(&a, &engine)?,
    };
    let mut stream = engine.submit(GenerationRequest { prompt, params })?;
    let mut out = std::io::stdout().lock();
    while let Some(ev) = stream.blocking_next() {
        match ev {
            GenerationEvent::Started { .. } => {}
            GenerationEvent::Token { text, .. } => {
                out.write_all(text.as_bytes())?;
                out.flush()?;
            }
            GenerationEvent::Finished(c) => {
                writeln!(out, "{}", c.trailing_text)?;
                let secs = c.timings.total.as_secs_f64();
                eprintln!(
                    "[{} | {} prompt + {} output tokens | {:.2}s | {:.1} tok/s]",
                    c.reason.as_str(),
                    c.prompt_tokens,
                    c.output_tokens,
                    secs,
                    c.output_tokens as f64 / secs.max(1e-9)
                );
                if c.reason == FinishReason::Error {
                    bail!("generation failed: {}", c.error.unwrap_or_default());
                }
                return Ok(());
            }
        }
    }
    bail!("the engine stopped before the request finished")
}
