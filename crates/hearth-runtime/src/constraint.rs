//! Structured outputs: a request's JSON Schema, regex or Lark grammar compiled by
//! llguidance into a matcher that, each step, says which tokens may come next.
//!
//! Compilation happens on the caller's thread (the server runs it on a blocking task),
//! never on the engine thread, and is bounded by llguidance's own limits (lexer fuel,
//! grammar size, lexer states) rather than by a clock; a compiled grammar is cached by
//! the hash of its source. What cannot be enforced exactly is an error naming the
//! field, the keyword and its path: hearth never generates unconstrained in its place.
//! Each sequence gets its own matcher (cloned from the compiled one, cheap), so choices
//! of one request and requests sharing a grammar never share state.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

use llguidance::api::{GrammarWithLexer, ParserLimits, TopLevelGrammar};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::error::{Result, RuntimeError};
use crate::tokenizer::TextTokenizer;

/// What a request asks its output to match.
#[derive(Debug, Clone, PartialEq)]
pub enum ConstraintSpec {
    /// A JSON Schema (drafts 4 to 2020-12; see schema_check.rs for the keywords).
    JsonSchema(Value),
    /// Any JSON object (OpenAI's `json_object`).
    JsonObject,
    /// A regular expression (Rust `regex` syntax) the whole output matches.
    Regex(String),
    /// A grammar in llguidance's Lark syntax.
    Lark(String),
    /// Exactly one of these strings (vLLM's `guided_choice`).
    Choice(Vec<String>),
    /// Tool calls (OpenAI's `tools`), or text when the model may choose.
    ToolCalls(crate::tool_grammar::ToolCallGrammar),
    /// The inner constraint after an optional `<think>…</think>` block that is left
    /// free (Qwen3-style reasoning), and at most a few newlines after it.
    AfterThinking(Box<ConstraintSpec>),
}

