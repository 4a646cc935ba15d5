//! OpenAI request bodies to engine requests. Unknown fields are ignored, as OpenAI
//! does; a known field with a bad value, or one hearth cannot honour yet
//! (`logit_bias`, `suffix`), is a 400 naming it, never silently dropped.
//! Structured outputs (`response_format`, `guided_*`) are parsed in constrained.rs,
//! tools in tools.rs.

use hearth_runtime::limits::{stop_list_error, MAX_CHOICES, MAX_TOP_LOGPROBS, SEED_MAX};
use hearth_runtime::tool_syntax::ToolSyntax;
use hearth_runtime::{ChatMessage, SamplingParams};
use serde_json::{Map, Value};

use super::{OaiError, OaiResult};
use crate::schema::{exact_integer, IntError};

/// Most choices one request may ask for (prompts × `n`).
pub const MAX_N: usize = MAX_CHOICES;

/// One prompt to complete.
#[derive(Debug, Clone)]
pub enum PromptInput {
    Chat(Vec<ChatMessage>),
    Text(String),
    Tokens(Vec<u32>),
}

/// A validated request.
#[derive(Debug, Clone)]
pub struct Job {
    /// As the client named it; echoed in responses.
    pub model: String,
    pub prompts: Vec<PromptInput>,
    /// Everything but `max_tokens`, which depends on the prompt's length when absent.
    pub params: SamplingParams,
    pub max_tokens: Option<usize>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// Completions: return the prompt before the completion.
    pub echo: bool,
    /// Return log-probs with this many alternatives per token.
    pub logprobs: Option<usize>,
    /// Structured output, compiled when the model is known.
    pub constraint: super::constrained::Requested,
    /// Chat's tools, when the model is to see them; their grammar is `constraint`.
    pub tools: Option<super::tools::ToolUse>,
}

fn obj(body: &Value) -> OaiResult<&Map<String, Value>> {
    body.as_object().ok_or_else(|| OaiError {
        param: None,
        ..OaiError::param("body", "must be a JSON object")
    })
}

fn present<'a>(o: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    o.get(k).filter(|v| !v.is_null())
}

fn number(o: &Map<String, Value>, k: &str, min: f64, max: f64) -> OaiResult<Option<f32>> {
    let Some(v) = present(o, k) else {
        return Ok(None);
    };
    let x = v
        .as_f64()
        .ok_or_else(|| OaiError::param(k, format!("expected a number, got {v}")))?;
    if !(min..=max).contains(&x) {
        return Err(OaiError::param(k, format!("{x} is not in [{min}, {max}]")));
    }
    Ok(Some(x as f32))
}

fn integer(o: &Map<String, Value>, k: &str, min: i64, max: i64) -> OaiResult<Option<i64>> {
    let Some(v) = present(o, k) else {
        return Ok(None);
    };
    let out_of_range = || OaiError::param(k, format!("{v} is not in [{min}, {max}]"));
    let x = match exact_integer(v) {
        Ok(x) => x,
        Err(IntError::TooLarge | IntError::TooSmall) => return Err(out_of_range()),
        Err(IntError::NotNumber | IntError::Fraction) => {
            return Err(OaiError::param(k, format!("expected an integer, got {v}")))
        }
    };
    match i64::try_from(x) {
        Ok(x) if (min..=max).contains(&x) => Ok(Some(x)),
        _ => Err(out_of_range()),
    }
}

fn boolean(o: &Map<String, Value>, k: &str) -> OaiResult<bool> {
    match present(o, k) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(OaiError::param(k, format!("expected a boolean, got {v}"))),
    }
}

fn stops(o: &Map<String, Value>) -> OaiResult<Vec<String>> {
    let list = match present(o, "stop") {
        None => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str().map(str::to_string).ok_or_else(|| {
                    OaiError::param("stop", "expected a string or a list of strings")
                })
            })
            .collect::<OaiResult<_>>()?,
        Some(_) => {
            return Err(OaiError::param(
                "stop",
                "expected a string or a list of strings",
            ))
        }
    };
    match stop_list_error(&list) {
        Some(why) => Err(OaiError::param("stop", why)),
        None => Ok(list),
    }
}

