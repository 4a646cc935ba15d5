//! The requests `hearth bench` sends: random prompts that encode to exactly
//! `--input-len` tokens, or the first turns of a ShareGPT-style `--dataset`.

use anyhow::{bail, Context};
use hearth_runtime::TextTokenizer;
use rand::{Rng, SeedableRng};

use crate::bench::BenchArgs;

/// One request of the workload: prompt tokens (offline) or text (HTTP).
#[derive(Clone)]
pub(crate) enum Prompt {
    Tokens(Vec<u32>),
    Text(String, usize),
}

impl Prompt {
    pub(crate) fn len(&self) -> usize {
        match self {
            Prompt::Tokens(t) => t.len(),
            Prompt::Text(_, n) => *n,
        }
    }
}

/// `reserve`: tokens the server adds around each random prompt (a chat template), taken
/// off its length so every backend's engine sees `input_len` prompt tokens.
pub(crate) fn workload(
    a: &BenchArgs,
    tok: &TextTokenizer,
    vocab: u32,
    as_text: bool,
    reserve: usize,
) -> anyhow::Result<Vec<(Prompt, usize)>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed);
    let mut out = Vec::new();
    if let Some(path) = &a.dataset {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        for conv in v
            .as_array()
            .context("the dataset must be a JSON array of conversations")?
        {
            let Some(turns) = conv.get("conversations").and_then(|c| c.as_array()) else {
                continue;
            };
            if turns.len() < 2 {
                continue;
            }
            let text_of = |t: &serde_json::Value| {
                t.get("value")
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_string()
            };
            let prompt_text = text_of(&turns[0]);
            let prompt = tok.encode(&prompt_text, true)?;
            let reply = tok.encode(&text_of(&turns[1]), false)?.len();
            // vLLM's filter: skip too-short pairs.
            if prompt.len() < 4 || reply < 4 {
                continue;
            }
            let n = prompt.len();
            out.push((
                if as_text {
                    Prompt::Text(prompt_text, n)
                } else {
                    Prompt::Tokens(prompt)
                },
                reply,
            ));
            if out.len() == a.num_prompts {
                break;
            }
        }
        if out.is_empty() {
            bail!("no usable conversations in {}", path.display());
        }
        return Ok(out);
    }
    // Random prompts as text that encodes to exactly `input_len` tokens, so the HTTP
    // mode (which sends text) and the offline mode (which sends ids) do the same work.
    let text_ids: Vec<u32> = (0..vocab)
        .filter(|&i| {
            let t = tok.decode(&[i]).unwrap_or_default();
            !t.is_empty() && !t.contains('\u{FFFD}')
        })
        .collect();
    if text_ids.is_empty() {
        bail!("the tokenizer has no token that decodes to text");
    }
    let input_len = a.input_len.saturating_sub(reserve).max(1);
    for _ in 0..a.num_prompts {
        let mut ids: Vec<u32> = (0..input_len)
            .map(|_| text_ids[rng.random_range(0..text_ids.len())])
            .collect();
        let mut text = tok.decode(&ids)?;
        for _ in 0..16 {
            let re = tok.encode(&text, false)?;
            if re.len() == input_len {
                ids = re;
                break;
            }
            ids = re;
            ids.truncate(input_len);
            while ids.len() < input_len {
                ids.push(text_ids[rng.random_range(0..text_ids.len())]);
            }
            text = tok.decode(&ids)?;
        }
        let n = ids.len();
        out.push((
            if as_text {
                Prompt::Text(text, n)
            } else {
                Prompt::Tokens(ids)
            },
            a.output_len,
        ));
    }
    Ok(out)
}
