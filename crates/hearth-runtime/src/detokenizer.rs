//! Incremental detokenization. Decoding token by token breaks multi-byte characters
//! split across tokens and drops the spaces some tokenizers attach to the next token;
//! so each step decodes a small window of recent tokens twice and emits only the new
//! suffix, and waits while the text ends in an incomplete character.

use tokenizers::Tokenizer;

pub struct IncrementalDetokenizer {
    ids: Vec<u32>,
    /// Start of the window whose decoded text was already emitted.
    prefix_offset: usize,
    /// End of that window.
    read_offset: usize,
    skip_special_tokens: bool,
}

impl IncrementalDetokenizer {
    /// `context` is the prompt (or its tail): decoding starts after it, but it gives the
    /// first generated tokens their left context (spaces, merges).
    pub fn new(context: &[u32], skip_special_tokens: bool) -> Self {
        let tail = &context[context.len().saturating_sub(6)..];
        Self {
            ids: tail.to_vec(),
            prefix_offset: 0,
            read_offset: tail.len(),
            skip_special_tokens,
        }
    }

    /// Adds one token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let decode = |ids: &[u32]| {
            tokenizer
                .decode(ids, self.skip_special_tokens)
                .unwrap_or_default()
        };
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = decode(&self.ids[self.prefix_offset..]);
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            let text = new_suffix(&full, &prefix);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            // Keep the window small: drop what no later decode needs.
            if self.prefix_offset > 64 {
                self.ids.drain(..self.prefix_offset);
                self.read_offset -= self.prefix_offset;
                self.prefix_offset = 0;
            }
            text
        } else {
            String::new()
        }
    }

    /// At the end of the sequence: the text still held back for a character that will
    /// never be completed, with U+FFFD for its bytes (as a whole decode shows them).
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> String {
        if self.read_offset >= self.ids.len() {
            return String::new();
        }
        let decode = |ids: &[u32]| {
            tokenizer
                .decode(ids, self.skip_special_tokens)
                .unwrap_or_default()
        };
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = decode(&self.ids[self.prefix_offset..]);
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        if full.len() > prefix.len() {
            new_suffix(&full, &prefix)
        } else {
            String::new()
        }
    }
}

/// What `full` adds to `prefix`. Some tokenizers normalise the prefix differently once
/// more text follows; then the common prefix is used rather than slicing inside a
/// character.
fn new_suffix(full: &str, prefix: &str) -> String {
    match full.get(prefix.len()..) {
        Some(t) if full.starts_with(prefix) => t.to_string(),
        _ => {
            let common = full
                .char_indices()
                .zip(prefix.chars())
                .take_while(|((_, a), b)| a == b)
                .last()
                .map(|((i, c), _)| i + c.len_utf8())
                .unwrap_or(0);
            full[common..].to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multibyte_text_streams_whole_characters_and_matches_full_decode() {
        let dir = crate::demo::ensure_demo_model(&crate::demo::default_cache_dir()).unwrap();
        let tok = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        let text = "Grüße, Καλημέρα! 日本語のテキスト 🎉🔥 done.";
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        // The byte-level demo tokenizer must split some characters across tokens,
        // or this test would not exercise anything.
        let partial = ids
            .iter()
            .filter(|&&i| tok.decode(&[i], false).unwrap().contains('\u{FFFD}'))
            .count();
        assert!(partial > 0, "no token holds a partial character");
        let mut d = IncrementalDetokenizer::new(&[], false);
        let mut out = String::new();
        for &i in &ids {
            let piece = d.push(&tok, i);
            assert!(!piece.contains('\u{FFFD}'), "broken character in {piece:?}");
            out.push_str(&piece);
        }
        assert_eq!(out, text);
        assert_eq!(
            d.flush(&tok),
            "",
            "nothing is held back after whole characters"
        );
    }

    /// A sequence that ends inside a character: its bytes come out as U+FFFD, as a
    /// whole decode shows them, rather than vanishing.
    #[test]
    fn flush_releases_an_incomplete_character() {
        let dir = crate::demo::ensure_demo_model(&crate::demo::default_cache_dir()).unwrap();
        let tok = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        let ids = tok.encode("ok 🔥", false).unwrap().get_ids().to_vec();
        let cut = ids.len() - 1;
        let expected = tok.decode(&ids[..cut], false).unwrap();
        assert!(expected.ends_with('\u{FFFD}'), "{expected:?}");
        let mut d = IncrementalDetokenizer::new(&[], false);
        let mut out: String = ids[..cut].iter().map(|&i| d.push(&tok, i)).collect();
        assert!(
            out.starts_with("ok") && !out.contains('\u{FFFD}'),
            "the partial character is held back while it may complete: {out:?}"
        );
        out.push_str(&d.flush(&tok));
        assert_eq!(out, expected);
    }
}