impl ConstraintSpec {
    fn kind(&self) -> &'static str {
        match self {
            ConstraintSpec::JsonSchema(_) => "json_schema",
            ConstraintSpec::JsonObject => "json_object",
            ConstraintSpec::Regex(_) => "regex",
            ConstraintSpec::Lark(_) => "grammar",
            ConstraintSpec::Choice(_) => "choice",
            ConstraintSpec::ToolCalls(_) => "tools",
            ConstraintSpec::AfterThinking(inner) => inner.kind(),
        }
    }

    fn cache_key(&self) -> [u8; 32] {
        let body = match self {
            ConstraintSpec::JsonSchema(v) => v.to_string(),
            ConstraintSpec::JsonObject => String::new(),
            ConstraintSpec::Regex(s) | ConstraintSpec::Lark(s) => s.clone(),
            ConstraintSpec::Choice(c) => json!(c).to_string(),
            ConstraintSpec::ToolCalls(t) => json!({
                "functions": t.functions, "allow_text": t.allow_text, "parallel": t.parallel,
                "syntax": t.syntax,
            })
            .to_string(),
            ConstraintSpec::AfterThinking(inner) => {
                format!("think:{}", hex(&inner.cache_key()))
            }
        };
        let mut h = Sha256::new();
        h.update(self.kind().as_bytes());
        h.update([0]);
        h.update(body.as_bytes());
        h.finalize().into()
    }

    /// The llguidance grammar, after hearth's own checks. `special` gives the id of a
    /// text that is one special token of the vocabulary.
    fn grammar(
        &self,
        special: &dyn Fn(&str) -> Option<u32>,
    ) -> std::result::Result<TopLevelGrammar, String> {
        Ok(match self {
            ConstraintSpec::JsonSchema(schema) => {
                crate::schema_check::check_schema(schema)?;
                let schema = match schema {
                    Value::Bool(true) => json!({}),
                    Value::Bool(false) => return Err("the schema `false` matches nothing".into()),
                    other => other.clone(),
                };
                TopLevelGrammar::from_json_schema(with_hearth_options(schema))
            }
            ConstraintSpec::JsonObject => {
                TopLevelGrammar::from_json_schema(with_hearth_options(json!({"type": "object"})))
            }
            ConstraintSpec::Regex(rx) => {
                if rx.len() > MAX_SOURCE_BYTES {
                    return Err(format!(
                        "the regex is {} bytes; at most {MAX_SOURCE_BYTES}",
                        rx.len()
                    ));
                }
                TopLevelGrammar::from_regex(rx)
            }
            ConstraintSpec::Lark(g) => {
                if g.len() > MAX_SOURCE_BYTES {
                    return Err(format!(
                        "the grammar is {} bytes; at most {MAX_SOURCE_BYTES}",
                        g.len()
                    ));
                }
                // Embedded schemas could otherwise switch on llguidance's lenient mode,
                // which ignores keywords it cannot enforce.
                if g.contains("x-guidance") {
                    return Err("`x-guidance` options are not accepted in a grammar".into());
                }
                TopLevelGrammar::from_lark(g.clone())
            }
            ConstraintSpec::Choice(choices) => {
                if choices.is_empty() {
                    return Err("the list of choices is empty".into());
                }
                if choices.len() > MAX_CHOICES {
                    return Err(format!("{} choices; at most {MAX_CHOICES}", choices.len()));
                }
                let alts: Vec<String> = choices.iter().map(|c| json!(c).to_string()).collect();
                let bytes: usize = alts.iter().map(|a| a.len() + 3).sum();
                if bytes > MAX_SOURCE_BYTES {
                    return Err(format!(
                        "the choices make a {bytes}-byte grammar; at most {MAX_SOURCE_BYTES}"
                    ));
                }
                TopLevelGrammar::from_lark(format!("start: {}", alts.join(" | ")))
            }
            ConstraintSpec::AfterThinking(inner) => {
                if matches!(**inner, ConstraintSpec::AfterThinking(_)) {
                    return Err("thinking is wrapped twice".into());
                }
                let mut body = inner.grammar(special)?;
                let Some(first) = body.grammars.first_mut() else {
                    return Err("an empty grammar".into());
                };
                first.name = Some("body".into());
                let mut grammars = vec![GrammarWithLexer::from_lark(thinking_lark(special))];
                grammars.append(&mut body.grammars);
                TopLevelGrammar {
                    grammars,
                    max_tokens: body.max_tokens,
                }
            }
            ConstraintSpec::ToolCalls(t) => {
                let src = t.lark(&hearth_json_options(), special)?;
                if src.len() > MAX_TOOLS_GRAMMAR_BYTES {
                    return Err(format!(
                        "the functions make a {}-byte grammar; at most {MAX_TOOLS_GRAMMAR_BYTES}",
                        src.len()
                    ));
                }
                TopLevelGrammar::from_lark(src)
            }
        })
    }
}

/// A `<think>` block left free (it ends at the first `</think>`), up to 4 newlines
/// after it, then the constrained body. The block is optional: a template that writes
/// an empty one itself (thinking off) leaves the body to come first. A tag that is one
/// special token of the vocabulary is written as that token.
fn thinking_lark(special: &dyn Fn(&str) -> Option<u32>) -> String {
    let tag = |t: &str| match special(t) {
        Some(id) => format!("<[{id}]>"),
        None => Value::String(t.into()).to_string(),
    };
    // A text closing tag ends the lazy lexeme at its first occurrence; a special-token
    // one can never be part of the text before it.
    let (close, thought) = match special("</think>") {
        Some(id) => (format!("<[{id}]>"), "thought: /(?s:.*)/"),
        None => (String::new(), "thought[lazy]: /(?s:.*)<\\/think>/"),
    };
    format!(
        "start: thinking? @body\n\
         thinking: {open} thought {close} newlines?\n\
         {thought}\n\
         newlines: /[\\r\\n]{{1,4}}/\n",
        open = tag("<think>"),
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Most alternatives a choice constraint may list.
pub const MAX_CHOICES: usize = 1024;

/// Largest regex or grammar source accepted.
pub const MAX_SOURCE_BYTES: usize = 64 * 1024;

/// Largest grammar a request's functions may make (their schemas, mostly).
pub const MAX_TOOLS_GRAMMAR_BYTES: usize = 256 * 1024;

/// Compact JSON with one space after `,` and `:` (bounded whitespace: a model cannot
/// pad forever), strict about keywords; replaces any `x-guidance` the caller sent.
/// Also bounds the numbers the schema leaves unbounded (json_bounds.rs).
fn with_hearth_options(schema: Value) -> Value {
    with_json_options(schema, &hearth_json_options())
}

/// `schema` with its unbounded numbers bounded and `options` as its `x-guidance`.
pub(crate) fn with_json_options(mut schema: Value, options: &Value) -> Value {
    crate::json_bounds::bound_numbers(&mut schema);
    if let Value::Object(o) = &mut schema {
        o.insert("x-guidance".into(), options.clone());
    }
    schema
}

fn hearth_json_options() -> Value {
    json!({
        "whitespace_flexible": false,
        "item_separator": ", ",
        "key_separator": ": ",
        "lenient": false,
    })
}

/// A compiled grammar, shared by every sequence that uses it.
pub struct CompiledConstraint {
    kind: &'static str,
    /// Started and checked (its first mask computed); cloned per sequence.
    matcher: Mutex<Matcher>,
}

/// A compiled constraint as a request carries it.
#[derive(Clone)]
pub struct Constraint(Arc<CompiledConstraint>);

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Constraint({})", self.0.kind)
    }
}