/// Fields every generation takes, shared by both endpoints.
fn common(
    o: &Map<String, Value>,
    default_temperature: f32,
) -> OaiResult<(SamplingParams, usize, bool, bool)> {
    let mut p = SamplingParams {
        temperature: number(o, "temperature", 0.0, 2.0)?.unwrap_or(default_temperature),
        top_p: number(o, "top_p", 0.0, 1.0)?.unwrap_or(1.0),
        min_p: number(o, "min_p", 0.0, 1.0)?.unwrap_or(0.0),
        presence_penalty: number(o, "presence_penalty", -2.0, 2.0)?.unwrap_or(0.0),
        frequency_penalty: number(o, "frequency_penalty", -2.0, 2.0)?.unwrap_or(0.0),
        repetition_penalty: number(o, "repetition_penalty", 0.0, 10.0)?.unwrap_or(1.0),
        min_tokens: integer(o, "min_tokens", 0, i64::MAX)?.unwrap_or(0) as usize,
        ignore_eos: boolean(o, "ignore_eos")?,
        stop: stops(o)?,
        ..Default::default()
    };
    if p.top_p == 0.0 {
        return Err(OaiError::param("top_p", "must be greater than 0"));
    }
    if p.repetition_penalty == 0.0 {
        return Err(OaiError::param(
            "repetition_penalty",
            "must be greater than 0",
        ));
    }
    // Bounded by the model's vocabulary once the model is known (`check_model`).
    p.top_k = match integer(o, "top_k", -1, i64::MAX)? {
        None | Some(-1) | Some(0) => 0,
        Some(k) => usize::try_from(k).unwrap_or(usize::MAX),
    };
    // One rule for seeds on every API (hearth_runtime::limits::SEED_MAX).
    p.seed = integer(o, "seed", 0, SEED_MAX as i64)?.map(|s| s as u64);
    let n = integer(o, "n", 1, MAX_N as i64)?.unwrap_or(1) as usize;
    let stream = boolean(o, "stream")?;
    let include_usage = match present(o, "stream_options") {
        None => false,
        Some(_) if !stream => {
            return Err(OaiError::param(
                "stream_options",
                "only allowed when stream is true",
            ))
        }
        Some(Value::Object(so)) => boolean(so, "include_usage")
            .map_err(|_| OaiError::param("stream_options.include_usage", "expected a boolean"))?,
        Some(_) => return Err(OaiError::param("stream_options", "expected an object")),
    };
    if let Some(u) = present(o, "user") {
        if !u.is_string() {
            return Err(OaiError::param("user", "expected a string"));
        }
    }
    match present(o, "logit_bias") {
        None => {}
        Some(Value::Object(m)) if m.is_empty() => {}
        Some(_) => {
            return Err(OaiError::unsupported(
                "logit_bias",
                "is not supported by this server",
            ))
        }
    }
    Ok((p, n, stream, include_usage))
}

fn model(o: &Map<String, Value>) -> OaiResult<String> {
    match present(o, "model") {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(_) => Err(OaiError::param("model", "expected a model id (a string)")),
        None => Err(OaiError::param(
            "model",
            "required: the model to use (GET /v1/models lists them)",
        )),
    }
}

fn max_tokens(o: &Map<String, Value>, names: &[&str]) -> OaiResult<Option<usize>> {
    for k in names {
        if let Some(n) = integer(o, k, 1, i64::from(u32::MAX))? {
            return Ok(Some(n as usize));
        }
    }
    Ok(None)
}

