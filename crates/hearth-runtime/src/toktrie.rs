//! llguidance's token trie over hearth's own vocabulary: each token's exact bytes, as
//! `TextTokenizer::token_piece` gives them for HF and GGUF tokenizers alike, so a mask
//! allows a token exactly when its bytes continue the grammar. Special tokens carry
//! llguidance's 0xFF marker, which keeps them out of every text lexeme; ids past the
//! tokenizer's vocabulary (padding rows of the embedding) have no bytes and are never
//! allowed.

use std::sync::Arc;

use toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};

use crate::tokenizer::TextTokenizer;

/// The trie for a model whose logits have `vocab_size` columns. `eos` is the id the
/// grammar's accept state allows (the engine widens it to every EOS id).
pub fn token_env(tokenizer: &TextTokenizer, vocab_size: usize, eos: u32) -> TokEnv {
    let inner = tokenizer.inner();
    let size = vocab_size.max(inner.get_vocab_size(true));
    let words: Vec<Vec<u8>> = (0..size as u32)
        .map(|id| {
            if inner.id_to_token(id).is_none() {
                return Vec::new();
            }
            let piece = tokenizer.token_piece(id);
            if is_special(tokenizer, id) {
                let mut marked = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                marked.extend_from_slice(&piece.bytes);
                marked
            } else {
                piece.bytes
            }
        })
        .collect();
    let info = TokRxInfo::new(size as u32, eos);
    // Greedy tokenization of forced text: llguidance then never forces tokens that the
    // real tokenizer would split differently (it treats the env as non-canonical).
    Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, &words)))
}

/// A token that decoding with special tokens skipped drops entirely (`<|im_end|>`).
pub(crate) fn is_special(tokenizer: &TextTokenizer, id: u32) -> bool {
    let inner = tokenizer.inner();
    inner.decode(&[id], true).unwrap_or_default().is_empty()
        && !inner.decode(&[id], false).unwrap_or_default().is_empty()
}