impl PartialEq for Constraint {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Compiles constraints for one model's vocabulary, with a cache of compiled grammars.
pub struct ConstraintCompiler {
    tokenizer: Arc<TextTokenizer>,
    vocab_size: usize,
    eos: u32,
    /// Built on first use: the trie over the vocabulary takes a moment.
    factory: OnceLock<std::result::Result<ParserFactory, String>>,
    cache: Mutex<GrammarCache>,
}

/// Compiled grammars by source hash; the oldest goes first past `CACHE_ENTRIES`.
#[derive(Default)]
struct GrammarCache {
    map: HashMap<[u8; 32], Arc<CompiledConstraint>>,
    order: VecDeque<[u8; 32]>,
}

const CACHE_ENTRIES: usize = 128;

impl ConstraintCompiler {
    pub fn new(tokenizer: Arc<TextTokenizer>, vocab_size: usize, eos_ids: &[u32]) -> Self {
        Self {
            tokenizer,
            vocab_size,
            eos: eos_ids.first().copied().unwrap_or(0),
            factory: OnceLock::new(),
            cache: Mutex::new(GrammarCache::default()),
        }
    }

    fn factory(&self) -> Result<&ParserFactory> {
        self.factory
            .get_or_init(|| {
                let env = crate::toktrie::token_env(&self.tokenizer, self.vocab_size, self.eos);
                let mut f = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
                f.quiet();
                // llguidance's defaults, stated: they bound compile and mask time.
                *f.limits_mut() = ParserLimits {
                    verbose_errors: false,
                    ..ParserLimits::default()
                };
                Ok(f)
            })
            .as_ref()
            .map_err(|e| RuntimeError::Tokenizer(format!("constraint vocabulary: {e}")))
    }

    /// Compiles `spec`, or returns the cached grammar for the same source. `field` is
    /// the request field errors name. Blocking: call it off the engine thread.
    pub fn compile(&self, spec: &ConstraintSpec, field: &'static str) -> Result<Constraint> {
        let key = spec.cache_key();
        if let Some(hit) = self
            .cache
            .lock()
            .ok()
            .and_then(|c| c.map.get(&key).cloned())
        {
            return Ok(Constraint(hit));
        }
        let special = |text: &str| {
            let id = self.tokenizer.token_id(text)?;
            crate::toktrie::is_special(&self.tokenizer, id).then_some(id)
        };
        let grammar = spec
            .grammar(&special)
            .map_err(|reason| RuntimeError::invalid(field, reason))?;
        let factory = self.factory()?;
        let parser = factory.create_parser(grammar).map_err(|e| {
            RuntimeError::invalid(field, format!("cannot be enforced: {}", short(&e)))
        })?;
        let mut matcher = Matcher::new(Ok(parser));
        if let Err(e) = matcher.compute_mask() {
            return Err(RuntimeError::invalid(
                field,
                format!("cannot be enforced: {}", short(&e)),
            ));
        }
        let compiled = Arc::new(CompiledConstraint {
            kind: spec.kind(),
            matcher: Mutex::new(matcher),
        });
        if let Ok(mut c) = self.cache.lock() {
            if c.map.insert(key, compiled.clone()).is_none() {
                c.order.push_back(key);
            }
            while c.order.len() > CACHE_ENTRIES {
                if let Some(old) = c.order.pop_front() {
                    c.map.remove(&old);
                }
            }
        }
        Ok(Constraint(compiled))
    }