fn text_content(v: &Value, at: &str) -> OaiResult<String> {
    match v {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut out = String::new();
            for (j, part) in parts.iter().enumerate() {
                let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
                match (kind, part.get("text").and_then(Value::as_str)) {
                    ("text", Some(t)) => out.push_str(t),
                    ("text", None) => return Err(OaiError::param(format!("{at}[{j}].text"), "expected a string")),
                    (other, _) => {
                        return Err(OaiError::unsupported(
                            &format!("{at}[{j}].type"),
                            format!("content parts of type {other:?} are not supported; this model takes text"),
                        ))
                    }
                }
            }
            Ok(out)
        }
        _ => Err(OaiError::param(
            at,
            "expected a string or a list of content parts",
        )),
    }
}

fn messages(o: &Map<String, Value>) -> OaiResult<Vec<ChatMessage>> {
    let list = match present(o, "messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => return Err(OaiError::param("messages", "must not be empty")),
        Some(_) => return Err(OaiError::param("messages", "expected a list of messages")),
        None => return Err(OaiError::param("messages", "required")),
    };
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let at = format!("messages[{i}]");
            let m = m
                .as_object()
                .ok_or_else(|| OaiError::param(&at, "expected an object"))?;
            let role = match m.get("role").and_then(Value::as_str) {
                Some(r @ ("system" | "user" | "assistant")) => r,
                // OpenAI's newer name for system instructions.
                Some("developer") => "system",
                Some("tool") => {
                    let content = text_content(
                        m.get("content").unwrap_or(&Value::Null),
                        &format!("{at}.content"),
                    )?;
                    let tool_call_id = match m.get("tool_call_id") {
                        None | Some(Value::Null) => None,
                        Some(Value::String(s)) => Some(s.clone()),
                        Some(_) => {
                            return Err(OaiError::param(
                                format!("{at}.tool_call_id"),
                                "expected a string",
                            ))
                        }
                    };
                    return Ok(ChatMessage {
                        tool_call_id,
                        ..ChatMessage::new("tool", content)
                    });
                }
                Some("function") => {
                    return Err(OaiError::unsupported(
                        &format!("{at}.role"),
                        "the deprecated functions API is not supported; use tools and \"tool\" messages",
                    ))
                }
                Some(r) => {
                    return Err(OaiError::param(
                        format!("{at}.role"),
                        format!("{r:?} is not one of system, developer, user, assistant"),
                    ))
                }
                None => return Err(OaiError::param(format!("{at}.role"), "required")),
            };
            let content = text_content(
                m.get("content").unwrap_or(&Value::Null),
                &format!("{at}.content"),
            )?;
            let mut tool_calls = None;
            if let Some(calls) = present(m, "tool_calls") {
                let at = format!("{at}.tool_calls");
                if role != "assistant" {
                    return Err(OaiError::param(at, "only assistant messages have tool calls"));
                }
                tool_calls = Some(super::tools::assistant_calls(calls, &at)?);
            }
            Ok(ChatMessage {
                tool_calls,
                ..ChatMessage::new(role, content)
            })
        })
        .collect()
}

/// The checks that need the model: `top_k` against its vocabulary, `max_tokens`
/// against its context and KV cache, with the runtime's rules (the engine checks again
/// at submit, with the prompt).
pub fn check_model(job: &Job, limits: &hearth_runtime::RequestLimits) -> OaiResult<()> {
    let params = SamplingParams {
        max_tokens: job.max_tokens.unwrap_or(1),
        ..job.params.clone()
    };
    limits
        .check_params(&params)
        .map_err(|e| OaiError::from_runtime(e, "prompt"))
}

