//! Qwen3-style reasoning: a chat answer on a template with `<think>` blocks may open
//! with `<think>…</think>`. That block goes to `message.reasoning_content` (streamed as
//! `delta.reasoning_content`, as vLLM's reasoning parsers do), and `content` (or the
//! tool calls) is what follows it, so a client parsing the content as JSON sees only
//! the constrained answer.

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

/// A finished answer split into its reasoning (when it opened with a `<think>` block)
/// and the rest. A block cut short by length is all reasoning.
pub fn split(text: &str) -> (Option<String>, String) {
    let Some(body) = text.trim_start().strip_prefix(OPEN) else {
        return (None, text.to_string());
    };
    match body.find(CLOSE) {
        Some(end) => (
            Some(body[..end].trim().to_string()),
            body[end + CLOSE.len()..].trim_start().to_string(),
        ),
        None => (Some(body.trim_start().to_string()), String::new()),
    }
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    /// Nothing decided yet: the text held may still open a block.
    Start(String),
    /// Inside the block; the text held may be the start of `</think>`; `true` while
    /// the whitespace after `<think>` is still dropped.
    Thinking(String, bool),
    /// The answer; `true` while the whitespace after the block is still dropped.
    Answer(bool),
}

/// A stream's split, per choice: each piece of text becomes reasoning and answer
/// deltas, text that may be part of a tag held back until it is known.
pub struct ReasoningSplit {
    states: Vec<State>,
}

impl ReasoningSplit {
    /// `active`: the template has `<think>` blocks; otherwise all text is answer.
    pub fn new(active: bool, choices: usize) -> Self {
        let first = if active {
            State::Start(String::new())
        } else {
            State::Answer(false)
        };
        Self {
            states: vec![first; choices],
        }
    }

    /// Choice `i`'s next text as `(reasoning, answer)` to send now.
    pub fn push(&mut self, i: usize, text: &str) -> (String, String) {
        let Some(state) = self.states.get_mut(i) else {
            return (String::new(), text.to_string());
        };
        let mut reasoning = String::new();
        let mut answer = String::new();
        let mut input = text.to_string();
        loop {
            match state {
                State::Start(held) => {
                    held.push_str(&input);
                    let t = held.trim_start();
                    if let Some(rest) = t.strip_prefix(OPEN) {
                        input = rest.to_string();
                        *state = State::Thinking(String::new(), true);
                    } else if OPEN.starts_with(t) {
                        return (reasoning, answer);
                    } else {
                        input = std::mem::take(held);
                        *state = State::Answer(false);
                    }
                }
                State::Thinking(held, trimming) => {
                    if *trimming {
                        input = input.trim_start().to_string();
                        if input.is_empty() {
                            return (reasoning, answer);
                        }
                        *trimming = false;
                    }
                    held.push_str(&input);
                    if let Some(end) = held.find(CLOSE) {
                        reasoning.push_str(held[..end].trim_end());
                        input = held[end + CLOSE.len()..].to_string();
                        *state = State::Answer(true);
                    } else {
                        // Keep back a tail that may begin `</think>`.
                        let keep = (1..CLOSE.len())
                            .rev()
                            .find(|&k| {
                                held.len() >= k
                                    && held.is_char_boundary(held.len() - k)
                                    && CLOSE.starts_with(&held[held.len() - k..])
                            })
                            .unwrap_or(0);
                        let cut = held.len() - keep;
                        reasoning.push_str(&held[..cut]);
                        held.drain(..cut);
                        return (reasoning, answer);
                    }
                }
                State::Answer(trimming) => {
                    if *trimming {
                        let t = input.trim_start();
                        if t.is_empty() {
                            return (reasoning, answer);
                        }
                        input = t.to_string();
                        *trimming = false;
                    }
                    answer.push_str(&input);
                    return (reasoning, answer);
                }
            }
        }
    }

    /// At choice `i`'s end: what is still held, as `(reasoning, answer)`.
    pub fn finish(&mut self, i: usize) -> (String, String) {
        match self.states.get_mut(i) {
            Some(State::Start(held)) => (String::new(), std::mem::take(held)),
            Some(State::Thinking(held, _)) => (std::mem::take(held), String::new()),
            _ => (String::new(), String::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_a_whole_answer() {
        assert_eq!(
            split("<think>\nhm, JSON.\n</think>\n\n{\"a\": 1}"),
            (Some("hm, JSON.".into()), "{\"a\": 1}".into())
        );
        assert_eq!(split("{\"a\": 1}"), (None, "{\"a\": 1}".into()));
        assert_eq!(
            split("<think>cut sh"),
            (Some("cut sh".into()), String::new())
        );
    }

    #[test]
    fn splits_a_stream_whatever_the_pieces() {
        let text = "<think>\nI should call f.\n</think>\n\n{\"a\": 1}";
        for step in 1..=text.len() {
            let mut s = ReasoningSplit::new(true, 1);
            let (mut r, mut a) = (String::new(), String::new());
            let mut at = 0;
            while at < text.len() {
                let mut end = (at + step).min(text.len());
                while !text.is_char_boundary(end) {
                    end += 1;
                }
                let (dr, da) = s.push(0, &text[at..end]);
                r.push_str(&dr);
                a.push_str(&da);
                at = end;
            }
            let (dr, da) = s.finish(0);
            r.push_str(&dr);
            a.push_str(&da);
            // Whitespace before `</think>` may go out before the tag is seen.
            assert_eq!(
                (r.trim_end(), a.as_str()),
                ("I should call f.", "{\"a\": 1}"),
                "step {step}"
            );
        }
        let mut s = ReasoningSplit::new(true, 1);
        assert_eq!(s.push(0, "<th"), (String::new(), String::new()));
        assert_eq!(s.push(0, "e answer"), (String::new(), "<the answer".into()));
        let mut off = ReasoningSplit::new(false, 1);
        assert_eq!(off.push(0, "<think>"), (String::new(), "<think>".into()));
    }
}