    /// Grammars in the cache (for tests and metrics).
    pub fn cached(&self) -> usize {
        self.cache.lock().map(|c| c.map.len()).unwrap_or(0)
    }
}

/// llguidance's messages can quote the whole grammar; the first lines say what is wrong.
fn short(e: &impl std::fmt::Display) -> String {
    let s = e.to_string();
    let mut out: String = s.lines().take(4).collect::<Vec<_>>().join(" ");
    if out.len() > 600 {
        let mut cut = 600;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

/// What consuming a sampled token did to a sequence's grammar.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// More tokens are needed or allowed.
    Continue,
    /// The grammar is complete: the sequence ends with finish reason `stop`.
    Accepted,
    /// The matcher failed (a limit hit mid-generation); the request fails.
    Failed(String),
}

/// One sequence's matcher and its current mask.
pub struct SeqConstraint {
    matcher: Matcher,
    /// Bit `i % 32` of word `i / 32` set: token `i` allowed.
    mask: Vec<u32>,
    eos_ids: Vec<u32>,
    failed: Option<String>,
}

impl SeqConstraint {
    pub fn new(c: &Constraint, eos_ids: &[u32]) -> std::result::Result<Self, String> {
        let matcher =
            c.0.matcher
                .lock()
                .map_err(|_| "the compiled grammar is unusable".to_string())?
                .clone();
        Ok(Self {
            matcher,
            mask: Vec::new(),
            eos_ids: eos_ids.to_vec(),
            failed: None,
        })
    }

    /// The tokens allowed next, as a bitmask over the vocabulary. Any EOS id is allowed
    /// exactly when the grammar may end here. A failed matcher allows only EOS and is
    /// reported by `take_failure`.
    pub fn compute_mask(&mut self) -> &[u32] {
        match self.matcher.compute_mask_or_eos() {
            Ok(vob) => {
                let eos_ok = self
                    .matcher
                    .tok_env()
                    .map(|env| vob.is_allowed(env.tok_trie().eos_token()))
                    .unwrap_or(false);
                self.mask.clear();
                self.mask.extend_from_slice(vob.as_slice());
                for &e in &self.eos_ids {
                    set_bit(&mut self.mask, e, eos_ok);
                }
            }
            Err(e) => {
                self.failed = Some(format!("the output constraint failed: {}", short(&e)));
                self.mask.iter_mut().for_each(|w| *w = 0);
                for &e in &self.eos_ids {
                    set_bit(&mut self.mask, e, true);
                }
            }
        }
        &self.mask
    }

    pub fn mask(&self) -> &[u32] {
        &self.mask
    }

    /// Why the last `compute_mask` failed, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Advances the matcher by the sampled token.
    pub fn advance(&mut self, token: u32) -> Progress {
        if let Some(f) = self.failed.take() {
            return Progress::Failed(f);
        }
        if self.eos_ids.contains(&token) {
            return Progress::Accepted;
        }
        if let Err(e) = self.matcher.consume_token(token) {
            return Progress::Failed(format!("the output constraint failed: {}", short(&e)));
        }
        if self.matcher.is_stopped() {
            Progress::Accepted
        } else {
            Progress::Continue
        }
    }
}

fn set_bit(mask: &mut Vec<u32>, id: u32, on: bool) {
    let word = id as usize / 32;
    if word >= mask.len() {
        if !on {
            return;
        }
        mask.resize(word + 1, 0);
    }
    if on {
        mask[word] |= 1 << (id % 32);
    } else {
        mask[word] &= !(1 << (id % 32));
    }
}

/// Whether bit `id` of a mask is set; ids past its end are not.
pub fn mask_allows(mask: &[u32], id: usize) -> bool {
    mask.get(id / 32).is_some_and(|w| w & (1 << (id % 32)) != 0)
}

/// A row of logits with every token the mask does not allow set to -inf.
pub fn apply_mask(raw: &[f32], mask: &[u32]) -> Vec<f32> {
    raw.iter()
        .enumerate()
        .map(|(i, &l)| {
            if mask_allows(mask, i) {
                l
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect()
}
