//! A step's input to [`super::Transformer::forward`].

use crate::paged_attention::AttentionMetadata;

/// One step's input: the scheduled sequences' new tokens flattened in order, each
/// token's position (for RoPE), which rows to return logits for, and the attention
/// metadata (query offsets, sequence lengths, block tables, cache slots) that one
/// paged-attention call per layer reads.
#[derive(Debug, Clone)]
pub struct ForwardBatch {
    pub token_ids: Vec<u32>,
    pub positions: Vec<u32>,
    /// Flattened index of the last token of each sequence that wants logits.
    pub logits_rows: Vec<u32>,
    pub attention: AttentionMetadata,
}

impl ForwardBatch {
    pub fn new(block_size: usize) -> Self {
        Self {
            token_ids: Vec::new(),
            positions: Vec::new(),
            logits_rows: Vec::new(),
            attention: AttentionMetadata::new(block_size),
        }
    }

    /// Adds a sequence's chunk: `tokens` at positions `first_position..`, its KV
    /// blocks covering them (and everything before), and whether the step returns
    /// logits for the chunk's last token (false for a prefill chunk that does not
    /// reach the end of the prompt).
    pub fn push(
        &mut self,
        tokens: &[u32],
        first_position: usize,
        block_table: &[u32],
        wants_logits: bool,
    ) {
        let n = tokens.len();
        self.token_ids.extend_from_slice(tokens);
        self.positions
            .extend((first_position..first_position + n).map(|p| p as u32));
        if wants_logits {
            self.logits_rows.push((self.token_ids.len() - 1) as u32);
        }
        self.attention.push(n, first_position + n, block_table);
    }

    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }
}
