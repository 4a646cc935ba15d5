//! Block bookkeeping for the paged KV cache, with prefix caching.
//!
//! A block is reference-counted: sequences sharing a prompt prefix share its full
//! blocks. A full block is keyed by a hash of its tokens and of its parent block's key,
//! so a key names the whole prefix up to that block. Blocks whose count drops to zero
//! keep their contents and their key on an LRU list, and are evicted (key dropped)
//! only when a fresh block is needed and no never-keyed block is free.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

pub type BlockId = u32;

#[derive(Debug, Clone, Default)]
struct BlockMeta {
    ref_count: u32,
    /// The prefix key and the tokens, kept to rule out hash collisions on lookup.
    key: Option<(u64, Vec<u32>)>,
    /// Position on the LRU list while free and keyed.
    lru_tick: Option<u64>,
}

#[derive(Debug)]
pub struct BlockAllocator {
    block_size: usize,
    blocks: Vec<BlockMeta>,
    /// Free blocks holding nothing worth keeping; used first.
    free_plain: Vec<BlockId>,
    /// Free blocks still holding a cached prefix, least recently freed first.
    free_cached: BTreeMap<u64, BlockId>,
    by_key: HashMap<u64, BlockId>,
    tick: u64,
    pub prefix_queries: u64,
    pub prefix_hits: u64,
}

/// The key of a full block: its tokens chained onto its parent's key.
pub fn block_key(parent: Option<u64>, tokens: &[u32]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl BlockAllocator {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            block_size,
            blocks: vec![BlockMeta::default(); num_blocks],
            // Reversed so blocks are handed out 0, 1, 2, ... which keeps tests readable.
            free_plain: (0..num_blocks as BlockId).rev().collect(),
            free_cached: BTreeMap::new(),
            by_key: HashMap::new(),
            tick: 0,
            prefix_queries: 0,
            prefix_hits: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    pub fn num_free(&self) -> usize {
        self.free_plain.len() + self.free_cached.len()
    }

    pub fn num_cached(&self) -> usize {
        self.by_key.len()
    }

    /// A fresh block for new tokens, evicting the least recently used cached prefix
    /// if needed.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let id = match self.free_plain.pop() {
            Some(id) => id,
            None => {
                let (_, id) = self.free_cached.pop_first()?;
                let meta = &mut self.blocks[id as usize];
                meta.lru_tick = None;
                if let Some((key, _)) = meta.key.take() {
                    self.by_key.remove(&key);
                }
                id
            }
        };
        self.blocks[id as usize].ref_count = 1;
        Some(id)
    }

    /// Takes a reference on the cached block with this key and these tokens, if any.
    pub fn lookup(&mut self, key: u64, tokens: &[u32]) -> Option<BlockId> {
        self.prefix_queries += 1;
        let id = *self.by_key.get(&key)?;
        let meta = &mut self.blocks[id as usize];
        match &meta.key {
            Some((_, t)) if t == tokens => {}
            _ => return None,
        }
        if let Some(tick) = meta.lru_tick.take() {
            self.free_cached.remove(&tick);
        }
        meta.ref_count += 1;
        self.prefix_hits += 1;
        Some(id)
    }

    /// Marks a block as full and computed, so later sequences can share it.
    pub fn register(&mut self, id: BlockId, key: u64, tokens: &[u32]) {
        if self.by_key.contains_key(&key) {
            // Another block already holds this prefix (two requests computed it at
            // once); this copy stays private and is recycled as plain when freed.
            return;
        }
        let meta = &mut self.blocks[id as usize];
        if meta.key.is_none() {
            meta.key = Some((key, tokens.to_vec()));
            self.by_key.insert(key, id);
        }
    }

    pub fn release(&mut self, id: BlockId) {
        let meta = &mut self.blocks[id as usize];
        debug_assert!(meta.ref_count > 0, "double free of block {id}");
        meta.ref_count = meta.ref_count.saturating_sub(1);
        if meta.ref_count == 0 {
            if meta.key.is_some() {
                self.tick += 1;
                meta.lru_tick = Some(self.tick);
                self.free_cached.insert(self.tick, id);
            } else {
                self.free_plain.push(id);
            }
        }
    }

    pub fn ref_count(&self, id: BlockId) -> u32 {
        self.blocks[id as usize].ref_count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_until_empty_then_release_returns_blocks() {
        let mut a = BlockAllocator::new(3, 4);
        let ids: Vec<_> = (0..3).map(|_| a.allocate().unwrap()).collect();
        assert_eq!(ids, vec![0, 1, 2]);
        assert_eq!(a.allocate(), None);
        a.release(1);
        assert_eq!(a.num_free(), 1);
        assert_eq!(a.allocate(), Some(1));
    }

    #[test]
    fn shared_block_is_freed_only_by_its_last_owner() {
        let mut a = BlockAllocator::new(2, 2);
        let b = a.allocate().unwrap();
        let key = block_key(None, &[1, 2]);
        a.register(b, key, &[1, 2]);
        assert_eq!(a.lookup(key, &[1, 2]), Some(b));
        assert_eq!(a.ref_count(b), 2);
        a.release(b);
        assert_eq!(a.num_free(), 1);
        a.release(b);
        assert_eq!(a.num_free(), 2);
    }

    #[test]
    fn freed_cached_block_is_reused_until_evicted_in_lru_order() {
        let mut a = BlockAllocator::new(2, 2);
        let x = a.allocate().unwrap();
        let y = a.allocate().unwrap();
        let kx = block_key(None, &[1, 1]);
        let ky = block_key(None, &[2, 2]);
        a.register(x, kx, &[1, 1]);
        a.register(y, ky, &[2, 2]);
        a.release(x);
        a.release(y);
        // Both free but still cached: a lookup revives y without copying.
        assert_eq!(a.lookup(ky, &[2, 2]), Some(y));
        a.release(y);
        // Now x is least recently freed: the next allocation evicts it, not y.
        assert_eq!(a.allocate(), Some(x));
        assert_eq!(a.lookup(kx, &[1, 1]), None);
        assert_eq!(a.lookup(ky, &[2, 2]), Some(y));
        assert_eq!(a.prefix_hits, 2);
        assert_eq!(a.prefix_queries, 3);
    }

    #[test]
    fn key_depends_on_parent_and_collisions_are_rejected() {
        assert_ne!(block_key(None, &[1, 2]), block_key(Some(7), &[1, 2]));
        let mut a = BlockAllocator::new(1, 2);
        let b = a.allocate().unwrap();
        a.register(b, 42, &[1, 2]);
        // Same key, other tokens: must not be served.
        assert_eq!(a.lookup(42, &[9, 9]), None);
    }
}