/// `POST /v1/chat/completions`.
pub fn chat(body: &Value) -> OaiResult<Job> {
    let o = obj(body)?;
    let model = model(o)?;
    let msgs = messages(o)?;
    let mut constraint = super::constrained::response_format(o)?;
    let tools = super::tools::parse(o)?;
    if let Some(t) = &tools {
        if constraint.is_some() {
            return Err(OaiError::param(
                "response_format",
                "cannot be combined with tools unless tool_choice is \"none\"",
            ));
        }
        // In the model's own syntax when it is known (choices.rs).
        constraint = Some((t.constraint(ToolSyntax::Hermes), "tools"));
    }
    let (params, n, stream, include_usage) = common(o, 1.0)?;
    let want_logprobs = boolean(o, "logprobs")?;
    let top = integer(o, "top_logprobs", 0, MAX_TOP_LOGPROBS as i64)?;
    if top.is_some() && !want_logprobs {
        return Err(OaiError::param("top_logprobs", "requires logprobs: true"));
    }
    Ok(Job {
        model,
        prompts: vec![PromptInput::Chat(msgs)],
        params,
        max_tokens: max_tokens(o, &["max_completion_tokens", "max_tokens"])?,
        n,
        stream,
        include_usage,
        echo: false,
        logprobs: want_logprobs.then(|| top.unwrap_or(0) as usize),
        constraint,
        tools,
    })
}

fn prompts(o: &Map<String, Value>) -> OaiResult<Vec<PromptInput>> {
    let bad = || {
        OaiError::param(
            "prompt",
            "expected a string, a list of strings, a list of token ids or a list of such lists",
        )
    };
    let tokens = |a: &[Value]| -> OaiResult<Vec<u32>> {
        a.iter()
            .map(|t| {
                t.as_u64()
                    .filter(|&t| t <= u64::from(u32::MAX))
                    .map(|t| t as u32)
                    .ok_or_else(bad)
            })
            .collect()
    };
    let list = match present(o, "prompt") {
        None => return Err(OaiError::param("prompt", "required")),
        Some(Value::String(s)) => vec![PromptInput::Text(s.clone())],
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(OaiError::param("prompt", "must not be empty"))
        }
        Some(Value::Array(a)) if a[0].is_number() => vec![PromptInput::Tokens(tokens(a)?)],
        Some(Value::Array(a)) => a
            .iter()
            .map(|p| match p {
                Value::String(s) => Ok(PromptInput::Text(s.clone())),
                Value::Array(t) if !t.is_empty() => Ok(PromptInput::Tokens(tokens(t)?)),
                _ => Err(bad()),
            })
            .collect::<OaiResult<_>>()?,
        Some(_) => return Err(bad()),
    };
    Ok(list)
}

/// `POST /v1/completions`.
pub fn completion(body: &Value) -> OaiResult<Job> {
    let o = obj(body)?;
    let model = model(o)?;
    let prompts = prompts(o)?;
    if present(o, "suffix").is_some_and(|s| s.as_str() != Some("")) {
        return Err(OaiError::unsupported(
            "suffix",
            "insertion (fill-in-the-middle) is not supported by this server",
        ));
    }
    let (params, n, stream, include_usage) = common(o, 1.0)?;
    if let Some(b) = integer(o, "best_of", 1, MAX_N as i64)? {
        if b as usize != n {
            return Err(OaiError::unsupported(
                "best_of",
                "only best_of equal to n is supported",
            ));
        }
    }
    let constraint = super::constrained::guided(o)?;
    let echo = boolean(o, "echo")?;
    let logprobs = integer(o, "logprobs", 0, MAX_TOP_LOGPROBS as i64)?.map(|n| n as usize);
    if echo && logprobs.is_some() {
        return Err(OaiError::unsupported(
            "echo",
            "echo with logprobs needs the prompt's log-probs, which this server does not compute",
        ));
    }
    if prompts.len() * n > MAX_N {
        return Err(OaiError::param(
            "n",
            format!("prompts × n must be at most {MAX_N}"),
        ));
    }
    Ok(Job {
        model,
        prompts,
        params,
        // OpenAI's default for completions.
        max_tokens: Some(max_tokens(o, &["max_tokens"])?.unwrap_or(16)),
        n,
        stream,
        include_usage,
        echo,
        logprobs,
        constraint,
        tools: None,
    })
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
